"""Metrics of a controllable merge (method.md §3): macro-F1, simplex grids, hypervolume and preference alignment."""

from __future__ import annotations

import math

import moocore
import numpy as np
from numpy.typing import ArrayLike

from reprmerge_core.preference import grid_points


def macro_f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over classes seen in labels or predictions.

    Same convention as scikit-learn's default `f1_score(average="macro")` (not installed here), so a
    class the head never predicts counts as F1 0 rather than vanishing from the average. Takes numpy
    arrays or CPU tensors of class indices.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be equal 1-D")
    if labels.size == 0:
        raise ValueError("macro-F1 of zero examples is undefined")
    scores = []
    for c in np.unique(np.concatenate([predictions, labels])):
        tp = int(((predictions == c) & (labels == c)).sum())
        wrong = int((predictions == c).sum()) + int((labels == c).sum()) - 2 * tp  # FP + FN
        scores.append(2 * tp / (2 * tp + wrong))
    return sum(scores) / len(scores)


def simplex_grid(num_tasks: int, steps: int) -> np.ndarray:
    """Every preference with weights in multiples of 1/steps summing to 1, shape (C(steps+T-1, T-1), T)."""
    return np.array(grid_points(num_tasks, steps), dtype=np.float64).reshape(-1, num_tasks) / steps


def hypervolume(scores: np.ndarray, reference: float = 0.0) -> float:
    """Exact hypervolume (moocore) of per-task scores to maximise, e.g. normalised accuracies, shape (P, T)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty (points, tasks) array, got shape {scores.shape}")
    return float(moocore.hypervolume(scores, ref=np.full(scores.shape[1], reference), maximise=True))


def pareto_front(scores: np.ndarray) -> np.ndarray:
    """Which rows of per-task scores to maximise, shape (P, T), no other row dominates (ties all kept)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty (points, tasks) array, got shape {scores.shape}")
    return np.asarray(moocore.is_nondominated(scores, maximise=True, keep_weakly=True), dtype=bool)


def uniformity(preferences: np.ndarray, errors: np.ndarray) -> float:
    """Preference alignment of EPO (Mahapatra and Rajan 2020), averaged over preferences.

    For each preference p with task errors l: a_t = p_t l_t / sum_s p_s l_s and
    U = 1 - KL(a || uniform) / log T. U = 1 when every p_t l_t is equal (errors inversely
    proportional to the preference); a preference with a single non-zero weight scores 0.
    Preferences whose weighted error is zero (perfect on every weighted task) count as aligned.
    """
    preferences, errors = np.asarray(preferences, np.float64), np.asarray(errors, np.float64)
    if preferences.shape != errors.shape or preferences.ndim != 2:
        raise ValueError(f"preferences {preferences.shape} and errors {errors.shape} must be equal (P, T) arrays")
    T = preferences.shape[1]
    if T < 2:
        raise ValueError("uniformity needs at least two tasks")
    values = []
    for p, l in zip(preferences, errors, strict=True):
        weighted = p * l
        total = weighted.sum()
        if total <= 0:
            values.append(1.0)
            continue
        a = weighted / total
        kl = float(sum(x * math.log(x * T) for x in a if x > 0))
        values.append(1.0 - kl / math.log(T))
    return float(np.mean(values))
