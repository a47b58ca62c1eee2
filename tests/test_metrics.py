"""Evaluation metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reprmerge_core.evaluation.metrics import hypervolume, macro_f1, simplex_grid, uniformity


def test_simplex_grid_counts_and_sums() -> None:
    for T, steps in ((2, 4), (3, 4), (6, 2), (1, 3)):
        grid = simplex_grid(T, steps)
        assert len(grid) == math.comb(steps + T - 1, T - 1)
        np.testing.assert_allclose(grid.sum(axis=1), 1.0)
        assert (grid >= 0).all() and len({tuple(r) for r in grid}) == len(grid)
        np.testing.assert_allclose(grid * steps, np.round(grid * steps))
    np.testing.assert_allclose(simplex_grid(2, 2), np.array([[0, 1], [0.5, 0.5], [1, 0]]))



def test_macro_f1_matches_a_hand_computed_case() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2])
    # class 0: TP 2 FP 0 FN 1 -> 4/5; class 1: TP 1 FP 1 FN 1 -> 1/2; class 2: TP 1 FP 1 FN 0 -> 2/3
    assert macro_f1(predictions, labels) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    # A class only ever predicted still counts (F1 0), as in scikit-learn's macro average.
    assert macro_f1(torch.tensor([0, 3]), torch.tensor([0, 0])) == pytest.approx((2 / 3 + 0) / 2)
    assert macro_f1(np.array([0, 3]), np.array([0, 0])) == pytest.approx((2 / 3 + 0) / 2)  # numpy arrays too
    with pytest.raises(ValueError, match="zero examples"):
        macro_f1(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))

def test_hypervolume_equals_union_of_boxes_in_2d() -> None:
    pts = np.array([[0.9, 0.2], [0.5, 0.6], [0.2, 0.8], [0.4, 0.4]])  # the last one is dominated
    # union of [0,x]x[0,y] boxes of the three non-dominated points, by hand
    expected = 0.9 * 0.2 + 0.5 * (0.6 - 0.2) + 0.2 * (0.8 - 0.6)
    assert hypervolume(pts) == pytest.approx(expected, rel=1e-12)
    assert hypervolume(np.array([[0.5, 0.5, 0.5]])) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="non-empty"):
        hypervolume(np.zeros((0, 2)))


def test_uniformity_by_hand() -> None:
    # errors inversely proportional to the preference: perfectly aligned
    assert uniformity(np.array([[0.25, 0.75]]), np.array([[0.3, 0.1]])) == pytest.approx(1.0)
    # one-hot preference: a = (1, 0), KL = log 2, U = 0
    assert uniformity(np.array([[1.0, 0.0]]), np.array([[0.2, 0.4]])) == pytest.approx(0.0)
    p, l = np.array([0.5, 0.5, 0.0]), np.array([0.1, 0.3, 0.5])  # a = (0.25, 0.75, 0)
    expected = 1 - (0.25 * math.log(0.75) + 0.75 * math.log(2.25)) / math.log(3)
    assert uniformity(p[None], l[None]) == pytest.approx(expected)
    assert uniformity(np.array([[0.5, 0.5]]), np.zeros((1, 2))) == 1.0
