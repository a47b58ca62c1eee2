"""Which prior does label-free cross-validation choose for a built bundle, and what grid hypervolume does each
prior give?

Recollects the bundle's per-fold statistics (same calibration inputs and fold assignment as `reprmerge build`),
runs the joint beta / prior cross-validation, and evaluates ReACT on the preference grid with the chosen prior, the
identity prior and the Procrustes prior (the paper's), all at the cross-validated beta.

    nice -n 10 python benchmarks/bench_prior.py BUNDLE [--test N] [--out docs/results/prior/text6.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from reprmerge_core.backbone import Backbone
from reprmerge_core.bundle import load_bundle
from reprmerge_core.bundle.manifest import CorrectionInfo
from reprmerge_core.calibration import choose_correction, collect_statistics
from reprmerge_core.data import load_suite
from reprmerge_core.evaluation import EvaluationInputs, evaluate_bundle
from reprmerge_core.pipeline.build import suite_from_extra
from reprmerge_core.training import train_experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--test", type=int, default=None, help="test inputs per task (default: the suite's)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    suite, recipe = suite_from_extra(m.extra)
    splits = load_suite(suite)
    experts = train_experts(splits, recipe, device="cpu", progress=False)
    if args.test is not None:
        splits = [dataclasses.replace(s, test=s.test.subset(range(min(args.test, len(s.test.texts))))) for s in splits]
    merged = Backbone.from_pretrained(bundle.backbone_path, pooling=m.backbone.pooling,
                                      max_length=m.backbone.max_length,
                                      device="cpu")
    stats = collect_statistics(merged, [e.backbone(device="cpu") for e in experts],
                               [list(s.calibration) for s in splits],
                               folds=args.folds, progress=False)
    drift = max(float((x.B - s.B).abs().max() / s.B.abs().max()) for x, s in zip(stats.total, bundle.statistics,
                                                                                 strict=True))
    print(f"statistics recollected in {time.perf_counter() - started:.0f}s (max relative difference of B from the "
          f"bundle's: {drift:.1e})", flush=True)
    start = time.perf_counter()
    correction = CorrectionInfo.from_choice(choose_correction(stats.folds, "auto", m.correction.normalisation))
    select_seconds = time.perf_counter() - start
    chosen = dataclasses.replace(bundle, manifest=m.model_copy(update={"correction": correction}))
    report = evaluate_bundle(chosen, EvaluationInputs(splits, experts, torch.device("cpu")), baseline=False,
                             sweep_beta=False, progress=False)
    grid, sel = report["grid"], correction.prior_selection or {}
    result = {
        "bundle_id": m.bundle_id, "tasks": m.task_names, "test_per_task": [len(s.test.texts) for s in splits],
        "bundle_beta": m.correction.beta, "bundle_identity_weight": m.correction.identity_weight,
        "cv_beta": correction.beta, "cv_identity_weight": correction.identity_weight,
        "cv_curve": {"identity_weight": sel.get("candidates"), "score": sel.get("score"), "beta": sel.get("beta")},
        "selection_seconds": select_seconds,
        "hypervolume": {"chosen": grid["react"]["hypervolume"],
                        "identity": grid["ablation_identity_prior"]["hypervolume"],
                        "procrustes": grid["ablation_procrustes_prior"]["hypervolume"]},
        "grid_mean_normalised": {"chosen": grid["react"]["mean_normalised"],
                                 "identity": grid["ablation_identity_prior"]["mean_normalised"],
                                 "procrustes": grid["ablation_procrustes_prior"]["mean_normalised"]},
        "equal_mean_normalised": report["scenarios"]["equal"]["mean_normalised"],
        "one_hot_mean_normalised": report["one_hot"]["mean_normalised"],
        "seconds": time.perf_counter() - started,
    }
    print(f"CV choice: identity weight {correction.identity_weight:g} at beta {correction.beta:g} "
          f"(bundle: {m.correction.prior} at beta {m.correction.beta:g}); selection {select_seconds:.1f}s")
    print("CV score per identity weight: " + ", ".join(
        f"{a:g}: {s:.4f}" for a, s in zip(sel.get("candidates", []), sel.get("score", []), strict=True)))
    print("grid hypervolume: " + ", ".join(f"{k} {v:.4f}" for k, v in result["hypervolume"].items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
