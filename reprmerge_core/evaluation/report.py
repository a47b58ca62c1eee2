"""Writing an evaluation: report.json, report.md and PNG plots (Pareto fronts, scenarios, sweeps)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _number(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def markdown(report: dict[str, Any]) -> str:
    names, sc = report["tasks"], report["scenarios"]
    exp = report["experts"]["accuracy"]
    lines = [f"# Evaluation of bundle {report['bundle_id']}", "",
             f"Merge: `{report['merge']['method']}` {json.dumps(report['merge']['parameters'])}; "
             f"beta {report['beta']:g} ({report['normalisation']} normalisation).", "",
             "## Accuracy per task (macro-F1 in parentheses)", ""]
    columns = [("majority", None), ("expert", None), ("merged", "merged"), ("ReACT equal", "equal"),
               ("ReACT priority", "priority"), ("ReACT one-hot", "one_hot")]
    rows = []
    for t, n in enumerate(names):
        cells: list[object] = [n, report["majority"][t], f"{exp[t]:.3f} ({report['experts']['macro_f1'][t]:.3f})"]
        for _, key in columns[2:]:
            s = sc[key] if key in ("merged", "equal") else sc[f"{key}:{n}"]
            cells.append(f"{s['accuracy'][t]:.3f} ({s['macro_f1'][t]:.3f})")
        rows.append(cells)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    rows.append(["**mean**", mean(report["majority"]), mean(exp), sc["merged"]["mean_accuracy"], sc["equal"]["mean_accuracy"],
                 mean([sc[f"priority:{n}"]["accuracy"][t] for t, n in enumerate(names)]), mean(report["one_hot"]["accuracy"])])
    lines += _table(["task", *(c for c, _ in columns)], rows)
    if report.get("head_agreement"):
        lines += ["", f"Label-free merge diagnostic: head agreement {report['head_agreement']['mean']:.3f} (share of "
                  "calibration inputs where each task's head gives the merged backbone the expert's class; it ranks "
                  "merges like the merged accuracy above)."]
    lines += ["", "Normalised accuracy (ReACT / expert), mean over tasks: "
              f"merged {sc['merged']['mean_normalised']:.3f}, equal {sc['equal']['mean_normalised']:.3f}, "
              f"one-hot {report['one_hot']['mean_normalised']:.3f}; priority (0.5 on one task): favoured "
              f"{report['priority']['favoured_normalised']:.3f}, others {_number(report['priority']['others_normalised'])}.", ""]
    grid = report["grid"]
    lines += [f"## Preference grid ({len(grid['preferences'])} preferences, step 1/{grid['steps']})", ""]
    methods = [("ReACT (closed form)", "react"), ("preference-weighted task arithmetic", "task_arithmetic"),
               ("ablation: weighted average of W_t", "ablation_weighted_average"),
               ("ablation: identity prior", "ablation_identity_prior"),
               ("ablation: Procrustes prior (the paper's)", "ablation_procrustes_prior")]
    lines += _table(["method", "hypervolume", "uniformity", "mean normalised accuracy"],
                    [[label, grid[k]["hypervolume"], grid[k]["uniformity"], grid[k]["mean_normalised"]]
                     for label, k in methods if k in grid])
    lines += _prior_lines(report)
    if "beta_sweep" in report:
        lines += ["", "## Beta sweep (mean normalised accuracy)", ""]
        lines += _table(["beta", "equal", "one-hot"], [[r["beta"], r["equal_mean_normalised"], r["one_hot_mean_normalised"]]
                                                      for r in report["beta_sweep"]])
    if "calibration_sweep" in report:
        lines += ["", "## Calibration size sweep (mean normalised accuracy)", ""]
        lines += _table(["fraction", "samples per task", "equal", "one-hot"],
                        [[r["fraction"], ", ".join(map(str, r["samples_per_task"])), r["equal_mean_normalised"],
                          r["one_hot_mean_normalised"]] for r in report["calibration_sweep"]])
    lines += ["", "## Wall time per stage (seconds)", ""]
    lines += _table(["stage", "seconds"], [[k, float(v)] for k, v in report["timings"].items()])
    t = report["timings"]
    if "statistics_forward" in t and t["statistics_forward"] > 0:
        overhead = t["statistics_accumulate"] / t["statistics_forward"]
        lines += ["", f"Statistics accumulation adds {100 * overhead:.2f}% to the forward passes it needs."]
    if report.get("statistics_per_task_seconds"):
        lines += ["Statistics time per task: " + ", ".join(f"{s:.1f}s" for s in report["statistics_per_task_seconds"])
                  + " (one merged and one expert forward per input: linear in the number of tasks)."]
    lines += ["", "Plots: `pareto.png`, `scenarios.png`" + (", `beta_sweep.png`" if "beta_sweep" in report else "")
              + (", `calibration_sweep.png`" if "calibration_sweep" in report else "") + "."]
    return "\n".join(lines) + "\n"


def _prior_lines(report: dict[str, Any]) -> list[str]:
    """The prior ReACT used, how cross-validation chose it, and its grid hypervolume against the fixed priors."""
    prior, grid = report.get("prior"), report["grid"]
    if prior is None:
        return []
    selection = prior.get("selection") or {}
    how = "chosen by label-free cross-validation" if selection.get("chosen") else "fixed when the bundle was made"
    lines = ["", f"Prior: {prior['name']} (identity weight {prior['identity_weight']:g}, {how}). Grid hypervolume: "
             + ", ".join(f"{label} {grid[key]['hypervolume']:.3f}" for label, key in (
                 ("this prior", "react"), ("identity", "ablation_identity_prior"),
                 ("Procrustes", "ablation_procrustes_prior")) if key in grid) + "."]
    if selection.get("candidates"):
        lines += ["", "CV score per identity weight (lower is better; each at its best beta): "
                  + ", ".join(f"{a:g}: {s:.4f}" for a, s in zip(selection["candidates"], selection["score"])) + "."]
    return lines


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """Pairwise fronts of normalised accuracy over the preference grid: ReACT vs task arithmetic."""
    names, grid = report["tasks"], report["grid"]
    pairs = list(itertools.combinations(range(len(names)), 2))[:15]
    cols = min(len(pairs), 3)
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    merged = report["scenarios"]["merged"]["normalised"]
    for ax, (a, b) in zip(axes.flat, pairs):
        for key, style in (("react", dict(c="tab:blue", marker="o", label="ReACT grid")),
                           ("task_arithmetic", dict(c="tab:orange", marker="^", label="weighted task arithmetic"))):
            if key in grid:
                pts = np.array(grid[key]["normalised"])
                ax.scatter(pts[:, a], pts[:, b], s=18, alpha=0.7, **style)
        ax.scatter([merged[a]], [merged[b]], c="k", marker="x", s=60, label="merged backbone")
        ax.scatter([1], [1], c="tab:green", marker="*", s=120, label="experts")
        ax.set_xlabel(f"{names[a]} (normalised acc.)")
        ax.set_ylabel(f"{names[b]} (normalised acc.)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scenarios(report: dict[str, Any], path: Path) -> None:
    """Accuracy per task for majority, merged, ReACT scenarios and experts, as grouped bars."""
    names, sc = report["tasks"], report["scenarios"]
    series = {
        "majority": report["majority"],
        "merged": sc["merged"]["accuracy"],
        "ReACT equal": sc["equal"]["accuracy"],
        "ReACT priority": [sc[f"priority:{n}"]["accuracy"][t] for t, n in enumerate(names)],
        "ReACT one-hot": report["one_hot"]["accuracy"],
        "expert": report["experts"]["accuracy"],
    }
    x, width = np.arange(len(names)), 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - len(series) / 2 + 0.5) * width, values, width, label=label)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], key: str, xlabel: str, path: Path, log: bool) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r[key] for r in rows]
    ax.plot(xs, [r["equal_mean_normalised"] for r in rows], marker="o", label="equal preference")
    ax.plot(xs, [r["one_hot_mean_normalised"] for r in rows], marker="s", label="one-hot preferences")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean normalised accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """report.json, report.md and the plots in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot_pareto(report, out / "pareto.png")
    plot_scenarios(report, out / "scenarios.png")
    if "beta_sweep" in report:
        plot_sweep(report["beta_sweep"], "beta", "beta", out / "beta_sweep.png", log=True)
    if "calibration_sweep" in report:
        plot_sweep(report["calibration_sweep"], "fraction", "fraction of calibration inputs", out / "calibration_sweep.png", log=False)
    return out
