"""One streaming pass over each task's calibration inputs through the merged backbone and its expert.

Inputs are tokenised once and fed to both models. Sample i of a task goes to fold i mod k; statistics
are kept per fold (they are sums, so the total is their sum) for label-free cross-validation of beta.

Given the task heads, the same pass measures head agreement: the fraction of task t's calibration inputs on which
head t picks the same class on the merged representation as on expert t's. It needs no labels and ranks merges
like their accuracy under the task heads far better than the weight-space rho (docs/results/rho), so it is the
merge diagnostic a bundle reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from functools import reduce
from operator import add

import torch
from tqdm.auto import tqdm

from reprmerge_core.backbone import Backbone, batched
from reprmerge_core.correction.heads import TaskHead
from reprmerge_core.correction.statistics import StatisticsAccumulator, TaskStatistics

logger = logging.getLogger(__name__)


@dataclass
class CalibrationStatistics:
    """Per task, per fold statistics and where the time went."""

    folds: list[list[TaskStatistics]]  # [task][fold]
    forward_seconds: float = 0.0
    accumulate_seconds: float = 0.0
    samples: list[int] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)  # wall time per task: grows linearly with T
    agreement: list[float] | None = None  # per task, with heads: fraction of inputs where merged and expert agree

    @property
    def total(self) -> list[TaskStatistics]:
        """Statistics of all folds together, one per task."""
        return [reduce(add, task_folds) for task_folds in self.folds]


def _agreements(head: TaskHead, merged: torch.Tensor, expert: torch.Tensor) -> int:
    """How many rows get the same class from `head` on merged as on expert features."""
    zm, ze = merged.double(), expert.double()
    weight, bias = head.weight.to(zm), head.bias.to(zm)
    return int(((zm @ weight.T + bias).argmax(1) == (ze @ weight.T + bias).argmax(1)).sum())


def warn_few_inputs(counts: Mapping[str, int], dim: int) -> list[str]:
    """A warning (logged, and returned) per task with no more calibration inputs than the representation has
    dimensions: A_t = sum z z^T then has rank below d, and beta and the prior alone fill the missing directions."""
    messages = [f"task {task!r} has {n} calibration inputs for a {dim}-dimensional representation: the statistics "
                f"need more inputs than dimensions to be full rank (at least {dim + 1}; several times that is "
                "better); with fewer, the correction in the missing directions comes from beta and the prior alone"
                for task, n in counts.items() if n <= dim]
    for message in messages:
        logger.warning(message)
    return messages


def head_agreement(tasks: Sequence[str], agreement: Sequence[float] | None) -> dict[str, Any] | None:
    """The bundle's record of head agreement: per task and the mean over tasks (None when not measured)."""
    if agreement is None:
        return None
    return {"per_task": dict(zip(tasks, agreement)), "mean": sum(agreement) / len(agreement)}


def collect_statistics(
    merged: Backbone,
    experts: Sequence[Backbone],
    calibration: Sequence[Sequence[str]],
    *,
    folds: int = 1,
    batch_size: int = 32,
    progress: bool = True,
    heads: Sequence[TaskHead] | None = None,
) -> CalibrationStatistics:
    """Statistics of merged vs expert t representations on task t's calibration inputs (and, with `heads`,
    head agreement)."""
    if len(experts) != len(calibration):
        raise ValueError(f"got {len(experts)} experts and {len(calibration)} calibration sets")
    if heads is not None and len(heads) != len(experts):
        raise ValueError(f"got {len(heads)} heads for {len(experts)} experts")
    for t, head in enumerate(heads or []):
        if head.weight.shape[1] != merged.dim:
            raise ValueError(f"head {t} reads size {head.weight.shape[1]}, merged backbone gives {merged.dim}")
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    for t, expert in enumerate(experts):
        if expert.dim != merged.dim:
            raise ValueError(f"expert {t} has representation size {expert.dim}, merged backbone {merged.dim}")
    for t, texts in enumerate(calibration):
        if len(texts) < folds:
            raise ValueError(f"task {t} has {len(texts)} calibration inputs, fewer than {folds} folds")
    result = CalibrationStatistics(folds=[], samples=[len(texts) for texts in calibration],
                                   agreement=None if heads is None else [])
    bar = tqdm(total=sum(result.samples), desc="statistics", unit="input", disable=not progress)
    for t, (expert, texts) in enumerate(zip(experts, calibration)):
        task_start = time.perf_counter()
        accs = [StatisticsAccumulator(merged.dim, device=merged.device) for _ in range(folds)]
        offset = agreed = 0
        for chunk in batched(texts, batch_size):
            start = time.perf_counter()
            tokens = merged.tokenize(chunk)
            zm, ze = merged.embed_tokens(tokens), expert.embed_tokens(tokens)
            mid = time.perf_counter()
            fold_of = (torch.arange(len(chunk), device=zm.device) + offset) % folds
            for f in fold_of.unique().tolist():
                rows = fold_of == f
                accs[f].update(zm[rows], ze[rows])
            if heads is not None:
                agreed += _agreements(heads[t], zm, ze)
            result.forward_seconds += mid - start
            result.accumulate_seconds += time.perf_counter() - mid
            offset += len(chunk)
            bar.update(len(chunk))
        result.folds.append([acc.result() for acc in accs])
        if result.agreement is not None:
            result.agreement.append(agreed / len(texts))
        result.task_seconds.append(time.perf_counter() - task_start)
    bar.close()
    return result
