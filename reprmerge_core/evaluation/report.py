"""Writing an evaluation: report.json, report.md and PNG plots (Pareto fronts, edges, simplex map, sweeps...)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import matplotlib.tri
import numpy as np

from reprmerge_core.evaluation.metrics import pareto_front


def _number(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _score_label(report: dict[str, Any]) -> str:
    return "normalised acc." if report.get("normalised_by", "experts") == "experts" else "accuracy"


def _edges_markdown(report: dict[str, Any]) -> list[str]:
    """Each edge's two tasks at its ends and its midpoint (the whole curves are in edges.png)."""
    if "edges" not in report:
        return []
    lines = ["", "## Along simplex edges (accuracy as the weight moves from task a to task b)", ""]
    rows: list[list[object]] = []
    for edge in report["edges"]:
        acc, mid = np.array(edge["accuracy"]), len(edge["weight"]) // 2
        rows.extend([" -> ".join(edge["tasks"]), report["tasks"][t], acc[0, t], acc[mid, t], acc[-1, t]]
                    for t in (report["tasks"].index(n) for n in edge["tasks"]))
    return lines + _table(["edge a -> b", "accuracy on", "at a one-hot", "at a 0.5 : b 0.5", "at b one-hot"], rows)


def _simplex_markdown(report: dict[str, Any]) -> list[str]:
    if "simplex" not in report:
        return []
    simplex = report["simplex"]
    prefs, acc = np.array(simplex["preferences"]), np.array(simplex["accuracy"])
    best = int(acc.mean(1).argmax())
    return ["", (f"Simplex map (`simplex.png`, step 1/{simplex['steps']}): {sum(simplex['pareto'])} of {len(prefs)} "
                 f"preferences are Pareto-optimal in normalised accuracy; the best mean accuracy, "
                 f"{acc[best].mean():.3f}, is at preference ({', '.join(f'{w:.2f}' for w in prefs[best])}).")]


