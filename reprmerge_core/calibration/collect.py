"""One streaming pass over each task's calibration inputs through the merged backbone and its expert.

Inputs are tokenised once and fed to both models. Sample i of a task goes to fold i mod k; statistics
are kept per fold (they are sums, so the total is their sum) for label-free cross-validation of beta.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from operator import add

import torch
from tqdm.auto import tqdm

from reprmerge_core.backbone import Backbone, batched
from reprmerge_core.correction.statistics import StatisticsAccumulator, TaskStatistics


@dataclass
class CalibrationStatistics:
    """Per task, per fold statistics and where the time went."""

    folds: list[list[TaskStatistics]]  # [task][fold]
    forward_seconds: float = 0.0
    accumulate_seconds: float = 0.0
    samples: list[int] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)  # wall time per task: grows linearly with T

    @property
    def total(self) -> list[TaskStatistics]:
        """Statistics of all folds together, one per task."""
        return [reduce(add, task_folds) for task_folds in self.folds]


def collect_statistics(
    merged: Backbone,
    experts: Sequence[Backbone],
    calibration: Sequence[Sequence[str]],
    *,
    folds: int = 1,
    batch_size: int = 32,
    progress: bool = True,
) -> CalibrationStatistics:
    """Statistics of merged vs expert t representations on task t's calibration inputs."""
    if len(experts) != len(calibration):
        raise ValueError(f"got {len(experts)} experts and {len(calibration)} calibration sets")
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    for t, expert in enumerate(experts):
        if expert.dim != merged.dim:
            raise ValueError(f"expert {t} has representation size {expert.dim}, merged backbone {merged.dim}")
    for t, texts in enumerate(calibration):
        if len(texts) < folds:
            raise ValueError(f"task {t} has {len(texts)} calibration inputs, fewer than {folds} folds")
    result = CalibrationStatistics(folds=[], samples=[len(texts) for texts in calibration])
    bar = tqdm(total=sum(result.samples), desc="statistics", unit="input", disable=not progress)
    for expert, texts in zip(experts, calibration):
        task_start = time.perf_counter()
        accs = [StatisticsAccumulator(merged.dim, device=merged.device) for _ in range(folds)]
        offset = 0
        for chunk in batched(texts, batch_size):
            start = time.perf_counter()
            tokens = merged.tokenize(chunk)
            zm, ze = merged.embed_tokens(tokens), expert.embed_tokens(tokens)
            mid = time.perf_counter()
            fold_of = (torch.arange(len(chunk), device=zm.device) + offset) % folds
            for f in fold_of.unique().tolist():
                rows = fold_of == f
                accs[f].update(zm[rows], ze[rows])
            result.forward_seconds += mid - start
            result.accumulate_seconds += time.perf_counter() - mid
            offset += len(chunk)
            bar.update(len(chunk))
        result.folds.append([acc.result() for acc in accs])
        result.task_seconds.append(time.perf_counter() - task_start)
    bar.close()
    return result
