"""Does rho rank merges like accuracy? Merge methods and settings, rho variants, Spearman with a bootstrap CI.

For each merge (task arithmetic at several lambdas, TIES, DARE, RegMean, projection QPs, sequential ones) of
a suite's cached experts, measured on the same capped calibration and test texts:
- accuracy: the merged backbone's mean test accuracy under each task's own head, and ReACT at the equal
  preference (beta cross-validated without labels, as a bundle build does);
- rho variants, all label-free (calibration texts only):
  * `rho` the whole-model rho as implemented (1 - sum of layer losses / sum of layer energies, against the
    experts' own one-shot Grams), `rho_layer_mean` its unweighted mean over layers, `rho_depth` layers weighted
    by depth, `rho_last_block` the last transformer block only, and per block in the JSON;
  * `rho_repr`: rho at the final (pooled) representation, 1 - sum_t ||Z_m - Z_e||^2 / sum_t ||Z_0 - Z_e||^2 with
    Z_0 the base's features (the captured fraction of the experts' representation change), `rho_repr_task` its
    per-task mean;
  * `rho_logit`: the same at each head's centred logits (what the head reads), mean over tasks;
  * `agreement`: how often the merged backbone under a task's head predicts what the expert predicts;
  * `rho_stats`: 1 - sum_t L_t(I) / sum_t e_t from the bundle statistics alone (no base pass).
Spearman's rank correlation of each variant with each accuracy over the merges, with a percentile bootstrap
CI over merges (resampled with replacement).

    nice -n 10 python benchmarks/bench_rho.py --suite text6 --calibration 64 --test 100 \
        --out docs/results/rho/text6.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import AutoModel, PreTrainedModel

from reprmerge_bench.merges import load_setup, spearman_ci
from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.calibration import select_beta
from reprmerge_core.correction import CorrectionSolver, HeadFolder, TaskHead, TaskStatistics
from reprmerge_core.evaluation import TestSet, score
from reprmerge_core.merging import METHODS, collect_grams, diagnose, merge_sequential, merge_state_dicts, overall_rho
from reprmerge_core.merging.calibration import linear_layers
from reprmerge_core.merging.merge import LayerDiagnostics, changed_parameters

FOLDS = 5


def configs(k: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, params) of every merge compared, for k experts: bench_merge's settings and more lambdas.

    Ordered so that a run cut short (results are saved after every merge) still spans the methods.
    """
    return [
        ("ties 0.2 x1", "ties", {"density": 0.2, "lam": 1.0}),
        ("task_arithmetic 0.3", "task_arithmetic", {"lam": 0.3}),
        ("regmean a0.9", "regmean", {"alpha": 0.9}),
        ("dare 0.5 ties x1", "dare", {"drop_rate": 0.5, "combine": "ties", "lam": 1.0}),
        ("projection diagonal", "projection", {}),
        (f"task_arithmetic {1 / k:.3g}", "task_arithmetic", {"lam": 1 / k}),
        ("task_arithmetic 1", "task_arithmetic", {"lam": 1.0}),
        ("ties 0.1 x1", "ties", {"density": 0.1, "lam": 1.0}),
        ("projection eigen", "projection", {"basis": "eigen"}),
        ("task_arithmetic 0.1", "task_arithmetic", {"lam": 0.1}),
        ("dare 0.5 linear x0.3", "dare", {"drop_rate": 0.5, "combine": "linear", "lam": 0.3}),
        ("task_arithmetic 0.5", "task_arithmetic", {"lam": 0.5}),
        ("ties 0.5 x1", "ties", {"density": 0.5, "lam": 1.0}),
        ("regmean sequential", "regmean", {"alpha": 0.9, "sequential": True}),
        ("ties 0.2 x0.5", "ties", {"density": 0.2, "lam": 0.5}),
        ("projection diag seq", "projection", {"sequential": True}),
        ("task_arithmetic 0.7", "task_arithmetic", {"lam": 0.7}),
        ("regmean a0.5", "regmean", {"alpha": 0.5}),
        ("dare 0.9 linear x0.3", "dare", {"drop_rate": 0.9, "combine": "linear", "lam": 0.3}),
    ]


def block_of(layer: str) -> str:
    match = re.search(r"layer\.(\d+)\.", layer)
    return f"block {match.group(1)}" if match else layer.split(".")[0]


