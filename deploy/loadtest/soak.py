"""A bounded soak: one open-loop scenario for a few minutes on loopback, sampling the server's memory.

Shows whether resident memory stays flat (the head cache is bounded by bytes, the queue by count)
and whether errors grow over time. Writes soak.json and soak.png; prints the figures.

    .venv/bin/python deploy/loadtest/soak.py --bundle .cache/bundles/tiny --seconds 150 --out runs/soak
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gevent
import numpy as np
from run import locust_options, run_scenario

from reprmerge_bench.server import LocalServer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/soak"))
    p.add_argument("--seconds", type=float, default=150, help="length of the soak (bounded: at most 900)")
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--distinct", type=int, default=10000, help="Zipf mix over this many preferences: cache churn")
    p.add_argument("--every", type=float, default=5, help="seconds between samples")
    args = p.parse_args()
    if not 0 < args.seconds <= 900:
        p.error("--seconds must be in (0, 900]")
    args.out.mkdir(parents=True, exist_ok=True)
    options = locust_options(["--rate", str(args.rate), "--mix", "zipf", "--distinct", str(args.distinct)])
    rows: list[dict[str, float]] = []
    with LocalServer(args.bundle, args.out / "server.log", "--device", "cpu", "--log-level", "warning") as server:
        start = time.monotonic()

        def sample() -> None:
            while True:
                m = server.metrics()
                ok = sum(v for k, v in m.items() if k.startswith('reprmerge_requests_total{') and 'code="200"' in k
                         and "/v1/predict" in k)
                failed = sum(v for k, v in m.items() if k.startswith("reprmerge_requests_total{") and "/v1/predict" in k
                             and 'code="200"' not in k)
                rows.append({"t": time.monotonic() - start, "rss_mb": server.rss_bytes() / 2**20, "ok": ok,
                             "errors": failed,
                             "cache_mb": m.get("reprmerge_head_cache_bytes", 0.0) / 2**20,
                             "cache_entries": m.get("reprmerge_head_cache_entries", 0.0)})
                gevent.sleep(args.every)

        sampler = gevent.spawn(sample)
        samples, elapsed = run_scenario(server.url, options, args.seconds)
        sampler.kill()
    t = np.array([r["t"] for r in rows])
    rss = np.array([r["rss_mb"] for r in rows])
    half = t >= t[-1] / 2  # after warm-up and cache fill
    slope = float(np.polyfit(t[half], rss[half], 1)[0] * 60) if half.sum() >= 2 else float("nan")
    errors = [int(r["errors"]) for r in rows]
    summary = {
        "seconds": elapsed, "rate": args.rate, "distinct": args.distinct, "sent": len(samples),
        "ok": sum(s.status == 200 for s in samples), "client_failures": sum(s.status != 200 for s in samples),
        "rss_mb": {"first": rss[0], "min": rss.min(), "max": rss.max(), "last": rss[-1],
                   "second_half_slope_mb_per_min": slope},
        "server_errors": {"first": errors[0], "last": errors[-1]},
        "p99_ms_by_third": [float(np.percentile(chunk, 99)) if chunk.size else float("nan") for chunk in np.array_split(
            np.array([s.latency_ms for s in samples if s.status == 200]), 3)],
        "samples": rows,
    }
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2, default=float))
    plot(args.out, rows)
    r = summary["rss_mb"]
    print(f"soak {elapsed:.0f} s at {args.rate:g} req/s (Zipf over {args.distinct}): "
          f"{summary['ok']}/{summary['sent']} ok, server errors {errors[0]} -> {errors[-1]}")
    print(f"RSS MB: first {r['first']:.1f}, min {r['min']:.1f}, max {r['max']:.1f}, last {r['last']:.1f}; "
          f"second-half slope {slope:+.2f} MB/min; p99 by third (ms): "
          + ", ".join(f"{x:.1f}" for x in summary["p99_ms_by_third"]))
    print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.png'}")


def plot(out: Path, rows: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [r["rss_mb"] for r in rows], "o-", label="server RSS")
    top.plot(t, [r["cache_mb"] for r in rows], "s-", label="head cache bytes")
    top.set_ylabel("MB")
    top.legend()
    top.set_title("Soak: memory and errors over time")
    bottom.plot(t, [r["ok"] for r in rows], label="200s (cumulative)")
    bottom.plot(t, [r["errors"] for r in rows], label="non-200s (cumulative)")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("requests")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
