"""`reprmerge inspect BUNDLE`: summary and validation result (exit 1 when invalid)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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
    weights = ", ".join(f"{task} {w:g}" for task, w in m.merge.weights.items())
    print(f"merge       {m.merge.method} {json.dumps(m.merge.parameters, sort_keys=True)}"
          + (f"  weights: {weights}" if weights else ""))
    rho = _rho(bundle.path, m.extra)
    if rho is not None:
        print(f"  rho       {rho:.3f}: share of the experts' changes to layer outputs on calibration inputs that the "
              "merged\n            weights reproduce (1: all of it, 0: no better than the base)")
    agreement = m.extra.get("head_agreement")
    if agreement:
        print(f"agreement   {agreement['mean']:.3f} of calibration inputs get the expert's class from the merged "
              "backbone (label-free; " + ", ".join(f"{t} {v:.3f}" for t, v in agreement["per_task"].items()) + ")")
    recorded = m.extra.get("build_recipe")
    if recorded:
        for i, line in enumerate(_recipe_lines(recorded)):
            print(f"{'recipe' if i == 0 else '':<12}{line}")
    print(f"correction  beta={c.beta:g} normalisation={c.normalisation.value} prior={c.prior}")
    for line in _beta_lines(c.beta, c.beta_selection):
        print(f"  {line}")
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
    print("trade-off   a preference p gets W_p; `/v1/tradeoff` gives each task's loss L_t(W_p), its `best` (at its own "
          "one-hot)\n            and `uncorrected` (W = I) loss; "
          "quality_kept = (uncorrected - loss) / (uncorrected - best)")
    total = sum((bundle.path / f).stat().st_size for f in m.files)
    print(f"files       {len(m.files)} files, {total / 1e6:.1f} MB, sha256 verified")
    print("VALID")
    return 0


def _rho(path: Path, extra: dict[str, Any]) -> float | None:
    """The whole-model rho of a data-aware merge: from a built bundle's record, or the merge report that
    `reprmerge merge` wrote beside the backbone (None for data-free merges, which measure none)."""
    report = extra.get("merge_report")
    file = path / "backbone" / "merge_report.json"
    if report is None and file.is_file():
        report = json.loads(file.read_text())
    return report.get("rho") if isinstance(report, dict) else None


def _beta_lines(beta: float, selection: dict[str, Any] | None) -> list[str]:
    """What beta means and, when cross-validated, what it scored."""
    lines = ["beta      the ridge of each task's correction W, which minimises |W z_m - z_e|^2 over the calibration",
             "          inputs + beta |W - O_t|^2: small fits the statistics, large keeps W near the prior O_t",
             "          (statistics are energy-normalised, so one beta suits every task)"]
    if selection and beta in selection.get("candidates", []):
        i = selection["candidates"].index(beta)
        losses = f"{selection['one_hot'][i]:.3f} at one-hot, {selection['equal'][i]:.3f} at equal preference"
        lines.append(f"          chosen by {selection['folds']}-fold CV: held-out relative loss {losses} (lower is better)")
    return lines
