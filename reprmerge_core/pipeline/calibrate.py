"""`reprmerge calibrate`: a bundle from a user's own merged backbone, expert checkpoints and inputs.

Experts are read by `reprmerge_core.experts` (head.safetensors, or the head of a supported sequence
classifier, read where it reads); `plan` checks everything before any forward pass. Then one statistics
pass, beta chosen by cross-validation, and the bundle written atomically; or, with `shard`, one shard of
the statistics for `shards.reduce_shards`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from reprmerge_core.backbone import Pooling
from reprmerge_core.calibration import collect_statistics, head_agreement
from reprmerge_core.correction.solver import Normalisation
from reprmerge_core.experts import ExpertSource, has_head, read_expert
from reprmerge_core.pipeline.plan import prepare_calibration, write_calibrated
from reprmerge_core.pipeline.shards import ShardSpec, calibrate_shard, reduce_shards

# Names this module held before the split, importable here still (their homes: `experts`, `shards`).
__all__ = ["ExpertSource", "ShardSpec", "calibrate_bundle", "has_head", "read_expert", "reduce_shards"]


def calibrate_bundle(
    backbone: str | Path,
    experts: Mapping[str, str | Path],
    calibration: Mapping[str, Sequence[str]],
    out: str | Path,
    *,
    shard: ShardSpec | None = None,
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
    With `shard`, only that shard's inputs are used and `out` is a shard file for `shards.reduce_shards`.
    """
    plan, merged, models, texts = prepare_calibration(
        backbone, experts, calibration, out, pooling=pooling, max_length=max_length, beta=beta, prior=prior,
        normalisation=normalisation, folds=folds, merge_method=merge_method, device=device, overwrite=overwrite,
        base=base, force=force)
    if shard is not None:
        return calibrate_shard(plan, merged, models, texts, Path(out), shard, batch_size=batch_size, progress=progress)
    # Head agreement (the expert's head on merged vs expert features) needs both to be the same representation;
    # an expert whose head has a stage of its own reads its stage output, the merged backbone its [CLS] state.
    comparable = all(s.stage is None for s in plan.sources)
    stats = collect_statistics(merged, models, texts, folds=folds, batch_size=batch_size, progress=progress,
                               heads=[s.head for s in plan.sources] if comparable else None)
    return write_calibrated(
        plan, stats.folds, out, overwrite=overwrite,
        timings={"statistics_forward": stats.forward_seconds, "statistics_accumulate": stats.accumulate_seconds},
        extra={"statistics_per_task_seconds": stats.task_seconds,
               "head_agreement": head_agreement([s.name for s in plan.sources], stats.agreement)})
