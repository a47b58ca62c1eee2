"""`reprmerge calibrate`: a bundle from your own merged backbone, expert checkpoints and unlabeled inputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reprmerge_core.backbone import POOLINGS
from reprmerge_core.cli.build_cmd import _beta
from reprmerge_core.cli.merge_cmd import _pair, _unique
from reprmerge_core.merging import read_texts
from reprmerge_core.pipeline.calibrate import calibrate_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="build a bundle from your own checkpoints")
    p.add_argument("--backbone", type=Path, required=True, help="the merged backbone checkpoint directory")
    p.add_argument("--expert", type=_pair, action="append", required=True, metavar="NAME=DIR",
                   help="an expert checkpoint with head.safetensors or a sequence-classification head (repeat)")
    p.add_argument("--calibration", type=_pair, action="append", required=True, metavar="NAME=FILE",
                   help="unlabeled inputs of a task: plain text (one per line) or JSON lines with \"text\" (repeat)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="representation for head.safetensors experts")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--beta", type=_beta, default="auto")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--merge-method", default="unknown", help="recorded in the manifest")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        experts = _unique(args.expert, "--expert")
        calibration = {name: read_texts(path) for name, path in _unique(args.calibration, "--calibration").items()}
        path = calibrate_bundle(args.backbone, experts, calibration, args.out, pooling=args.pooling,
                                max_length=args.max_length, beta=args.beta, folds=args.folds,
                                merge_method=args.merge_method, device=args.device, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"calibrate failed: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {path}; inspect it with `reprmerge inspect {path}`")
    return 0
