"""Method registry and the state-dict merge: pure tensors in, merged tensors and a report out."""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor
from tqdm.auto import tqdm

from reprmerge_core.choices import MERGE_METHODS
from reprmerge_core.merging.arithmetic import CONSENSUS, breadcrumbs, magnitude_prune, random_drop
from reprmerge_core.merging.diagnostics import ExpertDiagnostics
from reprmerge_core.merging.params import (
    BreadcrumbsParams,
    DareParams,
    DataAwareParams,
    MergeParams,
    ProjectionParams,
    RegMeanParams,
    TaskArithmeticParams,
    TiesParams,
    validate_params,
)
from reprmerge_core.merging.projection import calibration_loss, diagonal_qp, eigen_qp, regmean, residual_energy

StateDict = Mapping[str, Tensor]
Grams = Mapping[str, Mapping[str, Tensor]]  # task -> linear module name -> (n, n) input Gram
DTYPE = torch.float64


def parameter_seed(seed: int, name: str) -> int:
    """The DARE seed of one parameter, from (seed, name): masks do not depend on which other parameters
    exist or on the order they are merged in, and are stable across processes (crc32, not hash())."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


Sparsifier = Callable[[Tensor, Any, torch.Generator | None], Tensor]
# Each sparsifier reads its own fields from the method's parameters; the generator is DARE's (None otherwise).
SPARSIFIERS: dict[str, Sparsifier] = {
    "none": lambda delta, _p, _g: delta,
    "magnitude": lambda delta, p, _g: magnitude_prune(delta, p.density),
    "random": lambda delta, p, g: random_drop(delta, p.drop_rate, g),
    "breadcrumbs": lambda delta, p, _g: breadcrumbs(delta, p.density, p.gamma),
}


def _projection_rule(deltas: Tensor, grams: Tensor, params: ProjectionParams) -> Tensor:
    if params.basis == "eigen":
        return eigen_qp(deltas, grams, params.rank, params.ridge).update
    return diagonal_qp(deltas, grams, params.ridge).update


@dataclass(frozen=True)
class Method:
    """A merge method = a sparsifier applied to each task vector, per-expert weights, a consensus rule and a
    global lam (`tensor_rule`, for any parameter); data-aware methods add `linear_rule(deltas, grams, params)`
    for linear layers' weights with input Grams, and merge every other parameter by (weighted) averaging.

    `consensus` None means the parameters' `combine` field picks it (dare, breadcrumbs).
    """

    params: type[MergeParams]
    sparsifier: str = "none"
    consensus: str | None = "linear"
    linear_rule: Callable[[Tensor, Tensor, Any], Tensor] | None = None

    @property
    def data_aware(self) -> bool:
        return self.linear_rule is not None

    def tensor_rule(self, deltas: Tensor, params: Any, name: str, weights: Tensor | None = None) -> Tensor:
        """The data-free update of parameter `name` from its task vectors (K, ...) and per-expert weights."""
        lam = params.lam
        if self.data_aware and lam is None:
            lam = 1.0 / deltas.shape[0]  # RegMean's rule outside linear layers: the experts' average
        if self.sparsifier != "none":
            seed = getattr(params, "seed", None)
            generator = None if seed is None else torch.Generator().manual_seed(parameter_seed(seed, name))
            sparsify = SPARSIFIERS[self.sparsifier]
            deltas = torch.stack([sparsify(delta, params, generator) for delta in deltas])  # task order: DARE's draws
        return CONSENSUS[self.consensus or params.combine](deltas, lam, weights)


# Implementations by name; the names themselves live in `reprmerge_core.choices` (light, for the CLI).
_IMPLEMENTATIONS: dict[str, Method] = {
    "task_arithmetic": Method(TaskArithmeticParams),
    "ties": Method(TiesParams, "magnitude", "ties"),
    "dare": Method(DareParams, "random", None),
    "breadcrumbs": Method(BreadcrumbsParams, "breadcrumbs", None),
    "regmean": Method(RegMeanParams, linear_rule=lambda d, g, p: regmean(d, g, p.alpha, p.ridge)),
    "projection": Method(ProjectionParams, linear_rule=_projection_rule),
}
METHODS: dict[str, Method] = {name: _IMPLEMENTATIONS[name] for name in MERGE_METHODS}


def resolve(method: str, params: Mapping[str, Any] | MergeParams | None = None) -> tuple[Method, MergeParams]:
    """The registered method and its validated parameters; unknown names and fields fail here."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    if isinstance(params, MergeParams):
        params = params.model_dump()
    return spec, validate_params(spec.params, method, dict(params or {}))


