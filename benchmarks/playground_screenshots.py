"""Screenshots of the playground for the README: starts `reprmerge serve` on a bundle, drives the page in
headless Chromium and writes docs/playground/{desktop,phone}.png (the first screen at 1280x800 and at
390x844) and desktop-full.png (the whole page with two pinned preferences). `make screenshots`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from reprmerge_bench.browser import launch, missing, open_playground, settle
from reprmerge_bench.server import LocalServer

VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}


def stage(page: Page) -> None:
    """A state worth showing: two pinned preferences, then a preference that favours the first task."""
    presets = page.locator("#presets button")
    presets.nth(1).click()  # Only <first task>
    page.click("#pin")
    presets.last.click()  # Favour <last task>
    page.click("#pin")
    presets.nth(presets.count() // 2 + 1).click()  # Favour <first task> (Equal, n x Only, n x Favour)
    settle(page)
    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    page.mouse.move(0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path(".cache/bundles/tiny"), help="bundle to serve")
    parser.add_argument("--out", type=Path, default=Path("docs/playground"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalServer(args.bundle, None, "--device", "cpu") as server, sync_playwright() as playwright:
        browser = launch(playwright)
        for name, (width, height) in VIEWPORTS.items():
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            open_playground(page, server.url)
            stage(page)
            page.screenshot(path=args.out / f"{name}.png")
            if name == "desktop":
                page.screenshot(path=args.out / f"{name}-full.png", full_page=True)
            page.close()
        browser.close()
    for png in sorted(args.out.glob("*.png")):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
