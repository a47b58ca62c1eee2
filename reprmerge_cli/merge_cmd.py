"""`reprmerge merge`: merge expert checkpoints into the base backbone and write a loadable checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reprmerge_cli import HELP
from reprmerge_cli.args import checkpoints, json_value, pair, tasks, unique, weights
from reprmerge_core.choices import MERGE_METHODS
from reprmerge_core.data.files import FORMATS

if TYPE_CHECKING:
    from torch import Tensor


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help=HELP["merge"])
    p.add_argument("--base", type=Path, required=True, help="base checkpoint directory")
    p.add_argument(
        "--expert",
        type=pair,
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="an expert checkpoint (repeat); its head (head.safetensors or a classifier) is only checked for "
        "alignment with the other experts' heads",
    )
    p.add_argument("--method", required=True, choices=sorted(MERGE_METHODS), help="merge method")
    p.add_argument(
        "--set",
        type=pair,
        action="append",
        default=[],
        dest="params",
        metavar="KEY=VALUE",
        help="a method parameter (repeat), e.g. lambda=0.3, density=0.2, basis=eigen",
    )
    p.add_argument(
        "--weight",
        type=pair,
        action="append",
        default=[],
        metavar="NAME=W",
        help="scale expert NAME's task vector by W (repeat; default 1 each; data-free methods), e.g. a "
        "preference: theta_0 + lambda * sum_k W_k tau_k",
    )
    p.add_argument(
        "--calibration",
        type=pair,
        action="append",
        default=[],
        metavar="NAME=FILE",
        help=f"unlabeled inputs of an expert's task (repeat): {FORMATS}; UTF-8",
    )
    p.add_argument("--text-column", default="text", help="column / JSON field of the text in CSV, TSV and JSON lines")
    p.add_argument("--out", type=Path, required=True,
                   help="output checkpoint directory (never the base or an expert; written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--force", action="store_true",
                   help="merge an expert even when it is far from the base (refused by default: most likely not "
                   "fine-tuned from it)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="calibration inputs per forward pass (data-aware methods)")
    p.add_argument("--max-length", type=int, default=128, help="longest calibration input in tokens (longer ones "
                   "are truncated)")
    p.set_defaults(func=run)


def _heads(experts: dict[str, Path]) -> dict[str, Tensor]:
    """Head weights of the experts that have one (an encoder alone is merged without the head check)."""
    from reprmerge_core.experts import has_head, read_expert

    return {name: read_expert(name, path, "mean").head.weight for name, path in experts.items() if has_head(path)}


def run(args: argparse.Namespace) -> int:
    from reprmerge_core.checks import checkpoint_dir
    from reprmerge_core.data.files import read_texts
    from reprmerge_core.merging import REPORT_FILE, merge_checkpoints
    from reprmerge_core.merging.checkpoints import check_merge_output

    try:
        checkpoint_dir(args.base, "--base")
        experts = checkpoints(args.expert, "--expert")
        check_merge_output(args.out, args.base, experts, overwrite=args.overwrite)  # before reading anything
        params = {key: json_value(value) for key, value in unique(args.params, "--set").items()}
        expert_weights = weights(args.weight)
        files = tasks(args.calibration, "--calibration")
        texts = {name: read_texts(path, args.text_column) for name, path in files.items()} or None
        heads = _heads(experts)
        result = merge_checkpoints(
            args.base,
            experts,
            args.method,
            params,
            texts,
            args.out,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=True,
            heads=heads,
            overwrite=args.overwrite,
            weights=expert_weights,
            force=args.force,
        )
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"merge failed: {exc}", file=sys.stderr)
        return 2
    report = result.report
    rho = "" if report.rho is None else f", rho {report.rho:.4f} over {len(report.layers)} linear layers"
    print(
        f"merged {len(experts)} experts with {args.method} {json.dumps(report.params, sort_keys=True)}, weights "
        + ", ".join(f"{task} {w:g}" for task, w in report.weights.items())
        + f"{rho}: {len(report.merged_parameters)} parameters merged, {len(report.base_parameters)} kept at the base"
    )
    check = report.expert_diagnostics
    if check is not None and check.warnings:
        print(f"WARNING: {len(check.warnings)} expert check(s) failed "
              f"(see above and expert_diagnostics in {REPORT_FILE})")
    print(f"wrote {args.out} ({REPORT_FILE}; " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()) + ")")
    return 0
