"""The prior chosen by label-free cross-validation (identity, Procrustes or a blend), recorded, used by the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reprmerge_core.bundle import BundleError, load_bundle, write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, CorrectionInfo, MergeInfo, TaskInfo
from reprmerge_core.calibration import choose_correction, cross_validate, select_beta
from reprmerge_core.correction import TaskHead, TaskStatistics
from reprmerge_core.correction.solver import PROCRUSTES_TIE_BREAK
from reprmerge_core.preference import canonical_preference
from service.engine import Engine

D, FOLDS = 32, 4  # D: the tiny test backbone's representation size


def features(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Merged and expert features where one prior is right by construction.

    "identity": the expert is the merged representation plus heavy noise (a rotation fitted to it is noise);
    "rotation": the expert is a fixed random rotation of it plus light noise (the identity is far from it).
    """
    rng = np.random.default_rng(seed)
    zm = rng.normal(size=(n, D)) * np.linspace(0.5, 2.0, D)
    if kind == "identity":
        return zm, zm + 1.5 * rng.normal(size=(n, D))
    rotation, _ = np.linalg.qr(rng.normal(size=(D, D)))
    return zm, zm @ rotation.T + 0.05 * rng.normal(size=(n, D))


def fold_stats(raw: list[tuple[np.ndarray, np.ndarray]]) -> list[list[TaskStatistics]]:
    return [[TaskStatistics.from_features(torch.from_numpy(zm[f::FOLDS]), torch.from_numpy(ze[f::FOLDS]))
             for f in range(FOLDS)] for zm, ze in raw]


def correction(zm: np.ndarray, ze: np.ndarray, beta: float, alpha: float) -> np.ndarray:
    """W_t of one task from raw features in numpy float64: energy normalisation, blended prior, closed form."""
    A, B = zm.T @ zm, ze.T @ zm
    scale = np.trace(A) / D
    A, B = A / scale, B / scale
    shift = PROCRUSTES_TIE_BREAK * np.linalg.svd(B, compute_uv=False).sum() / D  # the documented tie-break
    U, _, Vt = np.linalg.svd(B + shift * np.eye(D))
    prior = alpha * np.eye(D) + (1 - alpha) * U @ Vt
    return np.linalg.solve((A + beta * np.eye(D)).T, (B + beta * prior).T).T


@pytest.mark.parametrize(("kind", "prior"), [("identity", 1.0), ("rotation", 0.0)])
def test_cv_picks_the_prior_that_is_right_by_construction(kind: str, prior: float) -> None:
    raw = [features(kind, n=48, seed=s) for s in range(3)]
    selection = select_beta(fold_stats(raw), identity_weights=[i / 10 for i in range(11)])
    assert abs(selection.identity_weight - prior) <= 0.2, selection
    # the curve says so clearly: the right end beats the wrong end by a margin
    assert selection.prior_score is not None
    right, wrong = selection.prior_score[int(prior * 10)], selection.prior_score[10 - int(prior * 10)]
    assert right < 0.9 * wrong


def test_cv_losses_of_blended_priors_equal_a_computation_on_the_data() -> None:
    raw = [features("identity", n=40, seed=0), features("rotation", n=40, seed=1)]
    betas, alphas = [0.03, 1.0], [0.0, 0.3, 1.0]
    one_hot, equal = cross_validate(fold_stats(raw), betas, alphas)
    for i, alpha in enumerate(alphas):
        for j, beta in enumerate(betas):
            num, den = np.zeros((2, 2)), np.zeros(2)
            for f in range(FOLDS):
                train = [(zm[np.arange(len(zm)) % FOLDS != f], ze[np.arange(len(ze)) % FOLDS != f]) for zm, ze in raw]
                W = [correction(zm, ze, beta, alpha) for zm, ze in train]
                scales = [np.trace(zm.T @ zm) / D for zm, _ in train]
                # equal preference: sum_t p_t M_t (sum_t p_t C_t)^-1 on each task's normalised statistics
                C = sum((zm.T @ zm) / s + beta * np.eye(D) for (zm, _), s in zip(train, scales, strict=True))
                M = sum(Wt @ ((zm.T @ zm) / s + beta * np.eye(D))
                        for Wt, (zm, _), s in zip(W, train, scales, strict=True))
                W_equal = np.linalg.solve(C.T, M.T).T
                for t, (zm, ze) in enumerate(raw):
                    zm_h, ze_h = zm[f::FOLDS], ze[f::FOLDS]
                    num[0, t] += np.sum((zm_h @ W[t].T - ze_h) ** 2)
                    num[1, t] += np.sum((zm_h @ W_equal.T - ze_h) ** 2)
                    den[t] += np.sum(ze_h**2)
            assert float(one_hot[i, j]) == pytest.approx(float(np.mean(num[0] / den)), rel=1e-9)
            assert float(equal[i, j]) == pytest.approx(float(np.mean(num[1] / den)), rel=1e-9)


