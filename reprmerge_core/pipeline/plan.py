"""What a calibration needs around its statistics pass: every check first (`plan_calibration`), the models,
and the bundle written from per-fold statistics (`write_calibrated`), shared by one pass (`calibrate`) and by
reduced shards (`shards`).

Checked before any forward pass: task names, paths (local safetensors checkpoints, named with their
expert), architecture, representation size, vocabulary, heads (`reprmerge_core.experts`), calibration
inputs for exactly the experts, and with a base each expert's distance from it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from operator import add
from pathlib import Path

from reprmerge_core.artifacts import check_output
from reprmerge_core.backbone import Backbone, Pooling, select_device
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, MergeInfo, TaskInfo
from reprmerge_core.calibration import choose_correction, prior_identity_weight
from reprmerge_core.calibration.collect import warn_few_inputs
from reprmerge_core.checks import checkpoint_dir
from reprmerge_core.correction import TaskStatistics
from reprmerge_core.correction.solver import Normalisation
from reprmerge_core.experts import ExpertSource, read_expert
from reprmerge_core.merging.checkpoints import (
    REPORT_FILE,
    check_experts,
    checked_inputs,
    compatibility_problems,
    distances_from_base,
    read_merge_report,
)
from reprmerge_core.merging.diagnostics import ExpertDiagnostics


@dataclass(frozen=True)
class CalibrationPlan:
    """Everything a bundle needs besides statistics; shards record it so `shards.reduce_shards` can finish it."""

    backbone: Path
    sources: list[ExpertSource]
    pooling: Pooling
    max_length: int
    beta: float | str
    normalisation: Normalisation
    folds: int
    merge_method: str
    diagnostics: ExpertDiagnostics | None = None
    prior: float | str = "auto"


def plan_calibration(
    backbone: str | Path, experts: Mapping[str, str | Path], calibration: Mapping[str, Sequence[str]], *,
    pooling: Pooling, max_length: int, beta: float | str, normalisation: Normalisation, folds: int,
    merge_method: str, base: str | Path | None = None, prior: float | str = "auto", force: bool = False,
) -> CalibrationPlan:
    """Every check that needs no forward pass (see the module docstring), and the experts' diagnostics.

    Head alignment is always measured; distances from the base only when `base` is given (an expert far
    from it is refused unless `force`).
    """
    if not experts:
        raise ValueError("at least one --expert is needed")
    backbone = checkpoint_dir(backbone, "backbone")
    base_dir, paths = checked_inputs(backbone if base is None else base, experts)
    if prior != "auto":
        prior_identity_weight(prior)
    if set(calibration) != set(experts):
        raise ValueError(f"calibration inputs are needed for exactly the experts {sorted(experts)}; "
                         f"got {sorted(calibration)}")
    for name, texts in calibration.items():
        if len(texts) < folds:
            raise ValueError(f"calibration for {name!r} has {len(texts)} inputs; at least {folds} are needed")
    merge_info(backbone, merge_method)  # a contradicting --merge-method fails here, before any forward pass
    problems = compatibility_problems(backbone, paths)
    if base is not None:
        problems += [f"base: {p}" for p in compatibility_problems(base_dir, paths)]
    if problems:
        raise ValueError("experts do not match the backbone:\n  " + "\n  ".join(problems))
    sources = [read_expert(name, path, pooling) for name, path in paths.items()]
    warn_few_inputs({name: len(texts) for name, texts in calibration.items()}, sources[0].head.weight.shape[1])
    poolings = {s.pooling for s in sources}
    if len(poolings) != 1:
        raise ValueError(f"experts read different representations ({sorted(poolings)}); one bundle needs one pooling")
    diagnostics = check_experts({s.name: s.head.weight for s in sources},
                                None if base is None else distances_from_base(base_dir, paths), force=force)
    return CalibrationPlan(backbone, sources, poolings.pop(), max_length, beta, normalisation, folds, merge_method,
                           diagnostics, prior)


def merge_info(backbone: Path, merge_method: str) -> MergeInfo:
    """The merge recorded in the backbone's merge report (`reprmerge merge` writes one: method, every parameter,
    the experts' weights), else just the method the user named."""
    report = read_merge_report(backbone)
    if report is None:
        return MergeInfo(method=merge_method)
    if merge_method not in ("unknown", report.method):
        raise ValueError(f"--merge-method {merge_method!r} contradicts {backbone / REPORT_FILE}, "
                         f"which records {report.method!r}")
    return MergeInfo(method=report.method, parameters=report.params, weights=report.weights)


