"""Metrics of a controllable merge (method.md §3): simplex grids, hypervolume and preference alignment."""

from __future__ import annotations

import itertools
import math

import moocore
import numpy as np


def simplex_grid(num_tasks: int, steps: int) -> np.ndarray:
    """Every preference with weights in multiples of 1/steps summing to 1, shape (C(steps+T-1, T-1), T)."""
    if num_tasks < 1 or steps < 1:
        raise ValueError(f"need num_tasks >= 1 and steps >= 1, got {num_tasks}, {steps}")
    points = [
        np.diff(np.array((-1, *bars, steps + num_tasks - 1))) - 1  # stars and bars
        for bars in itertools.combinations(range(steps + num_tasks - 1), num_tasks - 1)
    ]
    return np.array(points, dtype=np.float64).reshape(-1, num_tasks) / steps


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
    for p, l in zip(preferences, errors):
        weighted = p * l
        total = weighted.sum()
        if total <= 0:
            values.append(1.0)
            continue
        a = weighted / total
        kl = float(sum(x * math.log(x * T) for x in a if x > 0))
        values.append(1.0 - kl / math.log(T))
    return float(np.mean(values))