def resolve_weights(method: str, weights: Mapping[str, float] | None, tasks: Sequence[str]) -> dict[str, float]:
    """Every expert's weight (default 1), validated: known tasks, finite numbers, data-free methods only
    (the data-aware rules fit each task's calibration outputs; a weight there has no agreed meaning yet)."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ValueError(f"weights given for unknown experts {unknown}; the experts are {list(tasks)}")
    bad = {task: w for task, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w)}
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad}")
    if weights and METHODS[method].data_aware and any(w != 1.0 for w in weights.values()):
        raise ValueError(f"per-expert weights apply to the data-free methods, not to {method!r}")
    return {task: float(weights.get(task, 1.0)) for task in tasks}


class LayerDiagnostics(BaseModel):
    """Calibration-output fit of one linear layer: energy = ||r||^2 (loss of the base), loss of the merge,
    rho = 1 - loss / energy (the captured fraction; in [0, 1] at a QP optimum, negative when the merge
    reproduces the experts' outputs worse than the base)."""

    energy: float
    loss: float
    rho: float

    @classmethod
    def of(cls, update: Tensor, deltas: Tensor, grams: Tensor) -> LayerDiagnostics:
        energy = residual_energy(deltas, grams)
        loss = calibration_loss(update, deltas, grams)
        return cls(energy=energy, loss=loss, rho=1.0 - loss / energy if energy > 0 else 1.0)


def overall_rho(layers: Mapping[str, LayerDiagnostics]) -> float | None:
    """Whole-model rho: 1 - sum of losses / sum of energies (layers weighted by their residual energy)."""
    energy = sum(layer.energy for layer in layers.values())
    return 1.0 - sum(layer.loss for layer in layers.values()) / energy if energy > 0 else None


class MergeReport(BaseModel):
    method: str
    params: dict[str, Any]
    experts: list[str]
    merged_parameters: list[str]
    base_parameters: list[str]  # kept bit-exactly at the base: frozen by pattern or untouched by every expert
    layers: dict[str, LayerDiagnostics] = {}
    rho: float | None = None  # whole model: 1 - sum of losses / sum of energies over `layers`
    timings: dict[str, float] = {}
    expert_diagnostics: ExpertDiagnostics | None = None  # head alignment and distance from the base, before merging
    weights: dict[str, float] = {}  # per expert (1 unless given); empty in reports written before weights existed

    @classmethod
    def start(
        cls, method: str, params: MergeParams, experts: Mapping[str, object], weights: Mapping[str, float]
    ) -> MergeReport:
        """`params` are the resolved ones, every default included, so the report says exactly what ran."""
        return cls(
            method=method,
            params=params.model_dump(mode="json"),
            experts=list(experts),
            merged_parameters=[],
            base_parameters=[],
            weights=dict(weights),
        )

    def finish(self, base: StateDict) -> None:
        """List what stayed at the base and compute the whole-model rho from the per-layer diagnostics."""
        merged = set(self.merged_parameters)
        self.base_parameters = [name for name in base if name not in merged]
        self.rho = overall_rho(self.layers)


@dataclass
class MergeResult:
    """The merged tensors (a dict, or for a checkpoint written by `merge_checkpoints` a lazy reader of it)."""

    state_dict: Mapping[str, Tensor]
    report: MergeReport


def state_dict_problems(base: StateDict, experts: Mapping[str, StateDict]) -> list[str]:
    """Human-readable differences of parameter names and shapes between the base and each expert."""
    problems = []
    for task, state in experts.items():
        missing = sorted(set(base) - set(state))
        extra = sorted(set(state) - set(base))
        if missing:
            problems.append(f"expert {task!r} lacks parameters: {', '.join(missing)}")
        if extra:
            problems.append(f"expert {task!r} has parameters the base lacks: {', '.join(extra)}")
        problems += [
            f"parameter {name}: base shape {tuple(base[name].shape)} "
            f"vs expert {task!r} shape {tuple(state[name].shape)}"
            for name in base
            if name in state and base[name].shape != state[name].shape
        ]
    return problems


def check_state_dicts(base: StateDict, experts: Mapping[str, StateDict]) -> None:
    if not experts:
        raise ValueError("at least one expert is needed")
    problems = state_dict_problems(base, experts)
    if problems:
        raise ValueError("incompatible checkpoints:\n  " + "\n  ".join(problems))


def changed_parameters(base: StateDict, experts: Mapping[str, StateDict], freeze: tuple[str, ...]) -> list[str]:
    """Names some expert changed and no freeze pattern matches: the only ones worth merging."""
    names = []
    for name in base:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in freeze):
            continue
        tensor = base[name]  # once: `base` may read from disk
        if not all(torch.equal(sd[name], tensor) for sd in experts.values()):
            names.append(name)
    return names


