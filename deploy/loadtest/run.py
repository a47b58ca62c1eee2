"""`make loadtest`: open-loop scenarios (locustfile.py) against a local `reprmerge serve`, with a report.

Starts the service on a free loopback port, runs each scenario for a bounded time at a fixed
arrival rate, and writes report.md, report.json and PNG plots: p50/p95/p99 (from each request's
scheduled arrival, see locustfile.py), throughput, goodput within a latency SLO, and from /metrics
deltas the head-cache hit rate, distinct heads and texts per batch, and rejections by reason.
Scenarios: one-hot preferences, fresh Dirichlet draws, and a Zipf mix swept over the number of
distinct preferences (1 to 10^4).

    .venv/bin/python deploy/loadtest/run.py --bundle .cache/bundles/tiny --out runs/loadtest
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import configargparse
import gevent
import numpy as np
from locust.env import Environment
from locustfile import SCHEDULED, OpenLoopUser, add_options

from reprmerge_bench.server import LocalServer

SWEEP = (1, 10, 100, 1000, 10000)


@dataclass
class Sample:
    """One arrival: latency from its scheduled time, the client's send lag, the HTTP status (0: none)."""

    latency_ms: float
    lag_ms: float
    status: int


@dataclass
class ScenarioResult:
    name: str
    mix: str
    distinct: int | None
    offered_rps: float
    seconds: float
    sent: int
    ok: int
    throughput_rps: float
    goodput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    client_lag_p99_ms: float
    cache_hit_rate: float
    heads_per_batch: float
    texts_per_batch: float
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)


def locust_options(args: Sequence[str]) -> argparse.Namespace:
    """The locustfile's options (its defaults, then `args`), as Locust would parse them."""
    parser = configargparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args(list(args))


def run_scenario(url: str, options: argparse.Namespace, seconds: float) -> tuple[list[Sample], float]:
    """Arrivals for `seconds`, then the drain of open requests; the samples and the wall time."""
    env = Environment(user_classes=[OpenLoopUser], host=url, parsed_options=options)
    samples: list[Sample] = []

    def record(name: str, response_time: float, context: dict[str, float], **_: object) -> None:
        if name == SCHEDULED:
            samples.append(Sample(response_time, context.get("lag_ms", 0.0), int(context.get("status", 0))))

    env.events.request.add_listener(record)
    runner = env.create_local_runner()
    start = time.perf_counter()
    runner.start(1, spawn_rate=1)
    gevent.sleep(seconds)
    runner.stop()  # on_stop drains the requests still open
    runner.quit()
    return samples, time.perf_counter() - start


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k == name or k.startswith(name + "{"))


def summarise(name: str, options: argparse.Namespace, samples: list[Sample], elapsed: float,
              before: dict[str, float], after: dict[str, float], slo_ms: float) -> ScenarioResult:
    ok = np.array([s.latency_ms for s in samples if s.status == 200])
    pct = (lambda q: float(np.percentile(ok, q))) if ok.size else (lambda q: math.nan)
    errors: dict[str, int] = {}
    for s in samples:
        if s.status != 200:
            key = f"HTTP {s.status}" if s.status else "no response"
            errors[key] = errors.get(key, 0) + 1
    for series in after:
        if series.startswith("reprmerge_rejections_total{"):
            reason = re.search(r'reason="([^"]+)"', series)
            count = int(_delta(before, after, series))
            if reason and count:
                errors[f"rejected: {reason.group(1)}"] = count
    hits, misses = _delta(before, after, "reprmerge_head_cache_hits_total"), _delta(before, after,
                                                                                    "reprmerge_head_cache_misses_total")
    batches = _delta(before, after, "reprmerge_batch_size_count")
    return ScenarioResult(
        name=name, mix=options.mix, distinct=options.distinct if options.mix == "zipf" else None,
        offered_rps=options.rate, seconds=elapsed, sent=len(samples), ok=int(ok.size),
        throughput_rps=ok.size / elapsed, goodput_rps=float((ok <= slo_ms).sum()) / elapsed,
        p50_ms=pct(50), p95_ms=pct(95), p99_ms=pct(99), max_ms=float(ok.max()) if ok.size else math.nan,
        client_lag_p99_ms=float(np.percentile([s.lag_ms for s in samples], 99)) if samples else math.nan,
        cache_hit_rate=hits / (hits + misses) if hits + misses else math.nan,
        heads_per_batch=_delta(before, after, "reprmerge_batch_distinct_heads_sum") / batches if batches else math.nan,
        texts_per_batch=_delta(before, after, "reprmerge_batch_size_sum") / batches if batches else math.nan,
        errors=errors, latencies_ms=ok.tolist(),
    )


def scenarios(sweep: Sequence[int]) -> list[tuple[str, list[str]]]:
    return [("one-hot", ["--mix", "onehot"]),
            *[(f"zipf, {d} distinct", ["--mix", "zipf", "--distinct", str(d)]) for d in sweep],
            ("fresh Dirichlet", ["--mix", "dirichlet"])]


