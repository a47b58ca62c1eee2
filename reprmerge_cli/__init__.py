"""The `reprmerge` command line: one module per subcommand, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from reprmerge_core import __version__
from reprmerge_cli import (
    bench_cmd,
    build_cmd,
    calibrate_cmd,
    evaluate_cmd,
    inspect_cmd,
    merge_cmd,
    reduce_cmd,
    serve_cmd,
)

COMMANDS = (build_cmd, calibrate_cmd, reduce_cmd, evaluate_cmd, inspect_cmd, merge_cmd, serve_cmd, bench_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reprmerge", description="Merge task experts and serve per-request trade-offs.")
    parser.add_argument("--version", action="version", version=f"reprmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Every model comes from a local directory; an accidental hub call must fail fast, not hang.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