def _bundle(out: Path, backbone_dir: Path, raw: list[tuple[np.ndarray, np.ndarray]], prior: float | str) -> Path:
    stats = fold_stats(raw)
    info = CorrectionInfo.from_choice(choose_correction(stats, "auto", prior=prior))
    g = torch.Generator().manual_seed(0)
    heads = [TaskHead(torch.randn(2, D, generator=g), torch.randn(2, generator=g)) for _ in raw]
    totals = [TaskStatistics.from_features(torch.from_numpy(zm), torch.from_numpy(ze)) for zm, ze in raw]
    return write_bundle(out, tasks=[TaskInfo(name=f"t{i}", labels=["a", "b"], calibration_samples=len(zm))
                                    for i, (zm, _) in enumerate(raw)],
                        statistics=totals, heads=heads, backbone_dir=backbone_dir, correction=info,
                        merge=MergeInfo(method="ties"),
                        backbone=BackboneInfo(source="test", pooling="mean", max_length=16))


def test_the_service_folds_heads_with_the_chosen_prior(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    raw = [features("identity", n=48, seed=s) for s in range(2)]
    bundle = load_bundle(_bundle(tmp_path / "b", tiny_backbone_dir, raw, "auto"))
    c = bundle.manifest.correction
    assert c.prior_selection is not None and c.beta_selection is not None
    assert c.identity_weight >= 0.8 and c.prior_selection["chosen"]
    assert c.prior_selection["identity_weight"] == c.identity_weight
    assert len(c.prior_selection["score"]) == len(c.prior_selection["candidates"]) == 11
    assert c.beta_selection["beta"] == c.beta
    engine = Engine.load(bundle.path, device="cpu")
    heads = engine.fold([canonical_preference({name: 1.0}, engine.tasks) for name in ("t0", "t1")])
    for t, (zm, ze) in enumerate(raw):
        want = bundle.heads[t].weight.double().numpy() @ correction(zm, ze, c.beta, c.identity_weight)
        np.testing.assert_allclose(heads[t].weight[2 * t:2 * t + 2].double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_fixed_prior_is_kept_and_bad_priors_are_refused(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    raw = [features("identity", n=48, seed=s) for s in range(2)]
    c = load_bundle(_bundle(tmp_path / "b", tiny_backbone_dir, raw, "procrustes")).manifest.correction
    assert c.prior_selection is not None
    assert c.identity_weight == 0.0 and not c.prior_selection["chosen"] and c.prior == "procrustes"
    choice = choose_correction(fold_stats(raw), 0.3, prior=0.25)
    assert choice.identity_weight == 0.25 and choice.beta == 0.3 and not (choice.beta_chosen or choice.prior_chosen)
    # the manifest stores a conversion of the selection's own result: same settings, same curves
    info = CorrectionInfo.model_validate_json(CorrectionInfo.from_choice(choice).model_dump_json())
    assert (info.beta, info.identity_weight, info.normalisation) == (0.3, 0.25, choice.normalisation)
    assert info.beta_selection is not None and info.prior_selection is not None
    assert info.beta_selection["score"] == choice.selection.score and not info.beta_selection["chosen"]
    assert info.prior_selection["candidates"] == choice.selection.identity_weights
    for bad in ("rotation", 1.5):
        with pytest.raises(ValueError, match="prior"):
            choose_correction(fold_stats(raw), "auto", prior=bad)


@pytest.mark.parametrize(("use_prior", "alpha"), [(True, 0.0), (False, 1.0)])
def test_format_1_manifests_still_load(random_bundle: Path, use_prior: bool, alpha: float) -> None:
    manifest = json.loads((random_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["correction"]["identity_weight"] == 0.0
    manifest["format_version"] = 1
    correction = manifest["correction"]
    del correction["identity_weight"], correction["prior_selection"]
    correction["use_prior"] = use_prior
    (random_bundle / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(random_bundle).manifest.correction.identity_weight == alpha
    correction["identity_weight"] = 0.5
    (random_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"correction.*not both"):
        load_bundle(random_bundle)
