"""Method registry and the state-dict merge: pure tensors in, merged tensors and a report out."""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor
from tqdm.auto import tqdm

from reprmerge_core.choices import MERGE_METHODS
from reprmerge_core.merging.arithmetic import dare, task_arithmetic, ties
from reprmerge_core.merging.diagnostics import ExpertDiagnostics
from reprmerge_core.merging.params import (
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


def _average_rule(deltas: Tensor, params: DataAwareParams, name: str) -> Tensor:
    lam = 1.0 / deltas.shape[0] if params.lam is None else params.lam
    return task_arithmetic(deltas, lam)


def _projection_rule(deltas: Tensor, grams: Tensor, params: ProjectionParams) -> Tensor:
    if params.basis == "eigen":
        return eigen_qp(deltas, grams, params.rank, params.ridge).update
    return diagonal_qp(deltas, grams, params.ridge).update


@dataclass(frozen=True)
class Method:
    """`tensor_rule(deltas, params, name)` merges any parameter without data; `linear_rule(deltas, grams,
    params)` merges a linear layer's weight from its input Grams (data-aware methods only)."""

    params: type[MergeParams]
    tensor_rule: Callable[[Tensor, Any, str], Tensor]
    linear_rule: Callable[[Tensor, Tensor, Any], Tensor] | None = None

    @property
    def data_aware(self) -> bool:
        return self.linear_rule is not None


# Implementations by name; the names themselves live in `reprmerge_core.choices` (light, for the CLI).
_IMPLEMENTATIONS: dict[str, Method] = {
    "task_arithmetic": Method(TaskArithmeticParams, lambda d, p, _n: task_arithmetic(d, p.lam)),
    "ties": Method(TiesParams, lambda d, p, _n: ties(d, p.density, p.lam)),
    "dare": Method(
        DareParams,
        lambda d, p, n: dare(
            d, p.drop_rate, p.lam, p.combine, torch.Generator().manual_seed(parameter_seed(p.seed, n))
        ),
    ),
    "regmean": Method(RegMeanParams, _average_rule, lambda d, g, p: regmean(d, g, p.alpha, p.ridge)),
    "projection": Method(ProjectionParams, _average_rule, _projection_rule),
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

    @classmethod
    def start(cls, method: str, params: MergeParams, experts: Mapping[str, object]) -> MergeReport:
        return cls(
            method=method, params=params.model_dump(), experts=list(experts), merged_parameters=[], base_parameters=[]
        )

    def finish(self, base: StateDict) -> None:
        """List what stayed at the base and compute the whole-model rho from the per-layer diagnostics."""
        merged = set(self.merged_parameters)
        self.base_parameters = [name for name in base if name not in merged]
        self.rho = overall_rho(self.layers)


@dataclass
class MergeResult:
    state_dict: dict[str, Tensor]
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
    return [
        name
        for name in base
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in freeze)
        and not all(torch.equal(sd[name], base[name]) for sd in experts.values())
    ]


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


def _task_vectors(base: StateDict, experts: Mapping[str, StateDict], name: str) -> tuple[Tensor, Tensor]:
    """The base parameter and the task vectors (K, ...) of one parameter, float64."""
    base64 = base[name].to(DTYPE)
    return base64, torch.stack([state[name].to(DTYPE) - base64 for state in experts.values()])


def _stacked_grams(grams: Grams, tasks: list[str], layer: str) -> Tensor:
    return torch.stack([grams[task][layer].to(DTYPE) for task in tasks])


def merge_parameters(
    base: StateDict,
    experts: Mapping[str, StateDict],
    spec: Method,
    params: MergeParams,
    names: list[str],
    grams: Grams | None,
    report: MergeReport,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Merge `names` (all changed by some expert), in float64, cast back to the base's dtype.

    A `name.weight` whose module has Grams gets the method's linear rule (data-aware methods) and a
    diagnostic in `report.layers`; every other parameter gets the method's tensor rule.
    """
    grams = grams or {}
    tasks = list(experts)
    merged = {}
    for name in tqdm(names, desc="merge", unit="tensor", disable=not progress, leave=False):
        if not base[name].is_floating_point():
            raise ValueError(f"{name} is not a floating-point tensor but differs between the base and an expert")
        base64, deltas = _task_vectors(base, experts, name)
        layer = name.removesuffix(".weight")
        task_grams = (
            _stacked_grams(grams, tasks, layer)
            if (name.endswith(".weight") and grams and layer in grams[tasks[0]])
            else None
        )
        if task_grams is not None and spec.linear_rule is not None:
            update = spec.linear_rule(deltas, task_grams, params)
        else:
            update = spec.tensor_rule(deltas, params, name)
        if task_grams is not None:
            report.layers[layer] = LayerDiagnostics.of(update, deltas, task_grams)
        merged[name] = (base64 + update).to(base[name].dtype)
        report.merged_parameters.append(name)
    return merged


def merge_state_dicts(
    base: StateDict,
    experts: Mapping[str, StateDict],
    method: str,
    params: Mapping[str, Any] | MergeParams | None = None,
    grams: Grams | None = None,
    *,
    progress: bool = False,
) -> MergeResult:
    """Merge expert state dicts into the base with a registered method.

    `grams[task][module]` are the input Grams of linear module `module` (weight `module.weight`) on task
    `task`'s calibration inputs. Data-aware methods need them; with any method they add per-layer
    diagnostics (energy, loss, rho) to the report. Unchanged or frozen parameters are the base's tensors.
    """
    spec, checked = resolve(method, params)
    if isinstance(checked, DataAwareParams) and checked.sequential:
        raise ValueError(
            "sequential merging needs a model to propagate inputs: use merge_sequential or merge_checkpoints"
        )
    if spec.data_aware and not grams:
        raise ValueError(f"method {method!r} is data-aware: pass grams (input Gram matrices per task and linear layer)")
    check_state_dicts(base, experts)
    if grams:
        _check_grams(grams, base, experts)
    report = MergeReport.start(method, checked, experts)
    merged = merge_parameters(
        base, experts, spec, checked, changed_parameters(base, experts, checked.freeze), grams, report, progress
    )
    report.finish(base)
    return MergeResult({name: merged.get(name, base[name]) for name in base}, report)


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
        base64, deltas = _task_vectors(base, experts, name)
        diagnostics[layer] = LayerDiagnostics.of(
            merged[name].to(DTYPE) - base64, deltas, _stacked_grams(grams, tasks, layer)
        )
    return diagnostics
