"""`reprmerge evaluate`: how well one merged backbone plus closed-form corrections follows preferences.

Test inputs are encoded once by the merged backbone; every ReACT head (scenarios, a simplex grid,
ablations, a beta sweep) is then a cheap fold + matmul. The baseline a user would pick instead,
preference-weighted task arithmetic, needs a re-merged model and a new forward pass per preference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from operator import add
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel

from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.bundle import Bundle
from reprmerge_core.calibration import DEFAULT_BETAS, collect_statistics
from reprmerge_core.correction import CorrectionSolver, HeadFolder, TaskStatistics
from reprmerge_core.data import TaskSplits
from reprmerge_core.evaluation.metrics import hypervolume, simplex_grid, uniformity
from reprmerge_core.evaluation.scoring import Scores, TestSet, score
from reprmerge_core.training import Expert, evaluate_head

CALIBRATION_FOLDS = 10


@dataclass
class EvaluationInputs:
    """Everything evaluation needs besides the bundle: the test/calibration splits and the experts."""

    splits: list[TaskSplits]
    experts: list[Expert]
    device: torch.device


def _summary(scores: Scores, expert_acc: np.ndarray, row: int = 0) -> dict[str, Any]:
    """Per-task accuracy, macro-F1 and normalised accuracy of one preference's scores (one row)."""
    return {
        "accuracy": scores.accuracy[row].tolist(),
        "macro_f1": scores.macro_f1[row].tolist(),
        "normalised": (scores.accuracy[row] / expert_acc).tolist(),
        "mean_accuracy": float(scores.accuracy[row].mean()),
        "mean_normalised": float((scores.accuracy[row] / expert_acc).mean()),
    }


def _grid_summary(prefs: np.ndarray, scores: Scores, expert_acc: np.ndarray) -> dict[str, Any]:
    normalised = scores.accuracy / expert_acc
    return {
        "hypervolume": hypervolume(normalised),
        "uniformity": uniformity(prefs, 1.0 - scores.accuracy),
        "mean_normalised": float(normalised.mean()),
        "normalised": normalised.tolist(),
    }


def _equal_and_one_hot(tests: Sequence[TestSet], folder: HeadFolder, expert_acc: np.ndarray) -> dict[str, float]:
    """Mean normalised accuracy at the equal and the one-hot preferences, from one batched fold."""
    T = len(tests)
    prefs = torch.cat([torch.full((1, T), 1.0 / T), torch.eye(T)]).double()
    acc = score(tests, folder.fold(prefs)).accuracy
    return {"equal_mean_normalised": float((acc[0] / expert_acc).mean()),
            "one_hot_mean_normalised": float((acc[1:].diagonal() / expert_acc).mean())}


def _encode_tests(backbone: Backbone, splits: Sequence[TaskSplits], batch_size: int, desc: str | None) -> list[TestSet]:
    return [
        TestSet(backbone.encode(list(s.test.texts), batch_size=batch_size).cpu(), torch.tensor(s.test.labels))
        for s in tqdm(splits, desc=desc, disable=desc is None, unit="task")
    ]


