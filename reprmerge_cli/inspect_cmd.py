"""`reprmerge inspect BUNDLE`: summary and validation result (exit 1 when invalid)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reprmerge_cli import HELP
from reprmerge_core.bundle import BundleError, check_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help=HELP["inspect"])
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def _recipe_lines(recorded: dict) -> list[str]:
    """What `build --config` was asked for (the recipe as validated, paths resolved) and from which file."""
    r = recorded["recipe"]
    how = (f"merge {r['merge']['method']} {json.dumps(r['merge']['parameters'], sort_keys=True)}" if r.get("merge")
           else f"mergekit file {r['mergekit']}" if r.get("mergekit") else f"already merged backbone {r['backbone']}")
    experts = ", ".join(f"{e['name']}={e['path']}" + ("" if e.get("weight") is None else f" (weight {e['weight']:g})")
                        for e in r["experts"])
    c = r["correction"]
    return [f"{recorded['file']} (sha256 {recorded['sha256'][:12]})", f"base {r.get('base')}; {how}",
            f"experts {experts}", "calibration " + ", ".join(f"{k}={v}" for k, v in r["calibration"].items()),
            f"beta {c['beta']}, prior {c['prior']}, folds {c['folds']}"]


def run(args: argparse.Namespace) -> int:
    try:
        bundle = check_bundle(args.bundle)  # every check of load_bundle, without torch
    except BundleError as exc:
        print(f"INVALID bundle {args.bundle}\n  {exc}", file=sys.stderr)
        return 1
    m = bundle.manifest
    if args.json:
        print(m.model_dump_json(indent=2))
        return 0
    c = m.correction
    print(f"bundle      {bundle.path}  (id {m.bundle_id}, format v{m.format_version}, reprmerge {m.library_version})")
    print(f"created     {m.created_at}")
    print(f"backbone    {m.backbone.source}  (pooling {m.backbone.pooling}, max_length {m.backbone.max_length}, d={m.representation_dim})")
    print(f"merge       {m.merge.method} {json.dumps(m.merge.parameters, sort_keys=True)}")
    agreement = m.extra.get("head_agreement")
    if agreement:
        print(f"agreement   {agreement['mean']:.3f} of calibration inputs get the expert's class from the merged "
              "backbone (label-free; " + ", ".join(f"{t} {v:.3f}" for t, v in agreement["per_task"].items()) + ")")
    recorded = m.extra.get("build_recipe")
    if recorded:
        for i, line in enumerate(_recipe_lines(recorded)):
            print(f"{'recipe' if i == 0 else '':<12}{line}")
    print(f"correction  beta={c.beta:g} normalisation={c.normalisation.value} prior={c.prior}")
    print("tasks")
    width = max(len(t.name) for t in m.tasks)
    for t in m.tasks:
        print(f"  {t.name:<{width}}  {t.calibration_samples:>6} calibration samples  labels: {', '.join(t.labels)}")
    check = m.expert_diagnostics
    if check is not None:
        worst = max((abs(p.max_row_cosine) for p in check.head_pairs), default=None)
        print("experts     " + ("" if worst is None else f"max head row cosine across tasks {worst:.3f}; ")
              + f"{len(check.warnings)} warning(s)")
        for message in check.warnings:
            print(f"  WARNING {message}")
    total = sum((bundle.path / f).stat().st_size for f in m.files)
    print(f"files       {len(m.files)} files, {total / 1e6:.1f} MB, sha256 verified")
    print("VALID")
    return 0
