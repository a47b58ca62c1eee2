"""`reprmerge bench serve`: serving throughput and latency (engine in-process, then over HTTP)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    s = kinds.add_parser("serve", help="engine and HTTP serving benchmark against the backbone-only ceiling")
    s.add_argument("--bundle", type=Path, help="bundle to serve (default: a synthetic one over the MiniLM backbone)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--batches", type=int, default=10, help="rounds: timed batches per engine case")
    s.add_argument("--http-seconds", type=float, default=15.0, help="duration of each HTTP load run (0 skips HTTP)")
    s.add_argument("--rate", type=float, default=0.0, help="open-loop request rate for HTTP (0: half the measured engine capacity)")
    s.add_argument("--solve-dtype", choices=["float64", "float32"], default="float32",
                   help="precision of head solves (the server's default: float32 with a float64 fallback)")
    s.add_argument("--out", type=Path, help="also write the results as JSON here")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.bench import run_benchmark  # heavy imports only for this command

    run_benchmark(args.bundle, batch_size=args.batch_size, batches=args.batches,
                  http_seconds=args.http_seconds, rate=args.rate, out=args.out, solve_dtype=args.solve_dtype)
    return 0
