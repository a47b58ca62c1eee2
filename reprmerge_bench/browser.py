"""A headless Chromium for the playground's browser tests, screenshots and latency benchmark.

Playwright's own browser download is not reachable from where this project builds, so Playwright for
Python drives the system's Chromium (Debian's `chromium` package) through `executable_path`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

INSTALL_HINT = "apt-get install -y chromium (Debian, as root; `make test` does it when it can) and pip install -e '.[test]'"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> Path | None:
    """`REPRMERGE_CHROMIUM`, else the first Chromium on PATH, else None."""
    given = os.environ.get("REPRMERGE_CHROMIUM")
    if given:
        return Path(given) if Path(given).is_file() else None
    found = next((p for p in map(shutil.which, CANDIDATES) if p), None)
    return Path(found) if found else None


def missing() -> str | None:
    """Why no browser can be driven here (with the command that fixes it), or None when one can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"Playwright for Python is not installed; {INSTALL_HINT}"
    if chromium_path() is None:
        return f"no Chromium found (looked for {', '.join(CANDIDATES)} on PATH and REPRMERGE_CHROMIUM); {INSTALL_HINT}"
    return None


def launch(playwright: Playwright) -> Browser:
    """Headless system Chromium. No sandbox: CI runs as root, where Chromium refuses to start sandboxed."""
    path = chromium_path()
    if path is None:
        raise RuntimeError(missing() or "no Chromium")
    return playwright.chromium.launch(executable_path=str(path), headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])
