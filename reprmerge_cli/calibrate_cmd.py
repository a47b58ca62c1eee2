"""`reprmerge calibrate`: a bundle from your own merged backbone, expert checkpoints and unlabeled inputs.

With `--shard I/N` it writes the statistics of one shard (inputs i with i mod N == I) to the file
`--out`; `reprmerge reduce` adds the N shard files into the bundle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reprmerge_cli import HELP
from reprmerge_cli.args import beta_value, checkpoints, pair, prior_value, tasks
from reprmerge_core.choices import POOLINGS
from reprmerge_core.data.files import FORMATS

if TYPE_CHECKING:
    from reprmerge_core.pipeline.shards import ShardSpec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help=HELP["calibrate"])
    p.add_argument("--backbone", type=Path, required=True, help="the merged backbone checkpoint directory")
    p.add_argument("--base", type=Path, default=None,
                   help="the checkpoint the experts were fine-tuned from: adds each expert's distance from it "
                   "to the checks")
    p.add_argument("--expert", type=pair, action="append", required=True, metavar="NAME=DIR",
                   help="an expert checkpoint (a local safetensors folder) with head.safetensors or a supported "
                   "sequence classifier: BERT, RoBERTa, DistilBERT, DeBERTa-v2 (repeat)")
    p.add_argument("--calibration", type=pair, action="append", required=True, metavar="NAME=FILE",
                   help=f"unlabeled inputs of a task (repeat): {FORMATS}; UTF-8. More inputs than the "
                   "representation has dimensions, or the statistics are not full rank")
    p.add_argument("--text-column", default="text", help="column / JSON field of the text in CSV, TSV and JSON lines")
    p.add_argument("--out", type=Path, required=True, help="bundle directory (with --shard: the shard file)")
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="compute only shard I of N (inputs i with i mod N == I); add shards with `reprmerge reduce`")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="representation for head.safetensors experts")
    p.add_argument("--max-length", type=int, default=128, help="longest input in tokens (longer ones are truncated)")
    p.add_argument("--beta", type=beta_value, default="auto",
                   help="correction strength, or 'auto' (chosen by k-fold CV)")
    p.add_argument("--prior", type=prior_value, default="auto",
                   help="prior of the correction: 'auto' (chosen with beta by k-fold CV), 'procrustes', "
                        "'identity' "
                        "or an identity weight in [0, 1] (a blend)")
    p.add_argument("--folds", type=int, default=5, help="folds of the beta cross-validation")
    p.add_argument("--merge-method", default="unknown",
                   help="recorded in the manifest when the backbone has no merge_report.json (reprmerge merge "
                        "writes one; its method, parameters and weights are recorded instead)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    p.add_argument("--force", action="store_true",
                   help="use an expert even when it is far from --base (refused by default: most likely not "
                   "fine-tuned from it)")
    p.set_defaults(func=run)


def _shard(text: str) -> ShardSpec:
    from reprmerge_core.pipeline.shards import ShardSpec

    try:
        return ShardSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from reprmerge_core.checks import checkpoint_dir
    from reprmerge_core.data.files import read_texts
    from reprmerge_core.pipeline.calibrate import calibrate_bundle

    try:
        checkpoint_dir(args.backbone, "--backbone")
        if args.base is not None:
            checkpoint_dir(args.base, "--base")
        experts = checkpoints(args.expert, "--expert")
        files = tasks(args.calibration, "--calibration")
        calibration = {name: read_texts(path, args.text_column) for name, path in files.items()}
        path = calibrate_bundle(args.backbone, experts, calibration, args.out, shard=args.shard, pooling=args.pooling,
                                max_length=args.max_length, beta=args.beta, prior=args.prior, folds=args.folds,
                                merge_method=args.merge_method, device=args.device, overwrite=args.overwrite,
                                base=args.base, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"calibrate failed: {exc}", file=sys.stderr)
        return 2
    if args.shard is not None:
        print(f"wrote shard {args.shard.index}/{args.shard.count} to {path}; add all {args.shard.count} with `reprmerge reduce`")
    else:
        print(f"wrote bundle {path}; inspect it with `reprmerge inspect {path}`")
    return 0