def layer_variants(layers: dict[str, LayerDiagnostics]) -> dict[str, Any]:
    """Whole-model rho as implemented plus unweighted, depth-weighted, last-block and per-block versions."""
    blocks: dict[str, dict[str, LayerDiagnostics]] = {}
    for name, diag in layers.items():
        blocks.setdefault(block_of(name), {})[name] = diag
    numbered = sorted((int(b.split()[1]), b) for b in blocks if b.startswith("block "))
    depth = {name: 1 + int(block_of(name).split()[1]) if block_of(name).startswith("block ") else 1 + len(numbered)
             for name in layers}
    rho = np.array([d.rho for d in layers.values()])
    weights = np.array([depth[n] for n in layers], float)
    return {
        "rho": overall_rho(layers),
        "rho_layer_mean": float(rho.mean()),
        "rho_depth": float((weights * rho).sum() / weights.sum()),
        "rho_last_block": overall_rho(blocks[numbered[-1][1]]),
        "blocks": {b: overall_rho(layer_group) for b, layer_group in blocks.items()},
    }


def centred(weight: torch.Tensor) -> torch.Tensor:
    """Head rows minus their mean: the directions that change which class wins."""
    w = weight.double()
    return w - w.mean(0)


def repr_variants(zm: list[torch.Tensor], ze: list[torch.Tensor], z0: list[torch.Tensor], heads: list[torch.Tensor],
                  biases: list[torch.Tensor]) -> dict[str, float]:
    """Variants of rho at the final representation and at the heads' logits (calibration features, float64)."""
    miss = [float(((m - e) ** 2).sum()) for m, e in zip(zm, ze, strict=True)]
    energy = [float(((o - e) ** 2).sum()) for o, e in zip(z0, ze, strict=True)]
    logit_miss = [float((((m - e) @ centred(h).T) ** 2).sum()) for m, e, h in zip(zm, ze, heads, strict=True)]
    logit_energy = [float((((o - e) @ centred(h).T) ** 2).sum()) for o, e, h in zip(z0, ze, heads, strict=True)]
    agree = [float(((m @ h.double().T + b).argmax(1) == (e @ h.double().T + b).argmax(1)).double().mean())
             for m, e, h, b in zip(zm, ze, heads, biases, strict=True)]
    stats_loss = [float(((m - e) ** 2).sum()) for m, e in zip(zm, ze, strict=True)]
    stats_energy = [float((e**2).sum()) for e in ze]
    return {
        "rho_repr": 1 - sum(miss) / sum(energy),
        "rho_repr_task": float(np.mean([1 - a / b for a, b in zip(miss, energy, strict=True)])),
        "rho_logit": float(np.mean([1 - a / b for a, b in zip(logit_miss, logit_energy, strict=True)])),
        "agreement": float(np.mean(agree)),
        "rho_stats": 1 - sum(stats_loss) / sum(stats_energy),
    }


def accuracy(z: torch.Tensor, head: TaskHead, labels: torch.Tensor) -> float:
    """Test accuracy of a head on features z (n, d)."""
    z = z.double()
    return float(((z @ head.weight.double().T + head.bias.double()).argmax(1) == labels).double().mean())


def fold_statistics(zm: torch.Tensor, ze: torch.Tensor) -> list[TaskStatistics]:
    """ReACT statistics of one task per fold (sample i in fold i mod FOLDS, as collect_statistics)."""
    return [TaskStatistics.from_features(zm[f::FOLDS], ze[f::FOLDS]) for f in range(FOLDS)]