def markdown(report: dict[str, Any]) -> str:
    names, sc = report["tasks"], report["scenarios"]
    experts = report.get("experts")
    lines = [f"# Evaluation of bundle {report['bundle_id']}", "",
             (f"Merge: `{report['merge']['method']}` {json.dumps(report['merge']['parameters'])}; "
              f"beta {report['beta']:g} ({report['normalisation']} normalisation).")]
    if "test_examples" in report:
        counts = ", ".join(f"{n} {k}" for n, k in zip(names, report["test_examples"], strict=True))
        lines[-1] += f" Test examples per task: {counts}."
    lines += ["", "## Accuracy per task (macro-F1 in parentheses)", ""]
    columns = [("majority", None), ("expert", None), ("merged", "merged"), ("ReACT equal", "equal"),
               ("ReACT priority", "priority"), ("ReACT one-hot", "one_hot")]
    rows = []
    for t, n in enumerate(names):
        expert = "n/a" if experts is None else f"{experts['accuracy'][t]:.3f} ({experts['macro_f1'][t]:.3f})"
        cells: list[object] = [n, report["majority"][t], expert]
        for _, key in columns[2:]:
            s = sc[key] if key in ("merged", "equal") else sc[f"{key}:{n}"]
            cells.append(f"{s['accuracy'][t]:.3f} ({s['macro_f1'][t]:.3f})")
        rows.append(cells)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    rows.append(["**mean**", mean(report["majority"]), "n/a" if experts is None else mean(experts["accuracy"]),
                 sc["merged"]["mean_accuracy"], sc["equal"]["mean_accuracy"],
                 mean([sc[f"priority:{n}"]["accuracy"][t] for t, n in enumerate(names)]),
                 mean(report["one_hot"]["accuracy"])])
    lines += _table(["task", *(c for c, _ in columns)], rows)
    if report.get("head_agreement"):
        lines += ["", (f"Label-free merge diagnostic: head agreement {report['head_agreement']['mean']:.3f} (share "
                       "of calibration inputs where each task's head gives the merged backbone the expert's class; it "
                       "ranks merges like the merged accuracy above).")]
    if experts is None:
        lines += ["", "No experts given (`--expert`): the \"normalised\" figures below are plain accuracies."]
    lines += ["", ("Normalised accuracy (ReACT / expert), mean over tasks: "
                   f"merged {sc['merged']['mean_normalised']:.3f}, equal {sc['equal']['mean_normalised']:.3f}, "
                   f"one-hot {report['one_hot']['mean_normalised']:.3f}; priority (0.5 on one task): favoured "
                   f"{report['priority']['favoured_normalised']:.3f}, "
                   f"others {_number(report['priority']['others_normalised'])}."), ""]
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
        lines += _table(["beta", "equal", "one-hot"],
                        [[r["beta"], r["equal_mean_normalised"], r["one_hot_mean_normalised"]]
                         for r in report["beta_sweep"]])
    if "calibration_sweep" in report:
        lines += ["", "## Calibration size sweep (mean normalised accuracy)", ""]
        lines += _table(["fraction", "samples per task", "equal", "one-hot"],
                        [[r["fraction"], ", ".join(map(str, r["samples_per_task"])), r["equal_mean_normalised"],
                          r["one_hot_mean_normalised"]] for r in report["calibration_sweep"]])
    lines += _edges_markdown(report)
    lines += _simplex_markdown(report)
    lines += ["", "## Wall time per stage (seconds)", ""]
    lines += _table(["stage", "seconds"], [[k, float(v)] for k, v in report["timings"].items()])
    t = report["timings"]
    if "statistics_forward" in t and t["statistics_forward"] > 0 and "statistics_accumulate" in t:
        overhead = t["statistics_accumulate"] / t["statistics_forward"]
        lines += ["", f"Statistics accumulation adds {100 * overhead:.2f}% to the forward passes it needs."]
    if report.get("statistics_per_task_seconds"):
        lines += ["Statistics time per task: " + ", ".join(f"{s:.1f}s" for s in report["statistics_per_task_seconds"])
                  + " (one merged and one expert forward per input: linear in the number of tasks)."]
    lines += ["", "Plots: " + ", ".join(f"`{name}`" for name in plot_files(report)) + "."]
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
        scores = zip(selection["candidates"], selection["score"], strict=True)
        lines += ["", "CV score per identity weight (lower is better; each at its best beta): "
                  + ", ".join(f"{a:g}: {s:.4f}" for a, s in scores) + "."]
    return lines


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """Pairwise fronts of normalised accuracy over the preference grid: ReACT vs task arithmetic.

    Circled and joined: the ReACT points no other ReACT point beats on both tasks of the panel (its 2-D front).
    """
    names, grid = report["tasks"], report["grid"]
    pairs = list(itertools.combinations(range(len(names)), 2))[:15]
    cols = min(len(pairs), 3)
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    merged = report["scenarios"]["merged"]["normalised"]
    for ax, (a, b) in zip(axes.flat, pairs, strict=False):  # a grid may have axes to spare (hidden below)
        for key, style in (
                ("react", {"c": "tab:blue", "marker": "o", "label": "ReACT grid"}),
                ("task_arithmetic", {"c": "tab:orange", "marker": "^", "label": "weighted task arithmetic"})):
            if key in grid:
                pts = np.array(grid[key]["normalised"])
                ax.scatter(pts[:, a], pts[:, b], s=18, alpha=0.7, **style)
        front = np.array(grid["react"]["normalised"])[:, [a, b]]
        front = front[pareto_front(front)]
        front = front[np.lexsort((-front[:, 1], front[:, 0]))]
        ax.plot(front[:, 0], front[:, 1], c="tab:blue", lw=1.2, marker="o", ms=9, mfc="none",
                label="ReACT Pareto front")
        ax.scatter([merged[a]], [merged[b]], c="k", marker="x", s=60, label="merged backbone")
        if report.get("normalised_by", "experts") == "experts":
            ax.scatter([1], [1], c="tab:green", marker="*", s=120, label="experts")
        ax.set_xlabel(f"{names[a]} ({_score_label(report)})")
        ax.set_ylabel(f"{names[b]} ({_score_label(report)})")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Pairwise trade-offs over the preference grid ({len(grid['preferences'])} preferences, "
                 f"step 1/{grid['steps']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_edges(report: dict[str, Any], path: Path) -> None:
    """One panel per simplex edge a -> b: every task's accuracy as the weight moves from a to b.

    The edge's own two tasks are bold, the others thin and dashed; dotted lines are the experts.
    """
    names, edges = report["tasks"], report["edges"]
    colours = {n: f"C{t % 10}" for t, n in enumerate(names)}
    cols = min(len(edges), 3)
    rows = (len(edges) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows + 0.4), squeeze=False)
    experts = report.get("experts")
    for ax, edge in zip(axes.flat, edges, strict=False):  # a grid may have axes to spare (hidden below)
        a, b = edge["tasks"]
        x, acc = np.array(edge["weight"]), np.array(edge["accuracy"])
        for t, n in enumerate(names):
            ends = n in (a, b)
            ax.plot(x, acc[:, t], c=colours[n], lw=2.2 if ends else 1.0, ls="-" if ends else "--",
                    marker="o" if ends else None, ms=3.5, alpha=1.0 if ends else 0.6)
            if ends and experts is not None:
                ax.axhline(experts["accuracy"][t], c=colours[n], ls=":", lw=1.2)
        ax.set_title(f"{a} \u2192 {b}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["1 : 0", "0.75 : 0.25", "0.5 : 0.5", "0.25 : 0.75", "0 : 1"],
                      fontsize=7)
        ax.set_xlabel(f"preference weight  {a} : {b}", fontsize=8)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(edges):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], c=colours[n], lw=2) for n in names]
    labels = list(names)
    handles += [plt.Line2D([], [], c="grey", lw=2.2, marker="o", ms=3.5), plt.Line2D([], [], c="grey", lw=1, ls="--")]
    labels += ["task at an end of the edge", "other task (weight 0)"]
    if experts is not None:
        handles.append(plt.Line2D([], [], c="grey", ls=":", lw=1.2))
        labels.append("expert")
    fig.suptitle("ReACT: per-task accuracy along simplex edges of the preference", fontsize=11)
    fig.tight_layout(rect=(0, 0.45 / (3.6 * rows + 0.6), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 6), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ternary(prefs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plane coordinates of 3-task preferences: task 0 bottom left, task 1 bottom right, task 2 on top."""
    return prefs[:, 1] + 0.5 * prefs[:, 2], np.sqrt(3) / 2 * prefs[:, 2]


def plot_simplex(report: dict[str, Any], path: Path) -> None:
    """Ternary heat maps over the 3-task preference simplex: mean and per-task accuracy, Pareto front marked."""
    names, simplex = report["tasks"], report["simplex"]
    prefs, acc = np.array(simplex["preferences"]), np.array(simplex["accuracy"])
    front = np.array(simplex["pareto"], dtype=bool)
    x, y = _ternary(prefs)
    triangulation = matplotlib.tri.Triangulation(x, y)
    panels = [("mean test accuracy over tasks", acc.mean(1)),
              *((f"accuracy on {n}", acc[:, t]) for t, n in enumerate(names))]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.6))
    corners = _ternary(np.eye(3))
    for ax, (title, values) in zip(axes.flat, panels, strict=True):
        image = ax.tripcolor(triangulation, values, shading="gouraud", cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.8, label="test accuracy")
        ax.plot([*corners[0], corners[0][0]], [*corners[1], corners[1][0]], c="k", lw=1)
        ax.scatter(x[front], y[front], s=24, facecolors="white", edgecolors="black", linewidths=0.9,
                   label="Pareto-optimal preference (normalised accuracy, all tasks)")
        best = int(values.argmax())
        ax.scatter([x[best]], [y[best]], marker="*", s=160, c="red", edgecolors="white", linewidths=0.8,
                   label="best on this map")
        ax.scatter(*_ternary(np.full((1, 3), 1 / 3)), marker="+", s=80, c="k", label="equal preference")
        offsets = ((-0.02, -0.06), (0.02, -0.06), (0, 0.03))
        for (cx, cy), n, offset in zip(zip(*corners, strict=True), names, offsets, strict=True):
            ax.annotate(n, (cx + offset[0], cy + offset[1]), ha="center", fontsize=9, fontweight="bold")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlim(-0.12, 1.12)
        ax.set_ylim(-0.1, 0.95)
        ax.axis("off")
    fig.suptitle("ReACT over the preference simplex (a corner = all weight on that task)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=3, fontsize=8, frameon=False)
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
    }
    if report.get("experts") is not None:
        series["expert"] = report["experts"]["accuracy"]
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


def plot_files(report: dict[str, Any]) -> list[str]:
    """The PNG files `write_report` writes for this report."""
    optional = [("edges.png", "edges"), ("simplex.png", "simplex"), ("beta_sweep.png", "beta_sweep"),
                ("calibration_sweep.png", "calibration_sweep")]
    return ["pareto.png", "scenarios.png", *(name for name, key in optional if key in report)]


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """report.json, report.md and the plots in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot_pareto(report, out / "pareto.png")
    plot_scenarios(report, out / "scenarios.png")
    if "edges" in report:
        plot_edges(report, out / "edges.png")
    if "simplex" in report:
        plot_simplex(report, out / "simplex.png")
    if "beta_sweep" in report:
        plot_sweep(report["beta_sweep"], "beta", "beta", out / "beta_sweep.png", log=True)
    if "calibration_sweep" in report:
        plot_sweep(report["calibration_sweep"], "fraction", "fraction of calibration inputs",
                   out / "calibration_sweep.png", log=False)
    return out