def write_report(out: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(
        {"meta": meta,
         "scenarios": [{k: v for k, v in asdict(r).items() if k != "latencies_ms"} for r in results]}, indent=2))
    slo = meta["slo_ms"]
    lines = [
        "# reprmerge load test", "",
        (f"Open loop, {meta['arrivals']} arrivals at {meta['rate']:g} req/s, {meta['texts_per_request']} text(s) "
         f"per request, {meta['seconds']:g} s per scenario, bundle `{meta['bundle']}`, server flags "
         f"`{' '.join(meta['server_flags']) or '(defaults)'}`. Latency runs from each request's scheduled arrival "
         f"(no coordinated omission); goodput counts 200s within the {slo:g} ms SLO; hit rate and per-batch figures "
         "are /metrics deltas."), "",
        ("| scenario | sent | ok | req/s | goodput | p50 ms | p95 ms | p99 ms | hit rate | heads/batch | texts/batch "
         "| client lag p99 ms | errors |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "-"
        lines.append(f"| {r.name} | {r.sent} | {r.ok} | {r.throughput_rps:.1f} | {r.goodput_rps:.1f} | "
                     f"{r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.cache_hit_rate:.3f} | "
                     f"{r.heads_per_batch:.2f} | {r.texts_per_batch:.2f} | {r.client_lag_p99_ms:.1f} | {errors} |")
    lines += ["", "![latency by scenario](latency.png)", "", "![distinct-preference sweep](sweep.png)", "",
              "![latency CDF](cdf.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, results, slo)


def plot(out: Path, results: list[ScenarioResult], slo_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(results))
    for i, (q, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        ax.bar(x + (i - 1) * 0.27, [getattr(r, q) for r in results], 0.27, label=label)
    ax.axhline(slo_ms, color="k", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    ax.set_xticks(x, [r.name for r in results], rotation=20, ha="right")
    ax.set_ylabel("latency from scheduled arrival (ms)")
    ax.set_title("Latency percentiles by preference mix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)

    sweep = [r for r in results if r.distinct is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = [r.distinct for r in sweep if r.distinct is not None]
    ax.plot(d, [r.p50_ms for r in sweep], "o-", label="p50")
    ax.plot(d, [r.p99_ms for r in sweep], "s-", label="p99")
    ax.set_xscale("log")
    ax.set_xlabel("distinct preferences (Zipf mix)")
    ax.set_ylabel("latency (ms)")
    right = ax.twinx()
    right.plot(d, [r.cache_hit_rate for r in sweep], "^--", color="tab:green", label="head-cache hit rate")
    right.set_ylim(0, 1.05)
    right.set_ylabel("head-cache hit rate")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="center left")
    ax.set_title("Sweep of distinct preferences")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.latencies_ms:
            lat = np.sort(r.latencies_ms)
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=r.name)
    ax.axvline(slo_ms, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("latency from scheduled arrival (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cdf.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/loadtest"))
    p.add_argument("--seconds", type=float, default=15, help="arrival time per scenario")
    p.add_argument("--rate", type=float, default=20, help="arrivals per second")
    p.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--slo-ms", type=float, default=250)
    p.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")], default=list(SWEEP),
                   help="distinct preferences of the Zipf scenarios, comma-separated")
    p.add_argument("--server-flag", action="append", default=[], help="extra `reprmerge serve` flag (repeat)")
    args = p.parse_args()
    if args.seconds <= 0 or args.rate <= 0 or not all(d >= 1 for d in args.sweep):
        p.error("--seconds and --rate must be positive and every --sweep value >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--rate", str(args.rate), "--arrivals", args.arrivals, "--texts-per-request", str(args.texts_per_request)]
    flags = ["--device", "cpu", "--log-level", "warning", *args.server_flag]
    results = []
    with LocalServer(args.bundle, args.out / "server.log", *flags) as server:
        # a warm-up, not reported
        run_scenario(server.url, locust_options([*common, "--mix", "dirichlet", "--seed", "1"]), 3)
        for name, extra in scenarios(args.sweep):
            options = locust_options([*common, *extra])
            before = server.metrics()
            samples, elapsed = run_scenario(server.url, options, args.seconds)
            results.append(summarise(name, options, samples, elapsed, before, server.metrics(), args.slo_ms))
            r = results[-1]
            print(f"{name:<24} ok {r.ok}/{r.sent}  {r.throughput_rps:6.1f} req/s  p50 {r.p50_ms:7.1f}  "
                  f"p99 {r.p99_ms:7.1f} ms  hit rate {r.cache_hit_rate:.3f}", flush=True)
    meta = {"bundle": str(args.bundle), "rate": args.rate, "arrivals": args.arrivals, "seconds": args.seconds,
            "texts_per_request": args.texts_per_request, "slo_ms": args.slo_ms, "server_flags": flags}
    write_report(args.out, results, meta)
    print(f"report: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
