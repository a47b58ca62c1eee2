"""ReACT math against independent float64 NumPy references on random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reprmerge_core.correction import (
    CorrectionSolver,
    HeadFolder,
    StatisticsAccumulator,
    TaskHead,
    TaskStatistics,
    procrustes,
)
from reprmerge_core.correction.solver import quality_kept

D, T = 12, 3
BETA = 0.5


def make_data(seed: int = 0, d: int = D, tasks: int = T, n: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task: merged features Zm (n, d) and expert features Ze (n, d), with different scales."""
    rng = np.random.default_rng(seed)
    data = []
    for t in range(tasks):
        zm = rng.normal(size=(n + 7 * t, d)) * (1 + t)
        mix = np.eye(d) + 0.4 * rng.normal(size=(d, d))
        ze = zm @ mix.T + 0.2 * rng.normal(size=zm.shape)
        data.append((zm, ze))
    return data


def stats_of(data: list[tuple[np.ndarray, np.ndarray]], batch: int = 9) -> list[TaskStatistics]:
    out = []
    for zm, ze in data:
        acc = StatisticsAccumulator(zm.shape[1])
        for i in range(0, len(zm), batch):  # streaming, in uneven batches, from float32 inputs too
            acc.update(torch.from_numpy(zm[i : i + batch]), torch.from_numpy(ze[i : i + batch]))
        out.append(acc.result())
    return out


def reference_terms(data, beta: float = BETA):
    """Independent NumPy float64: energy-normalised A, B, e, Procrustes O, C and M per task."""
    terms = []
    for zm, ze in data:
        d = zm.shape[1]
        s = np.sum(zm * zm) / d
        A, B, e = zm.T @ zm / s, ze.T @ zm / s, np.sum(ze * ze) / s
        # Procrustes with the documented tie-break toward the identity (1e-6 x mean singular value)
        U, _, Vt = np.linalg.svd(B + 1e-6 * np.linalg.norm(B, "nuc") / d * np.eye(d))
        O = U @ Vt
        terms.append({"A": A, "B": B, "e": e, "O": O, "C": A + beta * np.eye(d), "M": B + beta * O, "s": s, "zm": zm,
                      "ze": ze})
    return terms


def data_loss(W: np.ndarray, term: dict, beta: float = BETA) -> float:
    return float(np.sum((W @ term["zm"].T - term["ze"].T) ** 2) / term["s"] + beta * np.sum((W - term["O"]) ** 2))


@pytest.fixture(scope="module")
def setup():
    data = make_data()
    solver = CorrectionSolver(beta=BETA).fit(stats_of(data))
    return data, solver, reference_terms(data)


def test_optimality_condition(setup) -> None:
    _, solver, ref = setup
    for p in ([0.2, 0.5, 0.3], [1.0, 1.0, 1.0], [0.0, 3.0, 1.0]):
        W = solver.solve(torch.tensor(p, dtype=torch.float64))[0].numpy()
        grad = sum(pt * 2 * (W @ r["C"] - r["M"]) for pt, r in zip(p, ref, strict=True))
        scale = np.linalg.norm(sum(pt * 2 * r["M"] for pt, r in zip(p, ref, strict=True)))
        assert np.linalg.norm(grad) / scale < 1e-9


def test_one_hot_gives_task_correction(setup) -> None:
    _, solver, ref = setup
    W = solver.task_corrections().numpy()
    for t, r in enumerate(ref):
        expected = np.linalg.solve(r["C"].T, r["M"].T).T  # M C^{-1}
        np.testing.assert_allclose(W[t], expected, rtol=1e-9, atol=1e-11)