def _check_grams(grams: Grams, base: StateDict, experts: Mapping[str, StateDict]) -> None:
    if set(grams) != set(experts):
        raise ValueError(f"grams are for tasks {sorted(grams)} but the experts are {sorted(experts)}")
    layers = [set(per_layer) for per_layer in grams.values()]
    if any(names != layers[0] for names in layers):
        raise ValueError("every task needs Grams for the same linear layers")
    for task, per_layer in grams.items():
        for layer, gram in per_layer.items():
            weight = base.get(f"{layer}.weight")
            if weight is None or weight.ndim != 2:
                raise ValueError(f"Grams given for {layer!r}, which has no 2-D parameter {layer}.weight")
            n = weight.shape[1]
            if tuple(gram.shape) != (n, n):
                raise ValueError(f"Gram of task {task!r} for {layer!r} must be ({n}, {n}), got {tuple(gram.shape)}")


def _task_vectors(base: Tensor, experts: Mapping[str, StateDict], name: str) -> tuple[Tensor, Tensor]:
    """The base parameter and the task vectors (K, ...) of parameter `name`, float64, filled in place so that
    only one expert's tensor is read (possibly from disk) at a time."""
    base64 = base.to(DTYPE)
    deltas = torch.empty((len(experts), *base.shape), dtype=DTYPE, device=base.device)
    for k, state in enumerate(experts.values()):
        torch.sub(state[name].to(DTYPE), base64, out=deltas[k])
    return base64, deltas


def _stacked_grams(grams: Grams, tasks: list[str], layer: str) -> Tensor:
    return torch.stack([grams[task][layer].to(DTYPE) for task in tasks])


def _weight_vector(weights: Mapping[str, float] | None, tasks: Sequence[str]) -> Tensor | None:
    """Per-expert weights in task order; None when all are 1 (the unweighted rules, bit-exact)."""
    if weights is None or all(weights[task] == 1.0 for task in tasks):
        return None
    return torch.tensor([weights[task] for task in tasks], dtype=DTYPE)


