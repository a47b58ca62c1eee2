"""Time from a slider move to an updated playground preview, in headless Chromium against `reprmerge serve`.

A move sets the first task's slider (an `input` event, as a drag or a key does) and is timed in the page
until the trade-off preview and the predictions show the new preference (their sections stop being
aria-busy), then one more animation frame: the request, the server, rendering and layout. Moves are
PAUSE_MS apart, as a person's are; the page sends a move at once when idle and coalesces only moves that
follow within 50 ms of its last request (a drag), which this does not time. 20 moves to preferences the
server has never seen ("fresh": a head solve and a trade-off solve each), then the same 20 again
("cached": both cached). Prints the median and the 90th percentile in ms.

    python benchmarks/bench_playground.py --bundle .cache/bundles/tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from reprmerge_bench.browser import launch, missing, open_playground
from reprmerge_bench.server import LocalServer

# Slider positions (percent of the first task's weight; the others share the rest equally): none is
# uniform or on the heat map's grid (multiples of 1/12), so the first pass asks for fresh preferences.
PAUSE_MS = 200
POSITIONS = (2, 7, 11, 14, 19, 23, 27, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 79, 89)

MOVE = """async (value) => {
  const slider = document.getElementById('range-0');
  const sections = ['tradeoff', 'predictions'].map(id => document.getElementById(id));
  const done = sections.map(section => new Promise(resolve => {
    const seen = new MutationObserver(() => {
      if (section.getAttribute('aria-busy') === 'false') {
        seen.disconnect();
        requestAnimationFrame(() => resolve(performance.now()));
      }
    });
    seen.observe(section, {attributes: true, attributeFilter: ['aria-busy']});
  }));
  const start = performance.now();
  slider.value = String(value);
  slider.dispatchEvent(new Event('input', {bubbles: true}));
  const [tradeoff, predictions] = await Promise.all(done);
  return {tradeoff: tradeoff - start, predictions: predictions - start};
}"""


def moves(page: Page) -> dict[str, list[float]]:
    """One timed move per position, each PAUSE_MS after the previous one has settled."""
    times: dict[str, list[float]] = {"tradeoff": [], "predictions": []}
    for value in POSITIONS:
        page.wait_for_timeout(PAUSE_MS)
        result = page.evaluate(MOVE, value)
        for view, ms in result.items():
            times[view].append(ms)
    return times


def summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 1),
            "p90_ms": round(statistics.quantiles(ms, n=10, method="inclusive")[-1], 1), "moves": len(ms)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(".cache/bundles/tiny"), help="bundle to serve")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"cannot run the browser benchmark: {reason}", file=sys.stderr)
        return 1
    with LocalServer(args.bundle, None, "--device", "cpu") as server, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        open_playground(page, server.url)  # the heat map's requests are done before the first move
        fresh = moves(page)
        cached = moves(page)
        browser.close()
    results = {f"{kind} {view}": summary(times[view])
               for kind, times in (("fresh", fresh), ("cached", cached)) for view in ("tradeoff", "predictions")}
    print(f"slider move -> updated view, {len(POSITIONS)} moves each, bundle {args.bundle}")
    print(f"{'case':<22}{'median ms':>10}{'p90 ms':>10}")
    for name, row in results.items():
        print(f"{name:<22}{row['median_ms']:>10.1f}{row['p90_ms']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
