"""`reprmerge build`: train (or reuse) experts on a suite, merge them, collect statistics, write a bundle.

Every stage is timed; the bundle's `extra` records the data split, the training recipe and the expert
cache keys, so `reprmerge evaluate` can rebuild the exact test sets and experts later.
"""

from __future__ import annotations

import tempfile
import time

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reprmerge_core.backbone import Backbone, default_backbone_path, select_device
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, MergeInfo, TaskInfo
from reprmerge_core.calibration import choose_correction, collect_statistics, head_agreement
from reprmerge_core.calibration.collect import warn_few_inputs
from reprmerge_core.choices import check_beta, check_prior
from reprmerge_core.correction.solver import Normalisation
from reprmerge_core.data import SuiteConfig, load_suite, resolve_suite
from reprmerge_core.merging import merge_checkpoints, resolve, resolve_weights
from reprmerge_core.training import RECIPES, TrainRecipe, train_experts

DEFAULT_CALIBRATION_SIZE = 500


class BuildConfig(BaseModel):
    """What to build. `suite` is a suite name or a list of task names; `beta="auto"` cross-validates it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str | tuple[str, ...]
    merge: str = "ties"
    merge_params: dict[str, Any] = Field(default_factory=dict)
    merge_weights: dict[str, float] = Field(default_factory=dict)  # task -> weight of its task vector (default 1)
    calibration_size: int | None = Field(None, ge=2)
    beta: float | str = "auto"
    prior: float | str = "auto"  # see `choose_correction`
    normalisation: Normalisation = Normalisation.ENERGY
    folds: int = Field(5, ge=2)
    device: str = "auto"
    cache_dir: Path | None = None
    batch_size: int = Field(32, ge=1)

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float | str) -> float | str:
        return check_beta(v)

    @field_validator("prior")
    @classmethod
    def _prior(cls, v: float | str) -> float | str:
        return check_prior(v)

    def resolved_suite(self) -> SuiteConfig:
        suite = resolve_suite(self.suite)
        if self.calibration_size is not None:
            suite = suite.model_copy(update={"split": suite.split.model_copy(update={"calibration_size": self.calibration_size})})
        if suite.split.calibration_size < self.folds:
            raise ValueError(f"calibration_size {suite.split.calibration_size} is smaller than folds {self.folds}")
        return suite

    def recipe(self) -> TrainRecipe:
        return RECIPES[self.suite] if isinstance(self.suite, str) and self.suite in RECIPES else RECIPES["text6"]


def build_bundle(config: BuildConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the whole offline pipeline and write the bundle atomically to `out`."""
    suite = config.resolved_suite()
    recipe = config.recipe()
    spec, merge_params = resolve(config.merge, config.merge_params)  # fail on bad parameters before training
    resolve_weights(config.merge, config.merge_weights, suite.tasks)
    device = select_device(config.device)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    splits = load_suite(suite)
    timings["data"] = time.perf_counter() - start

    start = time.perf_counter()
    experts = train_experts(splits, recipe, cache_dir=config.cache_dir, device=device, progress=progress)
    timings["experts"] = time.perf_counter() - start

    calibration = {s.name: list(s.calibration) for s in splits}
    warn_few_inputs({task: len(texts) for task, texts in calibration.items()}, experts[0].head.weight.shape[1])
    with tempfile.TemporaryDirectory(prefix="reprmerge-merge-") as work:
        start = time.perf_counter()
        result = merge_checkpoints(
            default_backbone_path(), {e.task: e.path for e in experts}, config.merge, merge_params,
            calibration if spec.data_aware else None, work,
            batch_size=config.batch_size, max_length=recipe.max_length, progress=progress,
            heads={e.task: e.head.weight for e in experts}, weights=config.merge_weights,
        )
        timings["merge"] = time.perf_counter() - start

        merged = Backbone.from_pretrained(work, pooling=recipe.pooling, max_length=recipe.max_length, device=device)
        expert_models = [e.backbone(device=device) for e in experts]
        stats = collect_statistics(merged, expert_models, [calibration[e.task] for e in experts],
                                   folds=config.folds, batch_size=config.batch_size, progress=progress,
                                   heads=[e.head for e in experts])
        timings["statistics_forward"] = stats.forward_seconds
        timings["statistics_accumulate"] = stats.accumulate_seconds

        start = time.perf_counter()
        correction = choose_correction(stats.folds, config.beta, config.normalisation, config.prior)
        timings["beta_selection"] = time.perf_counter() - start

        return write_bundle(
            out,
            tasks=[TaskInfo(name=e.task, labels=list(e.label_names), calibration_samples=n)
                   for e, n in zip(experts, stats.samples)],
            statistics=[s.to("cpu") for s in stats.total],
            heads=[e.head for e in experts],
            backbone_dir=work,
            correction=correction,
            merge=MergeInfo(method=config.merge, parameters=result.report.params, weights=result.report.weights),
            backbone=BackboneInfo(source=f"merge of {len(experts)} experts fine-tuned from all-MiniLM-L6-v2",
                                  pooling=recipe.pooling, max_length=recipe.max_length),
            extra={
                "suite": suite.model_dump(mode="json"),
                "recipe": recipe.model_dump(mode="json"),
                "experts": {e.task: {"cache_key": e.info["cache_key"], "seed": e.info.get("seed"),
                                     "train_seconds": e.info.get("train_seconds")} for e in experts},
                "merge_report": result.report.model_dump(mode="json"),
                "head_agreement": head_agreement([e.task for e in experts], stats.agreement),
                "timings": timings,
                "statistics_per_task_seconds": stats.task_seconds,
                "device": str(device),
                "torch": torch.__version__,
            },
            expert_diagnostics=result.report.expert_diagnostics,
            overwrite=overwrite,
        )


def suite_from_extra(extra: dict[str, Any]) -> tuple[SuiteConfig, TrainRecipe]:
    """The suite and recipe a built bundle was made from (for evaluation)."""
    if "suite" not in extra or "recipe" not in extra:
        raise ValueError("bundle was not built from a built-in suite: no suite/recipe recorded")
    # Bundles built before per-task seeding recorded no `seeding`: their experts all used one seed.
    recipe = TrainRecipe.model_validate({"seeding": "shared", **extra["recipe"]})
    return SuiteConfig.model_validate(extra["suite"]), recipe