def iter_merged(
    base: StateDict,
    experts: Mapping[str, StateDict],
    spec: Method,
    params: MergeParams,
    names: Sequence[str],
    grams: Grams | None,
    report: MergeReport,
    progress: bool = False,
    weights: Mapping[str, float] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Merge `names` (all changed by some expert) one at a time, in float64, cast back to the base's dtype.

    A generator, so a caller can write each merged tensor and free it (`merge_checkpoints`); `base` and
    `experts` may be lazy mappings that read a tensor from disk when asked. A `name.weight` whose module has
    Grams gets the method's linear rule (data-aware methods) and a diagnostic in `report.layers`; every
    other parameter gets the method's tensor rule with the per-expert `weights`.
    """
    grams = grams or {}
    tasks = list(experts)
    vector = _weight_vector(weights, tasks)
    for name in tqdm(names, desc="merge", unit="tensor", disable=not progress, leave=False):
        original = base[name]
        if not original.is_floating_point():
            raise ValueError(f"{name} is not a floating-point tensor but differs between the base and an expert")
        base64, deltas = _task_vectors(original, experts, name)
        layer = name.removesuffix(".weight")
        task_grams = (
            _stacked_grams(grams, tasks, layer)
            if (name.endswith(".weight") and grams and layer in grams[tasks[0]])
            else None
        )
        if task_grams is not None and spec.linear_rule is not None:
            update = spec.linear_rule(deltas, task_grams, params)
        else:
            update = spec.tensor_rule(deltas, params, name, vector)
        if task_grams is not None:
            report.layers[layer] = LayerDiagnostics.of(update, deltas, task_grams)
        report.merged_parameters.append(name)
        yield name, (base64 + update).to(original.dtype)


def check_merge(
    method: str, params: Mapping[str, Any] | MergeParams | None, tasks: Sequence[str],
    weights: Mapping[str, float] | None, *, has_grams: bool,
) -> tuple[Method, MergeParams, dict[str, float]]:
    """Resolve the method, its parameters and the per-expert weights, refusing what a one-shot merge cannot do."""
    spec, checked = resolve(method, params)
    if isinstance(checked, DataAwareParams) and checked.sequential:
        raise ValueError(
            "sequential merging needs a model to propagate inputs: use merge_sequential or merge_checkpoints"
        )
    if spec.data_aware and not has_grams:
        raise ValueError(f"method {method!r} is data-aware: pass grams (input Gram matrices per task and linear layer)")
    return spec, checked, resolve_weights(method, weights, tasks)


def iter_merge(
    base: StateDict,
    experts: Mapping[str, StateDict],
    method: str,
    params: Mapping[str, Any] | MergeParams | None = None,
    grams: Grams | None = None,
    *,
    progress: bool = False,
    weights: Mapping[str, float] | None = None,
) -> tuple[MergeReport, Iterator[tuple[str, Tensor]]]:
    """`merge_state_dicts`, one tensor at a time: every base parameter in order, merged or the base's own.

    Everything is checked before this returns; the report is complete once the iterator is exhausted.
    With lazy mappings (`stream.LazyCheckpoint`) a consumer that writes and drops each tensor holds one
    parameter's tensors at a time.
    """
    spec, checked, resolved = check_merge(method, params, list(experts), weights, has_grams=bool(grams))
    check_state_dicts(base, experts)
    if grams:
        _check_grams(grams, base, experts)
    report = MergeReport.start(method, checked, experts, resolved)
    names = changed_parameters(base, experts, checked.freeze)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        merged = iter_merged(base, experts, spec, checked, names, grams, report, progress, resolved)
        pending = next(merged, None)
        for name in base:
            if pending is not None and pending[0] == name:
                yield pending
                pending = next(merged, None)
            else:
                yield name, base[name]
        report.finish(base)

    return report, tensors()


def merge_state_dicts(
    base: StateDict,
    experts: Mapping[str, StateDict],
    method: str,
    params: Mapping[str, Any] | MergeParams | None = None,
    grams: Grams | None = None,
    *,
    progress: bool = False,
    weights: Mapping[str, float] | None = None,
) -> MergeResult:
    """Merge expert state dicts into the base with a registered method.

    `grams[task][module]` are the input Grams of linear module `module` (weight `module.weight`) on task
    `task`'s calibration inputs. Data-aware methods need them; with any method they add per-layer
    diagnostics (energy, loss, rho) to the report. `weights[task]` scales expert `task`'s task vector
    (default 1; data-free methods). Unchanged or frozen parameters are the base's tensors.
    """
    report, tensors = iter_merge(base, experts, method, params, grams, progress=progress, weights=weights)
    state = dict(tensors)
    return MergeResult(state, report)


def diagnose(
    base: StateDict, experts: Mapping[str, StateDict], merged: StateDict, grams: Grams
) -> dict[str, LayerDiagnostics]:
    """Per-layer calibration fit of any merged state dict (e.g. one merged elsewhere or sequentially),
    measured against the given Grams, so different merges are compared on the same calibration data."""
    _check_grams(grams, base, experts)
    tasks = list(experts)
    diagnostics = {}
    for layer in grams[tasks[0]]:
        name = f"{layer}.weight"
        base64, deltas = _task_vectors(base[name], experts, name)
        diagnostics[layer] = LayerDiagnostics.of(
            merged[name].to(DTYPE) - base64, deltas, _stacked_grams(grams, tasks, layer)
        )
    return diagnostics