def test_scaling_preference_changes_nothing(setup) -> None:
    _, solver, _ = setup
    p = torch.tensor([[0.2, 0.5, 0.3], [2.0, 5.0, 3.0], [2e-6, 5e-6, 3e-6]], dtype=torch.float64)
    W = solver.solve(p)
    torch.testing.assert_close(W[1], W[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(W[2], W[0], rtol=1e-10, atol=1e-12)


def test_huge_beta_gives_procrustes_prior(setup) -> None:
    data, _, ref = setup
    solver = CorrectionSolver(beta=1e9).fit(stats_of(data))
    W = solver.task_corrections().numpy()
    for t, r in enumerate(ref):
        np.testing.assert_allclose(W[t], r["O"], atol=1e-6)
        np.testing.assert_allclose(r["O"] @ r["O"].T, np.eye(D), atol=1e-10)


def test_no_perturbation_improves_every_task(setup) -> None:
    _, solver, ref = setup
    rng = np.random.default_rng(1)
    p = np.array([0.3, 0.3, 0.4])
    W = solver.solve(torch.from_numpy(p))[0].numpy()
    base = np.array([data_loss(W, r) for r in ref])
    for scale in (1e-4, 1e-2, 1e-1):
        for _ in range(300):
            Wp = W + scale * rng.normal(size=W.shape)
            losses = np.array([data_loss(Wp, r) for r in ref])
            assert not np.all(losses < base), "a perturbation of W_p improved every task: not Pareto-optimal"
            assert p @ losses >= p @ base - 1e-9


def test_shards_add_up_to_one_pass() -> None:
    (zm, ze), = make_data(seed=3, tasks=1, n=101)
    whole = stats_of([(zm, ze)])[0]
    a = stats_of([(zm[:37], ze[:37])])[0]
    b = stats_of([(zm[37:], ze[37:])])[0]
    total = a + b
    torch.testing.assert_close(total.A, whole.A, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(total.B, whole.B, rtol=1e-12, atol=1e-10)
    assert total.n == whole.n == 101
    assert total.e == pytest.approx(whole.e, rel=1e-12)
    np.testing.assert_allclose(whole.A.numpy(), zm.T @ zm, rtol=1e-12)
    np.testing.assert_allclose(whole.B.numpy(), ze.T @ zm, rtol=1e-12)


def test_batched_solves_equal_single_solves(setup) -> None:
    _, solver, _ = setup
    prefs = torch.rand(16, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.01
    batched = solver.solve(prefs)
    for i in range(len(prefs)):
        torch.testing.assert_close(batched[i], solver.solve(prefs[i])[0], rtol=1e-12, atol=1e-12)


def test_fold_spread_over_threads_equals_serial_fold(setup) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _, solver, _ = setup
    g = torch.Generator().manual_seed(6)
    heads = [TaskHead(torch.randn(k, D, generator=g), torch.randn(k, generator=g)) for k in (2, 5, 3)]
    prefs = torch.rand(13, T, dtype=torch.float64, generator=g) + 0.01  # several chunks, the last one short
    for s in (solver, solver.with_dtype(torch.float32)):
        folder = HeadFolder(s, heads)
        with ThreadPoolExecutor(2) as pool:
            torch.testing.assert_close(folder.fold(prefs, pool).weight, folder.fold(prefs).weight, rtol=0, atol=0)
            eye = torch.eye(D, dtype=torch.float64)
            bad = CorrectionSolver(beta=1.0, normalisation="none").fit([TaskStatistics(-2 * eye, eye, 1, 1.0)] * T)
            with pytest.raises(torch.linalg.LinAlgError):  # a failing chunk fails the call, not silently its thread
                bad.right_solve(bad.M_, prefs, pool)


def test_fused_heads_equal_head_of_corrected_representation(setup) -> None:
    data, solver, _ = setup
    g = torch.Generator().manual_seed(2)
    heads = [TaskHead(torch.randn(k, D, generator=g), torch.randn(k, generator=g)) for k in (2, 5, 3)]
    prefs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [1.0, 1.0, 1.0]], dtype=torch.float64)
    folder = HeadFolder(solver, heads, out_dtype=torch.float64)
    fused = folder.fold(prefs)
    W = solver.solve(prefs)
    z = torch.from_numpy(data[0][0][:10])
    for i in range(len(prefs)):
        corrected = z @ W[i].T
        for t, h in enumerate(heads):
            expected = corrected @ h.weight.double().T + h.bias.double()
            torch.testing.assert_close(fused.logits(z, i, t), expected, rtol=1e-9, atol=1e-9)


def test_closed_form_loss_equals_data_loss(setup) -> None:
    _, solver, ref = setup
    g = torch.Generator().manual_seed(4)
    Ws = torch.randn(3, D, D, generator=g, dtype=torch.float64)
    Ws[0] = solver.solve(torch.tensor([0.2, 0.5, 0.3]))[0]
    closed = solver.loss(Ws).numpy()
    for i in range(len(Ws)):
        for t, r in enumerate(ref):
            assert closed[i, t] == pytest.approx(data_loss(Ws[i].numpy(), r), rel=1e-9)


def test_tradeoff_equals_the_direct_float64_formula(setup) -> None:
    """The G = W^T W form of the loss against NumPy: W_p solved explicitly, tr(W A W^T) and ||W - O||^2 literally."""
    _, solver, ref = setup
    prefs = np.array([[1, 0, 0], [0.2, 0.5, 0.3], [1, 1, 1], [0, 3, 1]], dtype=np.float64)
    got = solver.tradeoff(torch.from_numpy(prefs)).numpy()
    for i, p in enumerate(prefs / prefs.sum(1, keepdims=True)):
        M = sum(pt * r["M"] for pt, r in zip(p, ref, strict=True))
        W = M @ np.linalg.inv(sum(pt * r["C"] for pt, r in zip(p, ref, strict=True)))
        for t, r in enumerate(ref):
            direct = np.trace(W @ r["A"] @ W.T) - 2 * np.trace(W @ r["B"].T) + r["e"] + BETA * np.sum((W - r["O"]) ** 2)
            assert got[i, t] == pytest.approx(direct, rel=1e-12)


def test_quality_kept_against_direct_float64_losses(setup) -> None:
    """kept_t = (L_t(I) - L_t(W_p)) / (L_t(I) - L_t(W_t)) clipped to [0, 1], every loss from the data literally."""
    _, solver, ref = setup
    prefs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 0.3], [1, 1, 1], [0, 3, 1], [5, 0, 1]],
                     dtype=np.float64)
    got = solver.quality_kept(torch.from_numpy(prefs)).numpy()
    own = [reference_solve(ref, np.eye(T)[t]) for t in range(T)]
    best = np.array([data_loss(own[t], r) for t, r in enumerate(ref)])
    uncorrected = np.array([data_loss(np.eye(D), r) for r in ref])
    assert (uncorrected > best).all()
    raw = []
    for i, p in enumerate(prefs):
        W = reference_solve(ref, p / p.sum())
        losses = np.array([data_loss(W, r) for r in ref])
        raw.append((uncorrected - losses) / (uncorrected - best))
        np.testing.assert_allclose(got[i], np.clip(raw[-1], 0, 1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.diag(got[:T]), 1.0, rtol=0, atol=1e-12)
    # the clip is exercised: some task at weight 0 does worse than the uncorrected backbone (raw < 0)
    assert min(min(r) for r in raw) < 0 and (got >= 0).all() and (got <= 1).all()


def test_quality_kept_when_the_backbone_is_already_the_best() -> None:
    """A task whose W_t is the identity has no gap to close: 1 where its loss is the best, 0 elsewhere."""
    best, uncorrected = torch.tensor([2.0, 5.0], dtype=torch.float64), torch.tensor([2.0, 9.0], dtype=torch.float64)
    losses = torch.tensor([[2.0, 7.0], [2.5, 11.0]], dtype=torch.float64)
    assert quality_kept(losses, best, uncorrected).tolist() == [[1.0, 0.5], [0.0, 0.0]]


def test_energy_normalisation_makes_beta_scale_and_size_free() -> None:
    data = make_data(seed=5)
    W = CorrectionSolver(beta=BETA).fit(stats_of(data)).task_corrections()
    scaled = [(zm * 7.0, ze * 7.0) for zm, ze in data]
    doubled = [(np.vstack([zm, zm]), np.vstack([ze, ze])) for zm, ze in data]
    for other in (scaled, doubled):
        torch.testing.assert_close(CorrectionSolver(beta=BETA).fit(stats_of(other)).task_corrections(), W)
    # without normalisation the same beta means something else on a larger sample
    raw = CorrectionSolver(beta=BETA, normalisation="none")
    assert not torch.allclose(raw.fit(stats_of(doubled)).task_corrections(), raw.fit(stats_of(data)).task_corrections())


def test_identity_prior_option(setup) -> None:
    data, _, _ = setup
    W = CorrectionSolver(beta=1e9, identity_weight=1.0).fit(stats_of(data)).task_corrections()
    torch.testing.assert_close(W, torch.eye(D, dtype=torch.float64).expand(T, D, D), atol=1e-6, rtol=0)
    # a blend: a huge beta returns the prior itself, alpha I + (1 - alpha) Procrustes
    solver = CorrectionSolver(beta=1e9, identity_weight=0.3).fit(stats_of(data))
    want = 0.3 * torch.eye(D, dtype=torch.float64) + 0.7 * procrustes(solver.B_)
    torch.testing.assert_close(solver.task_corrections(), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="identity_weight"):
        CorrectionSolver(identity_weight=1.5)


def test_float32_solve_close_to_float64(setup) -> None:
    data, solver, _ = setup
    W32 = CorrectionSolver(beta=BETA, dtype=torch.float32).fit(stats_of(data)).solve(torch.tensor([0.2, 0.5, 0.3]))
    torch.testing.assert_close(W32.double(), solver.solve(torch.tensor([0.2, 0.5, 0.3])), rtol=1e-3, atol=1e-4)


def reference_solve(terms: list[dict], p: np.ndarray) -> np.ndarray:
    """W_p = (sum p_t M_t)(sum p_t C_t)^{-1} by NumPy's float64 LU solve (an independent route)."""
    C = sum(pt * r["C"] for pt, r in zip(p, terms, strict=True))
    M = sum(pt * r["M"] for pt, r in zip(p, terms, strict=True))
    return np.linalg.solve(C.T, M.T).T


def ill_conditioned_data(seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    """Features scaled over 5 decades along a random basis (a diagonal scaling would not hurt Cholesky):
    with beta = 1e-6, sum_t p_t C_t has condition ~1e7."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(D, D)))
    S = Q @ np.diag(np.logspace(-4, 1, D)) @ Q.T
    return [(zm @ S, ze @ S) for zm, ze in make_data(seed)]


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def test_condition_bound_is_an_upper_bound(setup) -> None:
    data, _, _ = setup
    prefs = np.vstack([np.eye(T), np.random.default_rng(8).exponential(size=(20, T)), [[1e-9, 1.0, 0.0]]])
    for beta, dataset in ((BETA, data), (1e-6, ill_conditioned_data())):
        solver = CorrectionSolver(beta=beta).fit(stats_of(dataset))
        ref = reference_terms(dataset, beta)
        bound = solver.condition_bound(torch.from_numpy(prefs)).numpy()
        true = np.array([np.linalg.cond(sum(pt * r["C"] for pt, r in zip(p, ref, strict=True))) for p in prefs])
        assert np.all(true <= bound * (1 + 1e-9)), (true, bound)
        assert np.all(bound <= 10 * true), "the bound is too loose to be a useful guard"


def test_float32_guard_falls_back_to_float64_on_ill_conditioned_systems() -> None:
    data = ill_conditioned_data()
    ref = reference_terms(data, beta=1e-6)
    prefs = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    expected = np.stack([reference_solve(ref, p) for p in prefs])
    guarded = CorrectionSolver(beta=1e-6, dtype=torch.float32).fit(stats_of(data))
    assert (guarded.condition_bound(torch.from_numpy(prefs)) > guarded.max_float32_condition).all()
    got = guarded.solve(torch.from_numpy(prefs))
    assert got.dtype == torch.float32
    assert relative_error(got.double().numpy(), expected) < 1e-6  # float64 solve, rounded to float32
    # the same solves in float32 regardless of conditioning are far off: the guard is what keeps them exact
    unguarded = CorrectionSolver(beta=1e-6, dtype=torch.float32, max_float32_condition=float("inf")).fit(stats_of(data))
    assert relative_error(unguarded.solve(torch.from_numpy(prefs)).double().numpy(), expected) > 1e-3
    # a little worse conditioned and the float32 factorisation breaks down altogether
    worse = CorrectionSolver(beta=1e-8, dtype=torch.float32, max_float32_condition=float("inf")).fit(stats_of(data))
    with pytest.raises(torch.linalg.LinAlgError):
        worse.solve(torch.from_numpy(prefs))
    guarded_worse = CorrectionSolver(beta=1e-8, dtype=torch.float32).fit(stats_of(data))
    expected = np.stack([reference_solve(reference_terms(data, beta=1e-8), p) for p in prefs])
    assert relative_error(guarded_worse.solve(torch.from_numpy(prefs)).double().numpy(), expected) < 1e-6


def test_float32_guard_splits_a_mixed_batch(setup) -> None:
    _, solver64, ref = setup
    prefs = torch.from_numpy(np.random.default_rng(9).exponential(size=(11, T)))
    bounds = solver64.condition_bound(prefs)
    threshold = float(bounds.median())
    guarded = solver64.with_dtype(torch.float32)
    guarded.max_float32_condition = threshold
    got = guarded.solve(prefs).double()
    exact = solver64.solve(prefs)
    fast = solver64.with_dtype(torch.float32)
    fast.max_float32_condition = float("inf")
    float32_only = fast.solve(prefs).double()
    for i in range(len(prefs)):
        if bounds[i] > threshold:  # float64 solve, rounded to float32 at the end
            torch.testing.assert_close(got[i], exact[i].float().double(), rtol=0, atol=0)
        else:
            torch.testing.assert_close(got[i], float32_only[i], rtol=1e-6, atol=1e-6)
            assert not torch.equal(got[i], exact[i].float().double()), "expected a float32 solve"
        np.testing.assert_allclose(got[i].numpy(), reference_solve(ref, prefs[i].numpy()), rtol=1e-4, atol=1e-5)


def test_float32_fold_matches_float64_reference(setup) -> None:
    _, solver64, ref = setup
    g = torch.Generator().manual_seed(5)
    heads = [TaskHead(torch.randn(k, D, generator=g), torch.randn(k, generator=g)) for k in (2, 5, 3)]
    H = torch.cat([h.weight for h in heads]).double().numpy()
    prefs = torch.from_numpy(np.random.default_rng(10).exponential(size=(9, T)))  # more than one chunk
    fused = HeadFolder(solver64.with_dtype(torch.float32), heads).fold(prefs).weight
    assert fused.dtype == torch.float32
    for i, p in enumerate(prefs.numpy()):
        np.testing.assert_allclose(fused[i].double().numpy(), H @ reference_solve(ref, p), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta": 0.0}, "beta"), ({"beta": float("nan")}, "beta"), ({"normalisation": "zscore"}, "zscore"),
     ({"dtype": torch.float16}, "dtype"), ({"max_float32_condition": 0.5}, "max_float32_condition")],
)
def test_bad_parameters_fail_early(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CorrectionSolver(**kwargs)


def test_bad_preferences_and_inputs_are_refused(setup) -> None:
    _, solver, _ = setup
    for p, match in (([1.0, 0.0], r"\(P, 3\)"), ([-1.0, 1.0, 1.0], "non-negative"), ([0.0, 0.0, 0.0], "positive"),
                     ([float("nan"), 1.0, 1.0], "finite")):
        with pytest.raises(ValueError, match=match):
            solver.solve(torch.tensor(p, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="not fitted"):
        CorrectionSolver().solve(torch.ones(3))
    acc = StatisticsAccumulator(4)
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((2, 4), float("nan")), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="match"):
        acc.update(torch.zeros(2, 4), torch.zeros(3, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_path_matches_cpu(setup) -> None:
    data, solver, _ = setup
    stats = [s.to("cuda") for s in stats_of(data)]
    cuda = CorrectionSolver(beta=BETA, device="cuda").fit(stats)
    prefs = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(cuda.solve(prefs).cpu(), solver.solve(prefs), rtol=1e-9, atol=1e-10)
    acc = StatisticsAccumulator(D, device="cuda")
    acc.update(torch.from_numpy(data[0][0]).cuda(), torch.from_numpy(data[0][1]).cuda())
    torch.testing.assert_close(acc.result().A.cpu(), stats_of(data)[0].A, rtol=1e-10, atol=1e-9)


def test_fold_matrices_of_the_solution_equal_fold(setup) -> None:
    _, solver, _ = setup
    g = torch.Generator().manual_seed(3)
    heads = [TaskHead(torch.randn(k, D, generator=g), torch.randn(k, generator=g)) for k in (2, 5, 3)]
    folder = HeadFolder(solver, heads, out_dtype=torch.float64)
    prefs = torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(folder.fold_matrices(solver.solve(prefs)).weight, folder.fold(prefs).weight)
    identity = folder.fold_matrices(torch.eye(D, dtype=torch.float64)[None]).weight[0]
    torch.testing.assert_close(identity, torch.cat([h.weight for h in heads]).double())


def test_with_beta_equals_a_fresh_fit(setup) -> None:
    data, solver, _ = setup
    for beta in (0.01, 3.0):
        fresh = CorrectionSolver(beta=beta).fit(stats_of(data))
        torch.testing.assert_close(solver.with_beta(beta).task_corrections(), fresh.task_corrections())


def test_procrustes_is_identity_on_directions_the_data_never_saw() -> None:
    from reprmerge_core.correction import procrustes

    rng = np.random.default_rng(6)
    zm = rng.normal(size=(5, D))  # 5 samples in 12 dimensions: B has rank 5
    B = torch.from_numpy(zm.T @ zm)  # expert == merged
    torch.testing.assert_close(procrustes(B), torch.eye(D, dtype=torch.float64), atol=1e-9, rtol=0)
    full = torch.from_numpy(rng.normal(size=(D, D)))
    U, _, Vh = np.linalg.svd(full.numpy())
    torch.testing.assert_close(procrustes(full), torch.from_numpy(U @ Vh), atol=1e-4, rtol=0)