def weighted_task_arithmetic(base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
                             weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t p_t (theta_t - theta_0): one expert at a one-hot preference, their average at equal."""
    return {
        name: (tensor.double() + sum(w * (e[name].double() - tensor.double()) for w, e in zip(weights, experts))).to(tensor.dtype)
        for name, tensor in base.items()
    }


def evaluate_bundle(
    bundle: Bundle,
    inputs: EvaluationInputs,
    *,
    grid_steps: int | None = None,
    baseline: bool = True,
    sweep_beta: bool = True,
    sweep_calibration: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """The full evaluation report as a JSON-ready dict (see `report.write_report` for files and plots)."""
    m = bundle.manifest
    names, T = m.task_names, len(m.tasks)
    if [s.name for s in inputs.splits] != names or [e.task for e in inputs.experts] != names:
        raise ValueError(f"splits and experts must follow the bundle's task order {names}")
    steps = grid_steps or (4 if T <= 3 else 2)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    merged = Backbone.from_pretrained(bundle.backbone_path, pooling=m.backbone.pooling,
                                      max_length=m.backbone.max_length, device=inputs.device)
    tests = _encode_tests(merged, inputs.splits, batch_size, "encode tests (merged)" if progress else None)
    timings["encode_tests"] = time.perf_counter() - start
    experts_eval = [evaluate_head(e.backbone(device=inputs.device), e.head, s.test.texts, s.test.labels, batch_size=batch_size)
                    for e, s in tqdm(list(zip(inputs.experts, inputs.splits)), desc="experts", disable=not progress)]
    expert_acc = np.array([e.accuracy for e in experts_eval])

    c = m.correction
    def solver_for(identity_weight: float = c.identity_weight,
                   stats: list[TaskStatistics] = bundle.statistics) -> CorrectionSolver:
        return CorrectionSolver(c.beta, c.normalisation, identity_weight=identity_weight).fit(stats)

    solver = solver_for()
    folder = HeadFolder(solver, bundle.heads)
    start = time.perf_counter()
    folder.fold(torch.full((1, T), 1.0 / T, dtype=torch.float64))
    timings["one_solve_seconds"] = time.perf_counter() - start

    eye = np.eye(T)
    priority = np.full((T, T), 0.5 / max(T - 1, 1)) * (1 - eye) + 0.5 * eye if T > 1 else eye
    scenario_prefs = {"equal": np.full((1, T), 1.0 / T), **{f"one_hot:{n}": eye[[t]] for t, n in enumerate(names)},
                      **{f"priority:{n}": priority[[t]] for t, n in enumerate(names)}}
    identity = folder.fold_matrices(torch.eye(m.representation_dim, dtype=torch.float64)[None])
    scenarios: dict[str, Any] = {"merged": _summary(score(tests, identity), expert_acc)}
    scenario_scores = score(tests, folder.fold(torch.from_numpy(np.concatenate(list(scenario_prefs.values())))))
    for row, label in enumerate(scenario_prefs):
        scenarios[label] = _summary(scenario_scores, expert_acc, row)

    report: dict[str, Any] = {
        "bundle_id": m.bundle_id, "tasks": names, "beta": c.beta, "normalisation": c.normalisation.value,
        "merge": m.merge.model_dump(mode="json"),
        "prior": {"identity_weight": c.identity_weight, "name": c.prior, "selection": c.prior_selection},
        "head_agreement": m.extra.get("head_agreement"),  # the label-free merge diagnostic (docs/results/rho)
        "majority": [t.majority_accuracy for t in tests],
        "experts": {"accuracy": expert_acc.tolist(), "macro_f1": [e.macro_f1 for e in experts_eval]},
        "scenarios": scenarios,
    }
    report["one_hot"] = {
        "normalised": [scenarios[f"one_hot:{n}"]["normalised"][t] for t, n in enumerate(names)],
        "accuracy": [scenarios[f"one_hot:{n}"]["accuracy"][t] for t, n in enumerate(names)],
    }
    report["one_hot"]["mean_normalised"] = float(np.mean(report["one_hot"]["normalised"]))
    report["priority"] = {
        "favoured_normalised": float(np.mean([scenarios[f"priority:{n}"]["normalised"][t] for t, n in enumerate(names)])),
        "others_normalised": float(np.mean([v for t, n in enumerate(names)
                                            for s, v in enumerate(scenarios[f"priority:{n}"]["normalised"]) if s != t]))
                             if T > 1 else None,
    }

    grid = simplex_grid(T, steps)
    prefs = torch.from_numpy(grid)
    W_t = solver.task_corrections()
    averaged = torch.einsum("pt,tij->pij", prefs, W_t)  # plain weighted averaging of the per-task corrections
    report["grid"] = {
        "steps": steps, "preferences": grid.tolist(),
        "react": _grid_summary(grid, score(tests, folder.fold(prefs)), expert_acc),
        "ablation_weighted_average": _grid_summary(grid, score(tests, folder.fold_matrices(averaged)), expert_acc),
        **{f"ablation_{name}_prior": _grid_summary(
            grid, score(tests, HeadFolder(solver_for(identity_weight=alpha), bundle.heads).fold(prefs)), expert_acc)
           for name, alpha in (("identity", 1.0), ("procrustes", 0.0))},
    }
    if baseline:
        start = time.perf_counter()
        report["grid"]["task_arithmetic"] = _grid_summary(
            grid, _task_arithmetic_scores(inputs, grid, batch_size, progress), expert_acc)
        timings["task_arithmetic_baseline"] = time.perf_counter() - start

    if sweep_beta:
        report["beta_sweep"] = [
            {"beta": beta, **_equal_and_one_hot(tests, HeadFolder(solver.with_beta(beta), bundle.heads), expert_acc)}
            for beta in DEFAULT_BETAS
        ]
    if sweep_calibration:
        start = time.perf_counter()
        report["calibration_sweep"] = _calibration_sweep(bundle, merged, inputs, tests, expert_acc, solver_for, batch_size, progress)
        timings["calibration_sweep"] = time.perf_counter() - start
    report["timings"] = {**m.extra.get("timings", {}), **timings}
    report["statistics_per_task_seconds"] = m.extra.get("statistics_per_task_seconds")
    return report


def _task_arithmetic_scores(inputs: EvaluationInputs, grid: np.ndarray, batch_size: int, progress: bool) -> Scores:
    """Preference-weighted task arithmetic: one re-merged model and one forward pass per preference."""
    recipe = inputs.experts[0].recipe
    backbone = Backbone.from_pretrained(default_backbone_path(), pooling=recipe.pooling, max_length=recipe.max_length,
                                        device=inputs.device)
    base = {k: v.detach().cpu().clone() for k, v in backbone.model.state_dict().items()}
    expert_states = [AutoModel.from_pretrained(e.path, local_files_only=True).state_dict() for e in inputs.experts]
    acc, f1 = np.zeros(grid.shape), np.zeros(grid.shape)
    for i, p in enumerate(tqdm(grid, desc="task arithmetic per preference", disable=not progress)):
        backbone.model.load_state_dict(weighted_task_arithmetic(base, expert_states, p.tolist()))
        for t, (e, s) in enumerate(zip(inputs.experts, inputs.splits)):
            ev = evaluate_head(backbone, e.head, s.test.texts, s.test.labels, batch_size=batch_size)
            acc[i, t], f1[i, t] = ev.accuracy, ev.macro_f1
    return Scores(acc, f1)


def _calibration_sweep(bundle: Bundle, merged: Backbone, inputs: EvaluationInputs, tests: list[TestSet],
                       expert_acc: np.ndarray, solver_for: Callable[..., CorrectionSolver], batch_size: int,
                       progress: bool) -> list[dict[str, Any]]:
    """Accuracy against calibration size from one statistics pass: 10 folds, then sums of the first k."""
    experts = [e.backbone(device=inputs.device) for e in inputs.experts]
    stats = collect_statistics(merged, experts, [list(s.calibration) for s in inputs.splits],
                               folds=CALIBRATION_FOLDS, batch_size=batch_size, progress=progress)
    rows = []
    for k in (1, 2, 5, CALIBRATION_FOLDS):
        subset = [reduce(add, task[:k]).to("cpu") for task in stats.folds]
        rows.append({"fraction": k / CALIBRATION_FOLDS, "samples_per_task": [s.n for s in subset],
                     **_equal_and_one_hot(tests, HeadFolder(solver_for(stats=subset), bundle.heads), expert_acc)})
    return rows
