"""`reprmerge evaluate`: how well one merged backbone plus closed-form corrections follows preferences.

Test inputs are encoded once by the merged backbone; every ReACT head (scenarios, a simplex grid,
ablations, a beta sweep, edge sweeps, a simplex map) is then a cheap fold + matmul. The baseline a
user would pick instead, preference-weighted task arithmetic, needs a re-merged model and a new
forward pass per preference.

Two ways in, one report: a built-in suite (`EvaluationInputs`: its splits and cached experts) or a
user's own labelled files and checkpoints (`EvaluationData`); `evaluate_bundle` takes either.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel

from reprmerge_core.backbone import Backbone, Pooling, default_backbone_path, quiet_transformers
from reprmerge_core.bundle import Bundle
from reprmerge_core.calibration import DEFAULT_BETAS, collect_statistics
from reprmerge_core.correction import CorrectionSolver, HeadFolder, TaskHead, TaskStatistics
from reprmerge_core.data import Task, TaskSplits
from reprmerge_core.evaluation.metrics import hypervolume, pareto_front, simplex_grid, uniformity
from reprmerge_core.evaluation.scoring import Scores, TestSet, score
from reprmerge_core.merging import merge_state_dicts
from reprmerge_core.training import Expert, evaluate_head

CALIBRATION_FOLDS = 10
EDGE_POINTS = 11  # preferences per simplex edge: weight 0, 0.1, ..., 1 moved from one task to the other
SIMPLEX_STEPS = 20  # resolution of the 3-task simplex map: 231 preferences


class ComparedExpert(Protocol):
    """What evaluation needs of an expert: its checkpoint (for the task-arithmetic baseline), head, the stage between
    pooling and head (`reprmerge_core.experts.architectures`; None for most) and encoder."""

    @property
    def path(self) -> Path: ...

    @property
    def head(self) -> TaskHead: ...

    @property
    def stage(self) -> torch.nn.Module | None: ...

    def backbone(self, device: str | torch.device = "auto") -> Backbone: ...


@dataclass(frozen=True)
class CheckpointExpert:
    """A user's expert checkpoint (head, pooling and head stage as `experts.read_expert` reads them)."""

    path: Path
    head: TaskHead
    pooling: Pooling
    max_length: int
    stage: torch.nn.Module | None = None

    def backbone(self, device: str | torch.device = "auto") -> Backbone:
        return Backbone.from_pretrained(self.path, pooling=self.pooling, max_length=self.max_length, device=device,
                                        stage=self.stage)


@dataclass(frozen=True)
class EvaluationData:
    """What `evaluate_bundle` measures on, one entry per bundle task in the bundle's order.

    `experts` are compared with and normalise accuracies (without them "normalised" is plain accuracy);
    `base`, the checkpoint the experts were fine-tuned from, enables the task-arithmetic baseline;
    `calibration` (unlabeled inputs per task) the calibration-size sweep.
    """

    tests: Sequence[Task]
    device: torch.device
    experts: Sequence[ComparedExpert] | None = None
    base: Path | None = None
    calibration: list[Sequence[str]] | None = None


@dataclass
class EvaluationInputs:
    """A built-in suite's splits and the experts trained on them (the bundle records suite and recipe)."""

    splits: list[TaskSplits]
    experts: list[Expert]
    device: torch.device

    def data(self) -> EvaluationData:
        if [e.task for e in self.experts] != [s.name for s in self.splits]:
            raise ValueError("experts must follow the splits' task order")
        return EvaluationData([s.test for s in self.splits], self.device, list(self.experts), default_backbone_path(),
                              [s.calibration for s in self.splits])


def default_edges(num_tasks: int) -> list[tuple[int, int]]:
    """Every pair of tasks up to 4 tasks (at most 6 panels); beyond, the ring t -> t+1 (each task in two panels)."""
    if num_tasks <= 4:
        return list(itertools.combinations(range(num_tasks), 2))
    return [(t, (t + 1) % num_tasks) for t in range(num_tasks)]


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


def _encode_tests(backbone: Backbone, tests: Sequence[Task], batch_size: int, desc: str | None) -> list[TestSet]:
    return [
        TestSet(backbone.encode(list(t.texts), batch_size=batch_size).cpu(), torch.tensor(t.labels))
        for t in tqdm(tests, desc=desc, disable=desc is None, unit="task")
    ]


