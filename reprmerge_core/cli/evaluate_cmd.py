"""`reprmerge evaluate BUNDLE --out DIR`: report.md, report.json and plots of a built bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reprmerge_core.backbone import select_device
from reprmerge_core.bundle import BundleError, load_bundle
from reprmerge_core.data import load_suite
from reprmerge_core.evaluation import EvaluationInputs, evaluate_bundle
from reprmerge_core.evaluation.report import write_report
from reprmerge_core.pipeline.build import suite_from_extra
from reprmerge_core.training import train_experts


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a bundle built from a built-in suite")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--grid-steps", type=int, default=None, help="preference grid resolution (default 4 for <= 3 tasks, else 2)")
    p.add_argument("--no-baseline", action="store_true", help="skip preference-weighted task arithmetic (a forward pass per preference)")
    p.add_argument("--sweep-calibration", action="store_true", help="also sweep the calibration size (one more statistics pass)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle)
        suite, recipe = suite_from_extra(bundle.manifest.extra)
    except (BundleError, ValueError) as exc:
        print(f"evaluate failed: {exc}", file=sys.stderr)
        return 2
    device = select_device(args.device)
    splits = load_suite(suite)
    experts = train_experts(splits, recipe, cache_dir=args.cache_dir, device=device)
    report = evaluate_bundle(bundle, EvaluationInputs(splits, experts, device), grid_steps=args.grid_steps,
                             baseline=not args.no_baseline, sweep_calibration=args.sweep_calibration)
    out = write_report(report, args.out)
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, report.json and plots")
    return 0