def load_models(plan: CalibrationPlan, device: str) -> tuple[Backbone, list[Backbone]]:
    """The merged backbone and each expert computing the representation its head reads."""
    dev = select_device(device)
    merged = Backbone.from_pretrained(plan.backbone, pooling=plan.pooling, max_length=plan.max_length, device=dev)
    for s in plan.sources:
        if s.head.weight.shape[1] != merged.dim:
            raise ValueError(f"expert {s.name!r}: head input size {s.head.weight.shape[1]} != representation size "
                             f"{merged.dim}")
    models = [Backbone.from_pretrained(s.path, pooling=plan.pooling, max_length=plan.max_length, device=dev,
                                       stage=s.stage) for s in plan.sources]
    return merged, models


def write_calibrated(plan: CalibrationPlan, fold_stats: Sequence[Sequence[TaskStatistics]], out: str | Path, *,
                     timings: Mapping[str, float], extra: Mapping[str, object], overwrite: bool) -> Path:
    """Choose beta on the per-fold statistics and write the bundle (one path for one pass and for reduced shards)."""
    start = time.perf_counter()
    folds = [[x.to("cpu") for x in task] for task in fold_stats]
    correction = choose_correction(folds, plan.beta, plan.normalisation, plan.prior)
    totals = [reduce(add, task) for task in folds]
    return write_bundle(
        out,
        tasks=[TaskInfo(name=s.name, labels=s.labels, calibration_samples=x.n) for s, x in zip(plan.sources, totals)],
        statistics=totals,
        heads=[s.head for s in plan.sources],
        backbone_dir=plan.backbone,
        correction=correction,
        merge=merge_info(plan.backbone, plan.merge_method),
        backbone=BackboneInfo(source=str(plan.backbone), pooling=plan.pooling, max_length=plan.max_length),
        extra={"timings": {**timings, "beta_selection": time.perf_counter() - start}, **extra,
               "experts": {s.name: str(s.path) for s in plan.sources}},
        expert_diagnostics=plan.diagnostics,
        overwrite=overwrite,
    )


def prepare_calibration(
    backbone: str | Path, experts: Mapping[str, str | Path], calibration: Mapping[str, Sequence[str]], out: str | Path,
    *, pooling: Pooling, max_length: int, beta: float | str, prior: float | str, normalisation: Normalisation,
    folds: int, merge_method: str, device: str, overwrite: bool, base: str | Path | None, force: bool,
) -> tuple[CalibrationPlan, Backbone, list[Backbone], list[list[str]]]:
    """Everything before the statistics pass (shared with `shards.calibrate_shard`): the output checked, the
    plan with every check, the models loaded and each expert's inputs in plan order."""
    inputs = {"backbone": backbone, **{f"expert {name!r}": path for name, path in experts.items()},
              **({} if base is None else {"base": base})}
    check_output(out, inputs, overwrite=overwrite)
    plan = plan_calibration(backbone, experts, calibration, pooling=pooling, max_length=max_length, beta=beta,
                            normalisation=normalisation, folds=folds, merge_method=merge_method, base=base,
                            prior=prior, force=force)
    merged, models = load_models(plan, device)
    return plan, merged, models, [list(calibration[s.name]) for s in plan.sources]