def _check(bundle: Bundle, data: EvaluationData, baseline: bool, sweep_calibration: bool) -> None:
    """Refuse data that does not match the bundle before any forward pass."""
    tasks = bundle.manifest.tasks
    if [t.name for t in data.tests] != [t.name for t in tasks]:
        raise ValueError(f"test data must follow the bundle's task order {[t.name for t in tasks]}, "
                         f"got {[t.name for t in data.tests]}")
    for test, info in zip(data.tests, tasks):
        if list(test.label_names) != list(info.labels):
            raise ValueError(f"task {info.name!r}: test labels {list(test.label_names)} differ from the bundle's "
                             f"{info.labels}")
    if data.experts is not None:
        if len(data.experts) != len(tasks):
            raise ValueError(f"{len(data.experts)} experts for {len(tasks)} tasks: give one per task or none")
        for e, info in zip(data.experts, tasks):
            if e.head.num_classes != len(info.labels):
                raise ValueError(f"expert of {info.name!r} ({e.path}) has {e.head.num_classes} classes, "
                                 f"the bundle's task {len(info.labels)}")
    if baseline and (data.experts is None or data.base is None):
        raise ValueError("the task-arithmetic baseline needs the experts and the base they were fine-tuned from")
    if sweep_calibration and (data.experts is None or data.calibration is None):
        raise ValueError("the calibration sweep needs the experts and unlabeled calibration inputs")


def evaluate_bundle(
    bundle: Bundle,
    inputs: EvaluationInputs | EvaluationData,
    *,
    grid_steps: int | None = None,
    baseline: bool = True,
    sweep_beta: bool = True,
    sweep_calibration: bool = False,
    edges: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """The full evaluation report as a JSON-ready dict (see `report.write_report` for files and plots).

    `edges` are the task pairs (a, b) whose simplex edge is swept (default `default_edges`).
    """
    data = inputs.data() if isinstance(inputs, EvaluationInputs) else inputs
    _check(bundle, data, baseline, sweep_calibration)
    m = bundle.manifest
    names, T = m.task_names, len(m.tasks)
    steps = grid_steps or (4 if T <= 3 else 2)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    merged = Backbone.from_pretrained(bundle.backbone_path, pooling=m.backbone.pooling,
                                      max_length=m.backbone.max_length, device=data.device)
    tests = _encode_tests(merged, data.tests, batch_size, "encode tests (merged)" if progress else None)
    timings["encode_tests"] = time.perf_counter() - start
    experts_eval = [] if data.experts is None else [
        evaluate_head(e.backbone(device=data.device), e.head, t.texts, t.labels, batch_size=batch_size)
        for e, t in tqdm(list(zip(data.experts, data.tests)), desc="experts", disable=not progress)]
    expert_acc = np.array([e.accuracy for e in experts_eval]) if experts_eval else np.ones(T)

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
        "test_examples": [len(t.texts) for t in data.tests],
        "experts": None if not experts_eval else {"accuracy": expert_acc.tolist(),
                                                  "macro_f1": [e.macro_f1 for e in experts_eval]},
        "normalised_by": "experts" if experts_eval else "none",
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
            grid, _task_arithmetic_scores(bundle, data, grid, batch_size, progress), expert_acc)
        timings["task_arithmetic_baseline"] = time.perf_counter() - start

    if sweep_beta:
        report["beta_sweep"] = [
            {"beta": beta, **_equal_and_one_hot(tests, HeadFolder(solver.with_beta(beta), bundle.heads), expert_acc)}
            for beta in DEFAULT_BETAS
        ]
    if T > 1:
        report["edges"] = _edge_sweeps(tests, folder, names, default_edges(T) if edges is None else edges, expert_acc)
    if T == 3:
        report["simplex"] = _simplex_map(tests, folder, expert_acc)
    if sweep_calibration:
        start = time.perf_counter()
        report["calibration_sweep"] = _calibration_sweep(bundle, merged, data, tests, expert_acc, solver_for,
                                                         batch_size, progress)
        timings["calibration_sweep"] = time.perf_counter() - start
    report["timings"] = {**m.extra.get("timings", {}), **timings}
    report["statistics_per_task_seconds"] = m.extra.get("statistics_per_task_seconds")
    return report


