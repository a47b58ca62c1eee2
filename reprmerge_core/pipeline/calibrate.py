"""`reprmerge calibrate`: a bundle from a user's own merged backbone, expert checkpoints and inputs.

Experts are read by `reprmerge_core.experts` (head.safetensors, or the head of a supported sequence
classifier, read where it reads). Everything is checked before any forward pass: task names, paths,
architecture, representation size, vocabulary, heads, calibration inputs for exactly the experts, and
(with `base`) each expert's distance from the base. Then one statistics pass, beta chosen by
cross-validation, and the bundle written atomically (`write_calibrated`, shared with `shards`, which
splits the statistics pass over machines).
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
from reprmerge_core.calibration import choose_correction, collect_statistics, head_agreement, prior_identity_weight
from reprmerge_core.checks import checkpoint_dir
from reprmerge_core.correction import TaskStatistics
from reprmerge_core.correction.solver import Normalisation
from reprmerge_core.experts import ExpertSource, read_expert
from reprmerge_core.merging.checkpoints import checked_inputs, check_experts, compatibility_problems, distances_from_base
from reprmerge_core.merging.diagnostics import ExpertDiagnostics


@dataclass(frozen=True)
class CalibrationPlan:
    """Everything a bundle needs besides statistics; shards record it so `shards.reduce_shards` can finish the bundle."""

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
    problems = compatibility_problems(backbone, paths)
    if base is not None:
        problems += [f"base: {p}" for p in compatibility_problems(base_dir, paths)]
    if problems:
        raise ValueError("experts do not match the backbone:\n  " + "\n  ".join(problems))
    sources = [read_expert(name, path, pooling) for name, path in paths.items()]
    poolings = {s.pooling for s in sources}
    if len(poolings) != 1:
        raise ValueError(f"experts read different representations ({sorted(poolings)}); one bundle needs one pooling")
    diagnostics = check_experts({s.name: s.head.weight for s in sources},
                                None if base is None else distances_from_base(base_dir, paths), force=force)
    return CalibrationPlan(backbone, sources, poolings.pop(), max_length, beta, normalisation, folds, merge_method,
                           diagnostics, prior)


def load_models(plan: CalibrationPlan, device: str) -> tuple[Backbone, list[Backbone]]:
    """The merged backbone and each expert computing the representation its head reads."""
    dev = select_device(device)
    merged = Backbone.from_pretrained(plan.backbone, pooling=plan.pooling, max_length=plan.max_length, device=dev)
    for s in plan.sources:
        if s.head.weight.shape[1] != merged.dim:
            raise ValueError(f"expert {s.name!r}: head input size {s.head.weight.shape[1]} != representation size {merged.dim}")
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
        merge=MergeInfo(method=plan.merge_method),
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


def calibrate_bundle(
    backbone: str | Path,
    experts: Mapping[str, str | Path],
    calibration: Mapping[str, Sequence[str]],
    out: str | Path,
    *,
    pooling: Pooling = "mean",
    max_length: int = 128,
    beta: float | str = "auto",
    prior: float | str = "auto",
    normalisation: Normalisation = Normalisation.ENERGY,
    folds: int = 5,
    merge_method: str = "unknown",
    device: str = "auto",
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
    base: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Statistics of `backbone` (already merged) against each expert on its task's inputs, as a bundle.

    `base` (the checkpoint the experts were fine-tuned from) adds each expert's distance from it to the
    diagnostics recorded in the bundle, and refuses an expert far from it unless `force`.
    `shards.calibrate_shard` computes one shard of the same statistics.
    """
    plan, merged, models, texts = prepare_calibration(
        backbone, experts, calibration, out, pooling=pooling, max_length=max_length, beta=beta, prior=prior,
        normalisation=normalisation, folds=folds, merge_method=merge_method, device=device, overwrite=overwrite,
        base=base, force=force)
    stats = collect_statistics(merged, models, texts, folds=folds, batch_size=batch_size, progress=progress,
                               heads=[s.head for s in plan.sources])
    return write_calibrated(
        plan, stats.folds, out, overwrite=overwrite,
        timings={"statistics_forward": stats.forward_seconds, "statistics_accumulate": stats.accumulate_seconds},
        extra={"statistics_per_task_seconds": stats.task_seconds,
               "head_agreement": head_agreement([s.name for s in plan.sources], stats.agreement)})
