"""Statistics from real (tiny) transformers models, and label-free beta selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reprmerge_core.backbone import Backbone
from reprmerge_core.calibration import collect_statistics, select_beta
from reprmerge_core.correction import CorrectionSolver, TaskHead, TaskStatistics
from tests.helpers import make_tiny_backbone

TEXTS = [f"calibration sentence number {i} about {w}" for i, w in enumerate(["cats", "dogs", "news", "sport"] * 5)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> tuple[Backbone, Backbone]:
    expert_dir = make_tiny_backbone(tmp_path_factory.mktemp("expert"), seed=1)
    return (Backbone.from_pretrained(tiny_backbone_dir, device="cpu", max_length=16),
            Backbone.from_pretrained(expert_dir, device="cpu", max_length=16))


def test_statistics_match_direct_features(models) -> None:
    merged, expert = models
    zm = merged.encode(TEXTS, batch_size=20).double().numpy()
    ze = expert.encode(TEXTS, batch_size=20).double().numpy()
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(3, merged.dim, generator=g) for _ in range(2)]  # centred on the merged features
    heads = [TaskHead(w, -w @ torch.from_numpy(zm.mean(0)).float()) for w in weights]
    result = collect_statistics(merged, [expert, merged], [TEXTS, TEXTS[:7]], folds=3, batch_size=6, progress=False,
                                heads=heads)
    total = result.total
    # padding differs between batch sizes; mean pooling over the mask keeps features equal to ~1e-6
    np.testing.assert_allclose(total[0].A.numpy(), zm.T @ zm, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(total[0].B.numpy(), ze.T @ zm, rtol=1e-4, atol=1e-4)
    assert total[0].e == pytest.approx(float(np.sum(ze * ze)), rel=1e-5)
    assert [s.n for s in result.folds[0]] == [7, 7, 6] and total[1].n == 7
    fold0 = zm[0::3]
    np.testing.assert_allclose(result.folds[0][0].A.numpy(), fold0.T @ fold0, rtol=1e-4, atol=1e-4)
    assert result.samples == [20, 7] and result.forward_seconds > 0
    # head agreement: how often head 0 picks the same class on merged and expert features (1 for the backbone itself)
    H, b = heads[0].weight.double().numpy(), heads[0].bias.double().numpy()
    agree = np.mean((zm @ H.T + b).argmax(1) == (ze @ H.T + b).argmax(1))
    assert 0 < agree < 1 and result.agreement == [pytest.approx(agree), 1.0]
    assert collect_statistics(merged, [expert], [TEXTS], progress=False).agreement is None


def test_collect_refuses_mismatched_inputs(models) -> None:
    merged, expert = models
    with pytest.raises(ValueError, match="2 experts and 1 calibration"):
        collect_statistics(merged, [expert, expert], [TEXTS], progress=False)
    with pytest.raises(ValueError, match="fewer than 5 folds"):
        collect_statistics(merged, [expert], [TEXTS[:3]], folds=5, progress=False)


def synthetic_folds(n: int, d: int = 24, folds: int = 4, tasks: int = 2, seed: int = 0):
    """Experts are noisy linear maps of the merged features; returns stats [task][fold] and raw data."""
    rng = np.random.default_rng(seed)
    out, raw = [], []
    for _ in range(tasks):
        mix = np.eye(d) + 0.5 * rng.normal(size=(d, d)) / np.sqrt(d)
        zm = rng.normal(size=(n, d))
        ze = zm @ mix.T + 0.5 * rng.normal(size=(n, d))
        raw.append((zm, ze))
        out.append([TaskStatistics.from_features(torch.from_numpy(zm[f::folds]), torch.from_numpy(ze[f::folds]))
                    for f in range(folds)])
    return out, raw


def test_held_out_scores_and_choice_equal_a_data_computation() -> None:
    fold_stats, raw = synthetic_folds(n=60, folds=3)
    sel = select_beta(fold_stats, candidates=[0.01, 0.1, 1.0, 10.0])
    # independent: per fold, solve on the other folds, measure relative held-out squared error on the data,
    # of each one-hot correction on its task and of the equal-preference correction on every task
    score = []
    for i, beta in enumerate(sel.candidates):
        num, den = np.zeros((2, 2)), np.zeros(2)
        for f in range(3):
            train = [sum((s for j, s in enumerate(task) if j != f),
                         start=TaskStatistics.zeros(24)) for task in fold_stats]
            solver = CorrectionSolver(beta).fit(train)
            W, W_equal = solver.task_corrections().numpy(), solver.solve(torch.ones(1, 2).double())[0].numpy()
            for t, (zm, ze) in enumerate(raw):
                zm_h, ze_h = zm[f::3], ze[f::3]
                num[0, t] += np.sum((zm_h @ W[t].T - ze_h) ** 2)
                num[1, t] += np.sum((zm_h @ W_equal.T - ze_h) ** 2)
                den[t] += np.sum(ze_h**2)
        one_hot, equal = np.mean(num / den, axis=1)
        assert sel.one_hot[i] == pytest.approx(float(one_hot), rel=1e-9)
        assert sel.equal[i] == pytest.approx(float(equal), rel=1e-9)
        score.append((one_hot + equal) / 2)
    assert sel.beta == sel.candidates[int(np.argmin(score))]  # an interior minimum: 1.0 of 0.01..10


def test_fewer_samples_than_dimensions_choose_a_stronger_prior() -> None:
    few = select_beta(synthetic_folds(n=20, d=24)[0])
    many = select_beta(synthetic_folds(n=2000, d=24)[0])
    assert few.beta > many.beta
    assert len(many.one_hot) == len(many.candidates) == len(many.equal)


def test_an_expert_equal_to_the_backbone_keeps_scores_finite() -> None:
    rng = np.random.default_rng(2)
    zm = rng.normal(size=(40, 6))
    folds = [[TaskStatistics.from_features(torch.from_numpy(zm[f::4]), torch.from_numpy(zm[f::4])) for f in range(4)]]
    sel = select_beta(folds)
    assert all(np.isfinite(sel.score)) and max(sel.score) < 1e-6


def test_select_beta_validates_folds() -> None:
    fold_stats, _ = synthetic_folds(n=20, folds=1)
    with pytest.raises(ValueError, match="folds"):
        select_beta(fold_stats)
