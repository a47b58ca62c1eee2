"""`reprmerge build`: experts (trained or cached), merge, statistics and beta, written as one bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from reprmerge_cli import HELP
from reprmerge_cli.args import beta_value, json_value, pair, prior_value, unique, weights
from reprmerge_core.choices import MERGE_METHODS
from reprmerge_core.data import SUITES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help=HELP["build"])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", choices=sorted(SUITES), help="a built-in suite")
    which.add_argument("--tasks", help="comma-separated task names instead of a suite")
    which.add_argument("--config", type=Path, metavar="RECIPE.yaml",
                       help="your own base, experts, merge (or a mergekit file) and calibration inputs, in one YAML "
                            "file (see the README's Recipe section); takes only --out, --overwrite and --device")
    p.add_argument("--merge", default="ties", choices=sorted(MERGE_METHODS), help="merge method")
    p.add_argument("--set", type=pair, action="append", default=[], dest="params", metavar="KEY=VALUE",
                   help="a merge parameter (repeat), e.g. density=0.2")
    p.add_argument("--weight", type=pair, action="append", default=[], metavar="TASK=W",
                   help="scale TASK's task vector by W in the merge (repeat; default 1 each; data-free methods)")
    p.add_argument("--calibration-size", type=int, default=None, help="calibration inputs per task (default: the suite's)")
    p.add_argument("--beta", type=beta_value, default="auto",
                   help="correction strength, or 'auto' (chosen by k-fold CV)")
    p.add_argument("--prior", type=prior_value, default="auto",
                   help="prior of the correction: 'auto' (chosen with beta by k-fold CV), 'procrustes', "
                        "'identity' "
                        "or an identity weight in [0, 1] (a blend)")
    p.add_argument("--folds", type=int, default=5, help="folds of the beta cross-validation")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--cache-dir", type=Path, default=None, help="expert cache (default ~/.cache/reprmerge or $REPRMERGE_CACHE)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    p.set_defaults(func=run)


# Options a recipe sets itself, with their defaults: given with --config, they would be silently ignored.
_SUITE_ONLY = {"merge": "ties", "params": [], "calibration_size": None, "beta": "auto", "prior": "auto", "folds": 5,
               "cache_dir": None}


def _run_recipe(args: argparse.Namespace) -> int:
    from reprmerge_core.pipeline.recipe import build_from_recipe

    given = [f"--{k.replace('_', '-')}" for k, default in _SUITE_ONLY.items() if getattr(args, k) != default]
    if given:
        print(f"build failed: {', '.join(given)} cannot be combined with --config: set them in the recipe",
              file=sys.stderr)
        return 2
    try:
        path = build_from_recipe(args.config, args.out, overwrite=args.overwrite, device=args.device)
    except (ValueError, FileExistsError, FileNotFoundError, OSError) as exc:
        print(f"build failed: {args.config}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {path}; inspect it with `reprmerge inspect {path}`")
    return 0


def run(args: argparse.Namespace) -> int:
    from reprmerge_core.checks import check_task_names
    from reprmerge_core.pipeline import BuildConfig, build_bundle

    if args.config is not None:
        return _run_recipe(args)
    try:
        names = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
        config = BuildConfig(
            suite=args.suite or tuple(check_task_names(names or [], "--tasks")),
            merge=args.merge, merge_params={k: json_value(v) for k, v in unique(args.params, "--set").items()},
            merge_weights=weights(args.weight),
            calibration_size=args.calibration_size, beta=args.beta, prior=args.prior, folds=args.folds,
            device=args.device,
            cache_dir=args.cache_dir,
        )
        path = build_bundle(config, args.out, overwrite=args.overwrite)
    except (ValueError, ValidationError, FileExistsError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {path}; inspect it with `reprmerge inspect {path}`")
    return 0
