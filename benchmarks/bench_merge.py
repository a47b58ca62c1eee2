"""Merge methods on real MiniLM experts: per-task accuracy, rho and time, and whether rho ranks like accuracy.

Experts come from the project's pipeline (reprmerge_core.training, cached on disk; data.md's "tiny" suite
and recipe by default: sms_spam, trec6, movie_sentiment). Each merged backbone is scored with every
expert's own head on that task's test split. rho is measured for every method against the same one-shot
calibration Grams (each expert's own activations on its task's calibration inputs), so the column is
comparable across methods, including the sequential ones.

    python benchmarks/bench_merge.py [--suite tiny|text6] [--calibration N]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import AutoModel

from reprmerge_bench.merges import load_setup, spearman
from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.merging import (
    METHODS,
    collect_grams,
    diagnose,
    merge_sequential,
    merge_state_dicts,
    overall_rho,
)
from reprmerge_core.merging.calibration import linear_layers
from reprmerge_core.merging.merge import changed_parameters
from reprmerge_core.training import evaluate_head


def configs(k: int) -> list[tuple[str, str, dict]]:
    """(label, method, params) of every merge compared, for k experts."""
    return [
        ("average", "task_arithmetic", {"lam": 1 / k}),
        ("task_arithmetic 0.3", "task_arithmetic", {"lam": 0.3}),
        ("ties 0.2 x1", "ties", {"density": 0.2, "lam": 1.0}),
        ("dare 0.5 ties x1", "dare", {"drop_rate": 0.5, "combine": "ties", "lam": 1.0}),
        ("regmean a0.9", "regmean", {"alpha": 0.9}),
        ("projection diagonal", "projection", {}),
        ("projection eigen", "projection", {"basis": "eigen"}),
        ("regmean sequential", "regmean", {"alpha": 0.9, "sequential": True}),
        ("projection diag seq", "projection", {"sequential": True}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="tiny")
    parser.add_argument(
        "--calibration", type=int, default=128, help="calibration inputs per task (at most the split's)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    base_dir = default_backbone_path()
    setup = load_setup(args.suite, progress=True)
    print(f"experts ready in {time.perf_counter() - start:.0f}s (cached after the first run)")
    suite, recipe, experts, tokenizer, base_model, base, models, states = (
        setup.suite, setup.recipe, setup.experts, setup.tokenizer, setup.base_model, setup.base, setup.models,
        setup.states)
    tasks = setup.tasks
    batches = setup.batches(args.calibration)

    start = time.perf_counter()
    changed = set(changed_parameters(base, states, ()))
    layers = [n for n in linear_layers(base_model) if f"{n}.weight" in changed]
    grams = {t: collect_grams(models[t], batches[t], layers) for t in tasks}
    gram_seconds = time.perf_counter() - start
    print(f"one-shot Grams of {len(layers)} linear layers: {gram_seconds:.1f}s")

    def accuracies(state: dict[str, torch.Tensor]) -> list[float]:
        base_model.load_state_dict(state)
        backbone = Backbone(base_model, tokenizer, pooling=recipe.pooling, max_length=recipe.max_length, device="cpu")
        return [evaluate_head(backbone, e.head, s.test.texts, s.test.labels).accuracy
                for e, s in zip(experts, suite, strict=True)]

    rows: list[tuple[str, list[float], float | None, float]] = [
        (
            "experts (own backbone)",
            [
                evaluate_head(e.backbone("cpu"), e.head, s.test.texts, s.test.labels).accuracy
                for e, s in zip(experts, suite, strict=True)
            ],
            None,
            0.0,
        ),
        ("base (no merge)", accuracies(base), 0.0, 0.0),
    ]
    for label, method, params in configs(len(tasks)):
        one_shot = METHODS[method].data_aware and not params.get("sequential")
        start = time.perf_counter()
        if params.get("sequential"):
            result = merge_sequential(AutoModel.from_pretrained(base_dir), base, states, method, params, batches)
        else:
            result = merge_state_dicts(base, states, method, params, grams if one_shot else None)
        seconds = time.perf_counter() - start + (gram_seconds if one_shot else 0.0)
        # one-shot data-aware merges measured rho on the shared Grams already; the others are measured here
        # (a sequential merge's own rho used the merged network's Grams, not comparable across methods)
        rho = result.report.rho if one_shot else overall_rho(diagnose(base, states, result.state_dict, grams))
        rows.append((label, accuracies(result.state_dict), rho, seconds))
        print(f"  {label}: done in {seconds:.1f}s")

    width = max(len(r[0]) for r in rows)
    print(f"\n{'method':<{width}}  " + "  ".join(f"{t[:15]:>15}" for t in tasks) + "     mean      rho   time s")
    for label, acc, rho, seconds in rows:
        rho_text = "       -" if rho is None else f"{rho:8.4f}"
        print(
            f"{label:<{width}}  "
            + "  ".join(f"{a:15.3f}" for a in acc)
            + f"  {np.mean(acc):7.3f} {rho_text} {seconds:8.1f}"
        )
    merged_rows = [(label, acc, rho) for label, acc, rho, _ in rows[2:] if rho is not None]  # the merges measure rho
    rho_rank = spearman([r[2] for r in merged_rows], [float(np.mean(r[1])) for r in merged_rows])
    print(f"\nSpearman rank correlation of rho with mean accuracy over the {len(merged_rows)} merges: {rho_rank:+.2f}")
    best_rho = max(merged_rows, key=lambda r: r[2])[0]
    best_acc = max(merged_rows, key=lambda r: np.mean(r[1]))[0]
    print(f"highest rho: {best_rho}; highest mean accuracy: {best_acc}")


if __name__ == "__main__":
    main()
