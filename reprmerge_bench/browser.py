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
    from playwright.sync_api import Browser, Page, Playwright

INSTALL_HINT = "apt-get install -y chromium (Debian, as root; `make test` does it when it can), pip install '.[test]'"
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


# The page's views show the latest state (none is aria-busy), with predictions and, where the
# bundle has 2 or 3 tasks, the heat map drawn.
SETTLED = """() => ['#tradeoff', '#predictions', '#compare'].every(s =>
    document.querySelector(s).getAttribute('aria-busy') === 'false')
  && document.querySelectorAll('#prediction-list article').length > 0
  && (document.getElementById('simplex-figure').hidden || document.querySelectorAll('#heat > *').length > 0)"""


def open_playground(page: Page, url: str, timeout_ms: float = 60_000) -> None:
    """Open the playground of the server at `url` (via its front door `/`) and wait until it has settled."""
    page.goto(f"{url}/")
    settle(page, timeout_ms)


def settle(page: Page, timeout_ms: float = 60_000) -> None:
    page.wait_for_function(SETTLED, timeout=timeout_ms)
