"""`reprmerge reduce SHARD... --out BUNDLE`: add the shard files of `reprmerge calibrate --shard I/N` into a bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reprmerge_cli import HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reduce", help=HELP["reduce"])
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD", help="every shard file 0..N-1 of one calibration")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--backbone", type=Path, default=None,
                   help="the merged backbone, where it is not at the path the shards recorded (its content must match)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reprmerge_core.pipeline.shards import reduce_shards

    try:
        path = reduce_shards(args.shards, args.out, backbone=args.backbone, overwrite=args.overwrite)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"reduce failed: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {path} from {len(args.shards)} shards; inspect it with `reprmerge inspect {path}`")
    return 0
