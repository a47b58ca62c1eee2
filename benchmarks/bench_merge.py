"""Merge methods on real MiniLM experts: per-task accuracy, rho and time, and whether rho ranks like accuracy.

Experts come from the project's pipeline (reprmerge_core.training, cached on disk; data.md's "tiny" suite
and recipe by default: sms_spam, trec6, movie_sentiment). Each merged backbone is scored with every
expert's own head on that task's test split. rho is measured for every method against the same one-shot
calibration Grams (each expert's own activations on its task's calibration inputs), so the column is
comparable across methods, including the sequential ones.

    python benchmarks/bench_merge.py [--suite tiny|text6] [--calibration N]

`--memory` instead measures the peak resident memory of `merge_checkpoints` writing a merged checkpoint, each
method in a fresh process (its import-only peak printed beside it), over the suite's experts in the expert cache (or
`--experts DIR...`); `--tree PATH` runs another checkout's code (e.g. main, for a before/after figure):

    nice -n 10 python benchmarks/bench_merge.py --memory --suite text6 [--tree /path/to/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import AutoModel

from reprmerge_bench.merges import load_setup, spearman
from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.data import resolve_suite
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
from reprmerge_core.training import cache_root, evaluate_head

# One merge in a fresh process: its peak RSS (ru_maxrss) after imports and after the merge, and the merge time.
MEMORY_CHILD = """
import json, resource, sys, time
import torch
from reprmerge_core.merging import merge_checkpoints
torch.set_num_threads(1)
a = json.loads(sys.stdin.read())
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
merge_checkpoints(a["base"], a["experts"], a["method"], a["params"], a["texts"], a["out"], max_length=a["max_length"])
print(json.dumps({"imports_mb": imports, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - start}))
"""
MEMORY_METHODS = [("task_arithmetic", {"lam": 0.3}), ("ties", {}), ("dare", {"combine": "ties"}), ("regmean", {})]


def cached_experts(suite: str) -> list[Path]:
    """The expert cache's checkpoints of `suite`: one per task, trained on the suite's split."""
    config = resolve_suite(suite)
    found = {}
    for info in sorted(cache_root().glob("*/expert.json")):
        record = json.loads(info.read_text())
        if record["task"] in config.tasks and record["split"] == config.split.model_dump(mode="json"):
            found[record["task"]] = info.parent
    missing = sorted(set(config.tasks) - set(found))
    if missing:
        raise SystemExit(f"no cached experts of {suite} for {missing}: run `reprmerge build --suite {suite}` first")
    return [found[task] for task in config.tasks]


def memory(expert_dirs: list[Path], tree: Path, calibration: int) -> None:
    """Peak RSS of each method's checkpoint merge (see the module docstring)."""
    experts = {f"{i}-{path.name.split('-')[0]}": str(path) for i, path in enumerate(expert_dirs)}
    texts = [f"calibration input {i}: " + " ".join(["merged experts keep one backbone"] * (1 + i % 6))
             for i in range(calibration)]
    print(f"{len(experts)} experts ({', '.join(experts)}), code from {tree}, {calibration} calibration inputs each")
    print(f"{'method':<16} {'peak MB':>8} {'imports MB':>10} {'merge MB':>8} {'time s':>7}")
    for method, params in MEMORY_METHODS:
        with tempfile.TemporaryDirectory() as work:
            job = {"base": str(default_backbone_path()), "experts": experts, "method": method, "params": params,
                   "texts": {t: texts for t in experts} if METHODS[method].data_aware else None,
                   "out": str(Path(work) / "merged"), "max_length": 128}
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
            run = subprocess.run([sys.executable, "-c", MEMORY_CHILD], input=json.dumps(job), env=env, cwd=tree,
                                 capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{method:<16} {r['peak_mb']:8.0f} {r['imports_mb']:10.0f} {r['peak_mb'] - r['imports_mb']:8.0f} "
              f"{r['seconds']:7.1f}")


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
    parser.add_argument("--memory", action="store_true", help="peak RSS of checkpoint merges instead (see above)")
    parser.add_argument("--experts", type=Path, nargs="*", help="expert directories for --memory (default: the cache)")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose code --memory runs")
    args = parser.parse_args()
    if args.memory:
        memory(args.experts or cached_experts(args.suite), args.tree, args.calibration)
        return
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
        return [evaluate_head(backbone, e.head, s.test.texts, s.test.labels).accuracy for e, s in zip(experts, suite)]

    rows: list[tuple[str, list[float], float | None, float]] = [
        (
            "experts (own backbone)",
            [
                evaluate_head(e.backbone("cpu"), e.head, s.test.texts, s.test.labels).accuracy
                for e, s in zip(experts, suite)
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
    merged_rows = rows[2:]
    rho_rank = spearman([r[2] for r in merged_rows], [float(np.mean(r[1])) for r in merged_rows])
    print(f"\nSpearman rank correlation of rho with mean accuracy over the {len(merged_rows)} merges: {rho_rank:+.2f}")
    best_rho = max(merged_rows, key=lambda r: r[2])[0]
    best_acc = max(merged_rows, key=lambda r: np.mean(r[1]))[0]
    print(f"highest rho: {best_rho}; highest mean accuracy: {best_acc}")


if __name__ == "__main__":
    main()
