"""Scoring fused heads on labelled test features: accuracy and macro-F1 per (preference, task)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reprmerge_core.correction.heads import FusedHeads
from reprmerge_core.evaluation.metrics import macro_f1


@dataclass(frozen=True)
class TestSet:
    """One task's test inputs as representations of some backbone, with their labels."""

    features: torch.Tensor  # (n, d)
    labels: torch.Tensor  # (n,) long

    @property
    def majority_accuracy(self) -> float:
        """Accuracy of always answering the most frequent test label: the floor any head must beat."""
        return float(torch.bincount(self.labels).max()) / len(self.labels)


@dataclass(frozen=True)
class Scores:
    accuracy: np.ndarray  # (P, T)
    macro_f1: np.ndarray  # (P, T)


def score(tests: Sequence[TestSet], fused: FusedHeads) -> Scores:
    """Accuracy and macro-F1 of every fused preference head on every task's test set."""
    P, T = fused.weight.shape[0], len(tests)
    acc, f1 = np.zeros((P, T)), np.zeros((P, T))
    for t, test in enumerate(tests):
        s = fused.slices[t]
        z = test.features.to(fused.weight)
        predictions = (torch.einsum("nd,pkd->pnk", z, fused.weight[:, s]) + fused.bias[s]).argmax(-1).cpu()
        for p in range(P):
            acc[p, t] = float((predictions[p] == test.labels).float().mean())
            f1[p, t] = macro_f1(predictions[p], test.labels)
    return Scores(acc, f1)
