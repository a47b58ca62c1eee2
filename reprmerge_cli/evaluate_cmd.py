"""`reprmerge evaluate BUNDLE --out DIR`: report.md, report.json and plots of a bundle.

A bundle of a built-in suite is evaluated on the suite's test split against its cached experts; any
bundle on the user's labelled files (`--test TASK=FILE`), optionally against their expert checkpoints
(`--expert TASK=DIR`, read as `reprmerge calibrate` reads them). Both go through the same report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reprmerge_cli import HELP
from reprmerge_cli.args import checkpoints, pair, tasks
from reprmerge_core.bundle import BundleError

if TYPE_CHECKING:
    from reprmerge_core.bundle import Bundle
    from reprmerge_core.evaluation import EvaluationData, EvaluationInputs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help=HELP["evaluate"])
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--test", type=pair, action="append", default=[], metavar="TASK=FILE",
                   help="your labelled test data of a task, for every task of the bundle (repeat): CSV/TSV with a "
                   "header or JSON lines, optionally .gz, UTF-8; labels are the bundle's label names (or ids 0..K-1). Without --test, the "
                   "bundle must come from a built-in suite")
    p.add_argument("--text-column", default="text", help="column / JSON field of the text")
    p.add_argument("--label-column", default="label", help="column / JSON field of the label")
    p.add_argument("--expert", type=pair, action="append", default=[], metavar="TASK=DIR",
                   help="with --test: an expert checkpoint to compare with (head.safetensors or a "
                   "sequence-classification head), for every task or none (repeat)")
    p.add_argument("--base", type=Path, default=None,
                   help="with --test and --expert: the checkpoint the experts were fine-tuned from, for the "
                   "preference-weighted task-arithmetic baseline")
    p.add_argument("--edge", action="append", default=[], metavar="A:B",
                   help="a simplex edge to sweep from task A to task B (repeat; default every pair up to 4 tasks, "
                   "else each task to the next)")
    p.add_argument("--grid-steps", type=int, default=None, help="preference grid resolution (default 4 for <= 3 tasks, else 2)")
    p.add_argument("--no-baseline", action="store_true", help="skip preference-weighted task arithmetic (a forward pass per preference)")
    p.add_argument("--sweep-calibration", action="store_true",
                   help="built-in suites: also sweep the calibration size (one more statistics pass)")
    p.add_argument("--update-card", action="store_true",
                   help="also write the figures into the bundle's model card (README.md; not covered by its hashes)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="built-in suites: expert cache (default ~/.cache/reprmerge or $REPRMERGE_CACHE)")
    p.set_defaults(func=run)


def _edges(specs: list[str], names: list[str]) -> list[tuple[int, int]] | None:
    edges = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or a not in names or b not in names or a == b:
            raise ValueError(f"--edge {spec!r}: expected A:B with two different tasks of {names}")
        edges.append((names.index(a), names.index(b)))
    return edges or None


def _per_task(pairs: list[tuple[str, str]], option: str, names: list[str]) -> dict[str, str]:
    """NAME=VALUE pairs naming exactly the bundle's tasks."""
    given = tasks(pairs, option)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{option} names unknown tasks {unknown}; the bundle's tasks are {names}")
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(f"{option} is needed for every task of the bundle; missing {missing}")
    return given


def _user_data(args: argparse.Namespace, bundle: Bundle) -> EvaluationData:
    """The user's test files and expert checkpoints, checked against the bundle's tasks and labels."""
    from reprmerge_core.backbone import select_device
    from reprmerge_core.checks import checkpoint_dir
    from reprmerge_core.data.files import read_labelled
    from reprmerge_core.evaluation import CheckpointExpert, EvaluationData
    from reprmerge_core.experts import read_expert

    m = bundle.manifest
    if args.base is not None:
        checkpoint_dir(args.base, "--base")
    paths = checkpoints(args.expert, "--expert")  # every path checked before the test files are read
    files = _per_task(args.test, "--test", m.task_names)
    tests = [read_labelled(files[t.name], t.name, t.labels, text_field=args.text_column, label_field=args.label_column)
             for t in m.tasks]
    experts = None
    if args.expert:
        _per_task(args.expert, "--expert", m.task_names)
        experts = []
        for t in m.tasks:
            source = read_expert(t.name, paths[t.name], m.backbone.pooling)
            if source.labels != t.labels and source.labels != [str(i) for i in range(len(source.labels))]:
                raise ValueError(f"expert {t.name!r} ({paths[t.name]}): labels {source.labels} differ from the "
                                 f"bundle's {t.labels}")
            if source.pooling != m.backbone.pooling:
                raise ValueError(f"expert {t.name!r} ({paths[t.name]}): its head reads the {source.pooling} "
                                 f"representation; the bundle's backbone uses {m.backbone.pooling}")
            experts.append(CheckpointExpert(source.path, source.head, source.pooling, m.backbone.max_length,
                                            source.stage))
    return EvaluationData(tests, select_device(args.device), experts, args.base)


def run(args: argparse.Namespace) -> int:
    from reprmerge_core.backbone import select_device
    from reprmerge_core.bundle import load_bundle
    from reprmerge_core.data import load_suite
    from reprmerge_core.evaluation import EvaluationInputs, evaluate_bundle
    from reprmerge_core.evaluation.report import write_report
    from reprmerge_core.pipeline.build import suite_from_extra
    from reprmerge_core.training import train_experts

    try:
        bundle = load_bundle(args.bundle)
        edges = _edges(args.edge, bundle.task_names)
        if args.test:
            if args.base is not None and not args.expert:
                raise ValueError("--base (the task-arithmetic baseline) needs --expert for every task")
            if args.sweep_calibration:
                raise ValueError("--sweep-calibration needs a built-in suite's calibration split; not with --test")
            inputs: EvaluationInputs | EvaluationData = _user_data(args, bundle)
            baseline = args.base is not None and not args.no_baseline
        else:
            if args.expert or args.base is not None:
                raise ValueError("--expert and --base go with --test (your own data)")
            suite, recipe = suite_from_extra(bundle.manifest.extra)
            device = select_device(args.device)
            splits = load_suite(suite)
            experts = train_experts(splits, recipe, cache_dir=args.cache_dir, device=device)
            inputs = EvaluationInputs(splits, experts, device)
            baseline = not args.no_baseline
        report = evaluate_bundle(bundle, inputs, grid_steps=args.grid_steps, baseline=baseline,
                                 sweep_calibration=args.sweep_calibration, edges=edges)
    except (BundleError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"evaluate failed: {exc}", file=sys.stderr)
        return 2
    out = write_report(report, args.out)
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, report.json and plots")
    if args.update_card:
        from reprmerge_core.bundle.card import write_card

        try:
            print(f"updated the model card {write_card(bundle.path, bundle.manifest, report)}")
        except OSError as exc:  # e.g. a read-only bundle: the report itself is written
            print(f"evaluate: could not update the model card: {exc}", file=sys.stderr)
            return 2
    return 0