def _edge_sweeps(tests: Sequence[TestSet], folder: HeadFolder, names: Sequence[str],
                 edges: Sequence[tuple[int, int]], expert_acc: np.ndarray) -> list[dict[str, Any]]:
    """Every task's accuracy as the preference moves from one-hot a to one-hot b, per edge (a, b): one fold."""
    weight = np.linspace(0.0, 1.0, EDGE_POINTS)
    prefs = np.zeros((len(edges) * EDGE_POINTS, len(names)))
    for i, (a, b) in enumerate(edges):
        if a == b or not (0 <= a < len(names) and 0 <= b < len(names)):
            raise ValueError(f"an edge joins two different tasks of {len(names)}, got ({a}, {b})")
        prefs[i * EDGE_POINTS:(i + 1) * EDGE_POINTS, a] = 1.0 - weight
        prefs[i * EDGE_POINTS:(i + 1) * EDGE_POINTS, b] = weight
    acc = score(tests, folder.fold(torch.from_numpy(prefs))).accuracy
    return [{"tasks": [names[a], names[b]], "weight": weight.tolist(),
             "accuracy": acc[i * EDGE_POINTS:(i + 1) * EDGE_POINTS].tolist(),
             "normalised": (acc[i * EDGE_POINTS:(i + 1) * EDGE_POINTS] / expert_acc).tolist()}
            for i, (a, b) in enumerate(edges)]


def _simplex_map(tests: Sequence[TestSet], folder: HeadFolder, expert_acc: np.ndarray,
                 steps: int = SIMPLEX_STEPS) -> dict[str, Any]:
    """Accuracy over a fine 3-task simplex grid, with its Pareto front in normalised accuracy."""
    prefs = simplex_grid(3, steps)
    acc = score(tests, folder.fold(torch.from_numpy(prefs))).accuracy
    normalised = acc / expert_acc
    return {"steps": steps, "preferences": prefs.tolist(), "accuracy": acc.tolist(), "normalised": normalised.tolist(),
            "pareto": pareto_front(normalised).tolist()}


def _task_arithmetic_scores(bundle: Bundle, data: EvaluationData, grid: np.ndarray, batch_size: int,
                            progress: bool) -> Scores:
    """Preference-weighted task arithmetic: one re-merged model and one forward pass per preference."""
    assert data.experts is not None and data.base is not None  # see _check
    m = bundle.manifest
    backbone = Backbone.from_pretrained(data.base, pooling=m.backbone.pooling, max_length=m.backbone.max_length,
                                        device=data.device)
    base = {k: v.detach().cpu().clone() for k, v in backbone.model.state_dict().items()}
    names = [t.name for t in m.tasks]
    with quiet_transformers():
        expert_states = {name: AutoModel.from_pretrained(e.path, local_files_only=True,
                                                          use_safetensors=True).state_dict()
                         for name, e in zip(names, data.experts)}
    acc, f1 = np.zeros(grid.shape), np.zeros(grid.shape)
    for i, p in enumerate(tqdm(grid, desc="task arithmetic per preference", disable=not progress)):
        # theta_0 + sum_t p_t tau_t: one expert at a one-hot preference, their average at equal
        merged = merge_state_dicts(base, expert_states, "task_arithmetic", {"lam": 1.0},
                                   weights=dict(zip(names, p.tolist())))
        backbone.model.load_state_dict(merged.state_dict)
        for t, (e, test) in enumerate(zip(data.experts, data.tests)):
            backbone.set_stage(e.stage)  # each task keeps its whole head, a stage included
            ev = evaluate_head(backbone, e.head, test.texts, test.labels, batch_size=batch_size)
            acc[i, t], f1[i, t] = ev.accuracy, ev.macro_f1
    return Scores(acc, f1)


def _calibration_sweep(bundle: Bundle, merged: Backbone, data: EvaluationData, tests: list[TestSet],
                       expert_acc: np.ndarray, solver_for: Callable[..., CorrectionSolver], batch_size: int,
                       progress: bool) -> list[dict[str, Any]]:
    """Accuracy against calibration size from one statistics pass: 10 folds, then sums of the first k."""
    assert data.experts is not None and data.calibration is not None  # see _check
    experts = [e.backbone(device=data.device) for e in data.experts]
    stats = collect_statistics(merged, experts, [list(c) for c in data.calibration],
                               folds=CALIBRATION_FOLDS, batch_size=batch_size, progress=progress)
    rows = []
    for k in (1, 2, 5, CALIBRATION_FOLDS):
        subset = [reduce(add, task[:k]).to("cpu") for task in stats.folds]
        rows.append({"fraction": k / CALIBRATION_FOLDS, "samples_per_task": [s.n for s in subset],
                     **_equal_and_one_hot(tests, HeadFolder(solver_for(stats=subset), bundle.heads), expert_acc)})
    return rows
