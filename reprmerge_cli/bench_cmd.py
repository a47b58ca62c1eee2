"""`reprmerge bench serve`: serving throughput and latency (engine in-process, then over HTTP)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reprmerge_cli import HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=HELP["bench"])
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    s = kinds.add_parser("serve", help="engine and HTTP serving benchmark against the backbone-only ceiling")
    s.add_argument("--bundle", type=Path, help="bundle to serve (default: a synthetic one over the MiniLM backbone)")
    s.add_argument("--batch-size", type=int, default=32, help="texts per backbone pass (also the server's max)")
    s.add_argument("--batches", type=int, default=10, help="rounds: timed batches per engine case")
    s.add_argument("--http-seconds", type=float, default=15.0, help="duration of each HTTP load run (0 skips HTTP)")
    s.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                   help="closed-loop load generator (auto: wrk when installed); open loops always use the Python one")
    s.add_argument("--connections", type=int, default=0,
                   help="connections of the saturating closed loop (0: 4 x batch size / texts per request, at least 8)")
    s.add_argument("--device", default="cpu", help="cpu or cuda, for the engine cases and the server")
    s.add_argument("--solve-dtype", choices=["float64", "float32"], default="float32",
                   help="precision of head solves (float32 falls back to float64 where ill-conditioned, as the "
                   "server does)")
    s.add_argument("--server-log", type=Path, help="server log file (default: a temporary file, kept on failure)")
    s.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 3 s per HTTP run")
    s.add_argument("--out", type=Path, help="also write the results as JSON here")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reprmerge_bench.serve import run_benchmark  # heavy imports only for this command

    if args.quick:
        args.batches, args.http_seconds = min(args.batches, 3), min(args.http_seconds, 3.0)
    results = run_benchmark(args.bundle, batch_size=args.batch_size, batches=args.batches,
                            http_seconds=args.http_seconds, out=args.out, solve_dtype=args.solve_dtype,
                            generator=args.loadgen, connections=args.connections, server_log=args.server_log,
                            device=args.device)
    return 1 if "http_error" in results else 0