def react_equal_accuracy(zm: list[torch.Tensor], ze: list[torch.Tensor], tests: list[TestSet],
                         heads: list[TaskHead]) -> tuple[float, float]:
    """Mean test accuracy of ReACT at the equal preference, beta cross-validated on the calibration features."""
    folds = [fold_statistics(m, e) for m, e in zip(zm, ze, strict=True)]
    beta = select_beta(folds).beta
    totals = [TaskStatistics.from_features(m, e) for m, e in zip(zm, ze, strict=True)]
    folder = HeadFolder(CorrectionSolver(beta).fit(totals), heads)
    T = len(tests)
    return float(score(tests, folder.fold(torch.full((1, T), 1.0 / T, dtype=torch.float64))).accuracy.mean()), beta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="tiny")
    parser.add_argument("--calibration", type=int, default=128, help="calibration inputs per task (Grams, features)")
    parser.add_argument("--test", type=int, default=300, help="test inputs per task")
    parser.add_argument("--only", default=None, help="comma-separated labels to run (debugging)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the table and correlations")
    parser.add_argument("--markdown", action="store_true", help="print the saved --out results as markdown and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    started = time.perf_counter()
    setup = load_setup(args.suite)
    suite, recipe, tokenizer, base_model, base, models, states = (
        setup.suite, setup.recipe, setup.tokenizer, setup.base_model, setup.base, setup.models, setup.states)
    base_dir, tasks, heads = default_backbone_path(), setup.tasks, [e.head for e in setup.experts]
    calibration = [list(s.calibration[: args.calibration]) for s in suite]
    test_texts = [list(s.test.texts[: args.test]) for s in suite]
    test_labels = [torch.tensor(list(s.test.labels[: args.test])) for s in suite]
    batches = setup.batches(args.calibration)

    def backbone_of(model: PreTrainedModel) -> Backbone:
        return Backbone(model, tokenizer, pooling=recipe.pooling, max_length=recipe.max_length, device="cpu")

    def encode(model: PreTrainedModel, texts: list[list[str]]) -> list[torch.Tensor]:
        bb = backbone_of(model)
        return [bb.encode(t, batch_size=64).double() for t in texts]

    start = time.perf_counter()
    changed = set(changed_parameters(base, states, ()))
    layers = [n for n in linear_layers(base_model) if f"{n}.weight" in changed]
    grams = {t: collect_grams(models[t], batches[t], layers) for t in tasks}
    ze = [backbone_of(models[t]).encode(c, batch_size=64).double() for t, c in zip(tasks, calibration, strict=True)]
    z0 = encode(base_model, calibration)
    expert_acc = [accuracy(backbone_of(models[t]).encode(x, batch_size=64), h, y)
                  for t, x, y, h in zip(tasks, test_texts, test_labels, heads, strict=True)]
    print(f"setup (experts, Grams of {len(layers)} layers, expert/base features) {time.perf_counter() - start:.0f}s; "
          f"expert accuracy {np.mean(expert_acc):.3f}", flush=True)

    wanted = None if args.only is None else set(args.only.split(","))
    settings = {"suite": args.suite, "tasks": tasks, "calibration_per_task": args.calibration,
                "test_per_task": args.test, "expert_accuracy": expert_acc}
    rows: list[dict[str, Any]] = []
    if args.out is not None and args.out.exists():  # resume a run cut short, with the same settings
        saved = json.loads(args.out.read_text())
        if {k: saved.get(k) for k in settings} == settings:
            rows = saved["rows"]
            print(f"resuming: {len(rows)} merges already measured", flush=True)
    done = {r["label"] for r in rows}
    for label, method, params in configs(len(tasks)):
        if (wanted is not None and label not in wanted) or label in done:
            continue
        start = time.perf_counter()
        if params.get("sequential"):
            result = merge_sequential(AutoModel.from_pretrained(base_dir), base, states, method, params, batches)
        else:
            one_shot = METHODS[method].data_aware
            result = merge_state_dicts(base, states, method, params, grams if one_shot else None)
        merge_seconds = time.perf_counter() - start
        merged = AutoModel.from_pretrained(base_dir)
        merged.load_state_dict(result.state_dict)
        zm = encode(merged, calibration)
        tests = [TestSet(z.float(), y) for z, y in zip(encode(merged, test_texts), test_labels, strict=True)]
        merged_acc = np.array([accuracy(test.features, h, test.labels) for test, h in zip(tests, heads, strict=True)])
        react_acc, beta = react_equal_accuracy(zm, ze, tests, heads)
        row = {
            "label": label, "method": method, "params": params,
            "merged_accuracy": merged_acc.tolist(), "merged_mean": float(merged_acc.mean()),
            "react_equal_mean": react_acc, "react_beta": beta,
            **layer_variants(diagnose(base, states, result.state_dict, grams)),
            **repr_variants(zm, ze, z0, [h.weight for h in heads], [h.bias.double() for h in heads]),
            "merge_seconds": merge_seconds, "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(f"  {label:<24} merged {row['merged_mean']:.3f} react {react_acc:.3f} rho {row['rho']:+.3f} "
              f"repr {row['rho_repr']:+.3f} logit {row['rho_logit']:+.3f} agree {row['agreement']:.3f} "
              f"({row['seconds']:.0f}s)", flush=True)
        if args.out is not None:
            save(args.out, settings, rows)
    summarise(rows)
    if args.out is not None:
        save(args.out, {**settings, "seconds": time.perf_counter() - started}, rows)


VARIANTS = ["rho", "rho_layer_mean", "rho_depth", "rho_last_block", "rho_repr", "rho_repr_task", "rho_logit",
            "agreement", "rho_stats"]
TARGETS = {"merged mean accuracy": "merged_mean", "ReACT equal accuracy": "react_equal_mean"}


def correlations(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Spearman (and its bootstrap CI) of every variant and every block's rho with each accuracy, over the merges."""
    blocks = sorted(rows[0]["blocks"]) if rows else []
    table: dict[str, dict[str, list[float]]] = {}
    for name, key in TARGETS.items():
        truth = [r[key] for r in rows]
        table[name] = {v: list(spearman_ci([r[v] for r in rows], truth)) for v in VARIANTS}
        table[name].update({f"rho {b}": list(spearman_ci([r["blocks"][b] for r in rows], truth)) for b in blocks})
    return table


def save(path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**settings, "rows": rows, "spearman": correlations(rows) if len(rows) > 2 else None},
                               indent=1))


