"""The `reprmerge` command line: one module per subcommand, each exposing `register(subparsers)` and `run(args)`.

A package above `reprmerge_core` (the library) and `service` (the web service) so the library never imports
either layer above it (tests/test_layering.py). Subcommands load lazily: `COMMANDS` is the one home of their
names and one-line help; `main` imports only the chosen subcommand's module (whose heavy imports wait for its
`run`), so `reprmerge --help` and `reprmerge inspect` start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from reprmerge_cli.args import Parser
from reprmerge_core import __version__

# (name, module under reprmerge_cli, one-line help), in the order `reprmerge --help` lists them.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("build", "build_cmd", "build a bundle from a built-in suite of real tasks, or from your recipe file"),
    ("calibrate", "calibrate_cmd", "build a bundle from your own checkpoints"),
    ("reduce", "reduce_cmd", "add calibration shards (calibrate --shard I/N) into one bundle"),
    ("evaluate", "evaluate_cmd", "evaluate a bundle on a built-in suite or on your own labelled data"),
    ("inspect", "inspect_cmd", "summarise and validate a bundle"),
    ("merge", "merge_cmd", "merge expert checkpoints into the base backbone"),
    ("export", "export_cmd", "write one fixed trade-off of a bundle as a standalone ONNX model"),
    ("serve", "serve_cmd", "serve a bundle over HTTP (/v1 and Open Inference Protocol /v2)"),
    ("bench", "bench_cmd", "benchmarks"),
)
HELP = {name: text for name, _, text in COMMANDS}


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s full options (its module imported) and every other subcommand help-only."""
    parser = Parser(prog="reprmerge", description="Merge task experts and serve per-request trade-offs.")
    parser.add_argument("--version", action="version", version=f"reprmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, text in COMMANDS:
        if name == command:
            importlib.import_module(f"reprmerge_cli.{module}").register(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its exit status. Ctrl-C ends any command with one line and 130 (128 + SIGINT), as a
    shell reports it; outputs are written atomically, so nothing half-written is left behind."""
    # Every model comes from a local directory; an accidental hub call must fail fast, not hang.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(_chosen(argv)).parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
