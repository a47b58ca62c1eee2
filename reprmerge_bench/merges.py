"""Shared setup of the merge benchmarks (benchmarks/bench_merge.py, bench_rho.py) and their rank statistics.

A built-in suite's experts (trained once, then from the content-addressed cache), the base encoder and every
state dict; Spearman's rank correlation (ties averaged) and its percentile bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from reprmerge_core.backbone import default_backbone_path
from reprmerge_core.data import TaskSplits, load_suite
from reprmerge_core.merging import text_batches
from reprmerge_core.merging.calibration import Batch
from reprmerge_core.training import RECIPES, Expert, TrainRecipe, train_experts


@dataclass
class MergeSetup:
    """Everything a merge benchmark needs before merging; `base_model` is reloaded with each merge to score it."""

    suite: list[TaskSplits]
    recipe: TrainRecipe
    experts: list[Expert]
    tokenizer: PreTrainedTokenizerBase
    base_model: PreTrainedModel
    base: dict[str, Tensor]
    models: dict[str, PreTrainedModel]
    states: dict[str, dict[str, Tensor]]

    @property
    def tasks(self) -> list[str]:
        return [s.name for s in self.suite]

    def batches(self, calibration: int) -> dict[str, Sequence[Batch]]:
        """Tokenised batches of the first `calibration` calibration inputs of every task."""
        return {s.name: text_batches(self.tokenizer, s.calibration[:calibration], 32, self.recipe.max_length)
                for s in self.suite}


def load_setup(suite_name: str, progress: bool = False) -> MergeSetup:
    """The suite's splits, its recipe's experts, the base encoder and all state dicts (CPU)."""
    base_dir = default_backbone_path()
    suite = load_suite(suite_name)
    recipe = RECIPES[suite_name]
    experts = train_experts(suite, recipe, progress=progress)
    base_model = AutoModel.from_pretrained(base_dir)
    models = {s.name: AutoModel.from_pretrained(e.path) for s, e in zip(suite, experts, strict=True)}
    return MergeSetup(suite, recipe, experts, AutoTokenizer.from_pretrained(base_dir), base_model,
                      {k: v.clone() for k, v in base_model.state_dict().items()}, models,
                      {t: m.state_dict() for t, m in models.items()})


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata, minus one)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rank correlation; nan when either side is constant."""
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_ci(a: ArrayLike, b: ArrayLike, resamples: int = 2000,
                seed: int = 0) -> tuple[float, float, float]:
    """Spearman and its 95% percentile bootstrap interval over the items (resamples with a constant side dropped)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    draws = [spearman(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(resamples))]
    values = np.array([v for v in draws if np.isfinite(v)])
    return spearman(x, y), float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))