def markdown(saved: dict[str, Any]) -> str:
    """The table and the correlations of a saved run, for docs/results."""
    rows = sorted(saved["rows"], key=lambda r: -r["merged_mean"])
    lines = [f"| merge | merged acc. | ReACT equal acc. | {' | '.join(VARIANTS)} |", "|---" * (3 + len(VARIANTS)) + "|"]
    lines += [f"| {r['label']} | {r['merged_mean']:.3f} | {r['react_equal_mean']:.3f} | "
              + " | ".join(f"{r[v]:.3f}" for v in VARIANTS) + " |" for r in rows]
    table = correlations(saved["rows"])
    lines += ["", f"Spearman over {len(rows)} merges, 95% bootstrap CI over merges:", "",
              "| variant | " + " | ".join(f"vs {t}" for t in table) + " |", "|---" * (1 + len(table)) + "|"]
    for v in table[next(iter(table))]:
        lines.append(f"| {v} | " + " | ".join("{:+.2f} [{:+.2f}, {:+.2f}]".format(*table[t][v]) for t in table) + " |")
    free = [r for r in saved["rows"] if not METHODS[r["method"]].data_aware]
    if len(free) > 2:
        table = correlations(free)
        lines += ["", f"Among the {len(free)} data-free merges only (task arithmetic, TIES, DARE):", "",
                  "| variant | " + " | ".join(f"vs {t}" for t in table) + " |", "|---" * (1 + len(table)) + "|"]
        lines += [f"| {v} | " + " | ".join("{:+.2f} [{:+.2f}, {:+.2f}]".format(*table[t][v]) for t in table) + " |"
                  for v in VARIANTS]
    return "\n".join(lines)


def summarise(rows: list[dict[str, Any]]) -> None:
    """Print the table (best merged accuracy first) and the correlations."""
    header = f"{'merge':<24} {'merged':>7} {'ReACT=':>7} " + " ".join(f"{v[:11]:>11}" for v in VARIANTS)
    print("\n" + header)
    for r in sorted(rows, key=lambda r: -r["merged_mean"]):
        print(f"{r['label']:<24} {r['merged_mean']:7.3f} {r['react_equal_mean']:7.3f} "
              + " ".join(f"{r[v]:11.3f}" for v in VARIANTS))
    print(f"\nSpearman over {len(rows)} merges (95% bootstrap CI over merges):")
    for name, table in correlations(rows).items():
        print(f"  vs {name}:")
        for v, (rho, lo, hi) in table.items():
            print(f"    {v:<18} {rho:+.2f}  [{lo:+.2f}, {hi:+.2f}]")


if __name__ == "__main__":
    main()
