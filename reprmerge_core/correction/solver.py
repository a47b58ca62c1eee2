"""Closed-form ReACT solves: priors, per-task corrections, preference solves, losses.

Per task t (statistics already normalised, see `Normalisation`):
    C_t = A_t + beta I,  M_t = B_t + beta O_t,  W_t = M_t C_t^{-1}
with the prior O_t = alpha I + (1 - alpha) P_t, P_t the Procrustes rotation of B_t (the paper's prior, alpha = 0)
and alpha the `identity_weight` (alpha = 1: the identity, i.e. "leave the representation as it is"). The closed
form holds for any fixed O_t; a blend of two orthogonal matrices is not orthogonal, but the ridge term
beta ||W - O_t||^2 only needs O_t fixed, and ||O_t||^2 is kept exactly for the losses.
and for a preference p >= 0 (linear scalarisation of the per-task losses):
    W_p = (sum_t p_t M_t) (sum_t p_t C_t)^{-1}
sum_t p_t C_t is symmetric positive definite for beta > 0, so every solve is a Cholesky solve.

Precision: float64 is the reference. With dtype float32 a preference is solved in float32 only when a
rigorous bound on the condition number of sum_t p_t C_t keeps the float32 error small (see
`CorrectionSolver.condition_bound`); the others fall back to float64, so ill-conditioned bundles stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

import torch

from reprmerge_core.choices import Normalisation
from reprmerge_core.correction.statistics import TaskStatistics

PROCRUSTES_TIE_BREAK = 1e-6
# Largest condition-number bound solved in float32: the relative error of a float32 Cholesky solve is about
# cond x 6e-8, so at most ~6e-4 here (3e-5 measured on the tiny bundle: bench_solve.py --agreement); above, float64.
FLOAT32_MAX_CONDITION = 1e4
# Preferences factorised together on CPU: 4 float32 384 x 384 systems (2.4 MB) stay in cache between the
# aggregation, the factorisation and the solves: 20-40% less CPU than one batch of 32 (measured); it bounds the
# transient memory of a solve to ~CPU_CHUNK x d^2 elements whatever the number of preferences.
CPU_CHUNK = 4


def procrustes(B: torch.Tensor, tie_break: float = PROCRUSTES_TIE_BREAK) -> torch.Tensor:
    """Orthogonal matrix closest to B (Frobenius): O = U V^T for B = U S V^T. Batched over leading dims.

    With fewer calibration samples than dimensions B is singular and U V^T is arbitrary on its null
    space: an SVD may rotate directions the data never saw. Adding `tie_break` times the mean singular
    value to the diagonal picks, among the optimal O, the one closest to the identity there (argmax of
    tr(O^T B) + eps tr(O)), and moves a full-rank solution by O(eps) only.
    """
    d = B.shape[-1]
    eye = torch.eye(d, dtype=B.dtype, device=B.device)
    scale = torch.linalg.matrix_norm(B, ord="nuc") / d
    U, _, Vh = torch.linalg.svd(B + tie_break * scale[..., None, None] * eye)
    return U @ Vh


def _inner(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Frobenius inner products <X_p, Y_t> of (P, d, d) and (T, d, d): one (P, d^2) x (d^2, T) matmul."""
    return X.flatten(1) @ Y.flatten(1).T


def quadratic_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """sum over samples of ||W z_m - z_e||^2 from statistics: tr(W A W^T) - 2 tr(W B^T) + e.

    W is (P, d, d), A and B are (T, d, d), e is (T,); the result is (P, T). tr(W A W^T) = <A, W^T W>:
    forming G = W^T W once costs P d^3, where W A_t W^T per task would cost P T d^3.
    """
    G = W.transpose(-1, -2) @ W
    return _inner(G, A) - 2 * _inner(W, B) + e


def _check_preferences(prefs: torch.Tensor, num_tasks: int) -> torch.Tensor:
    if prefs.ndim == 1:
        prefs = prefs.unsqueeze(0)
    if prefs.ndim != 2 or prefs.shape[1] != num_tasks:
        raise ValueError(f"preferences must have shape (P, {num_tasks}), got {tuple(prefs.shape)}")
    if not torch.isfinite(prefs).all() or (prefs < 0).any():
        raise ValueError("preference weights must be finite and non-negative")
    if (prefs.sum(dim=1) <= 0).any():
        raise ValueError("every preference needs at least one positive weight")
    return prefs


class CorrectionSolver:
    """Fits the per-task closed-form terms once, then solves any batch of preferences cheaply.

    Parameters are validated at construction; `fit` takes one `TaskStatistics` per task and keeps
    the stacked C_t, M_t and O_t on `device` in float64. `dtype` is the precision of solves and results:
    float32 solves each preference in float32 when `condition_bound` <= `max_float32_condition`, else in
    float64 (the result is still returned in float32).
    """

    def __init__(
        self,
        beta: float = 1.0,
        normalisation: Normalisation | str = Normalisation.ENERGY,
        *,
        identity_weight: float = 0.0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        max_float32_condition: float = FLOAT32_MAX_CONDITION,
    ) -> None:
        if not (isinstance(beta, (int, float)) and beta > 0 and beta < float("inf")):
            raise ValueError(f"beta must be a finite positive number, got {beta!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if not 0.0 <= identity_weight <= 1.0:
            raise ValueError(f"identity_weight must be in [0, 1], got {identity_weight!r}")
        if not max_float32_condition >= 1:
            raise ValueError(f"max_float32_condition must be >= 1, got {max_float32_condition!r}")
        self.max_float32_condition = float(max_float32_condition)
        self.beta = float(beta)
        self.normalisation = Normalisation(normalisation)
        self.identity_weight = float(identity_weight)
        self.dtype = dtype
        self.device = torch.device(device)
        self._fitted = False
        self._references: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, stats: Sequence[TaskStatistics]) -> CorrectionSolver:
        """Normalise the statistics and precompute C_t, M_t and the priors O_t (one SVD per task unless alpha = 1)."""
        if len(stats) == 0:
            raise ValueError("need statistics for at least one task")
        dims = {s.dim for s in stats}
        if len(dims) != 1:
            raise ValueError(f"all tasks must share one representation size, got {sorted(dims)}")
        d = dims.pop()
        scales = torch.tensor([self.normalisation.scale(s) for s in stats], dtype=torch.float64)
        A = torch.stack([s.A.to(self.device, torch.float64) for s in stats]) / scales.to(self.device)[:, None, None]
        B = torch.stack([s.B.to(self.device, torch.float64) for s in stats]) / scales.to(self.device)[:, None, None]
        e = torch.tensor([s.e for s in stats], dtype=torch.float64) / scales
        eye = torch.eye(d, dtype=torch.float64, device=self.device)
        a = self.identity_weight
        O = eye.expand(len(stats), d, d).clone() if a == 1.0 else a * eye + (1.0 - a) * procrustes(B)
        return self._set_terms(scales, A, B, e.to(self.device), O)

    def _set_terms(self, scales: torch.Tensor, A: torch.Tensor, B: torch.Tensor, e: torch.Tensor,
                   O: torch.Tensor) -> CorrectionSolver:
        eye = torch.eye(A.shape[-1], dtype=torch.float64, device=self.device)
        self.scales_ = scales
        self.A_, self.B_, self.e_, self.O_ = A, B, e, O
        self.O_sq_ = (O**2).sum(dim=(-1, -2))  # ||O_t||^2: d for an orthogonal prior, kept exact here
        self.C_ = A + self.beta * eye
        self.M_ = B + self.beta * O
        self._C_work = self.C_.to(self.dtype)
        self.gram_norm_ = torch.linalg.matrix_norm(A)  # Frobenius norm of each A_t: >= its largest eigenvalue
        self._references = None
        self.num_tasks_, self.dim_ = A.shape[0], A.shape[-1]
        self._fitted = True
        return self

    def with_beta(self, beta: float) -> CorrectionSolver:
        """The same fitted statistics and priors under another beta, without repeating the SVDs (sweeps)."""
        return self._refit(beta, self.dtype)

    def with_dtype(self, dtype: torch.dtype) -> CorrectionSolver:
        """The same fitted solver solving in another precision (e.g. to compare float32 with float64)."""
        return self._refit(self.beta, dtype)

    def _refit(self, beta: float, dtype: torch.dtype) -> CorrectionSolver:
        self.require_fit()
        other = CorrectionSolver(beta, self.normalisation, identity_weight=self.identity_weight, dtype=dtype,
                                 device=self.device,
                                 max_float32_condition=self.max_float32_condition)
        return other._set_terms(self.scales_, self.A_, self.B_, self.e_, self.O_)

    def require_fit(self) -> None:
        if not self._fitted:
            raise RuntimeError("CorrectionSolver is not fitted; call fit(statistics) first")

    # -- solves ------------------------------------------------------------------------------
    def condition_bound(self, prefs: torch.Tensor) -> torch.Tensor:
        """Upper bound on the condition number of sum_t p_t C_t per preference, (P,), float64.

        Weyl: lambda_max(sum p_t C_t) <= sum p_t (||A_t||_F + beta) and, A_t being PSD,
        lambda_min(sum p_t C_t) >= beta sum p_t. So cond <= 1 + (sum p_t ||A_t||_F) / (beta sum p_t):
        O(T) per preference, no decomposition, and never below the true condition number.
        """
        self.require_fit()
        p = _check_preferences(prefs.to(self.device, torch.float64), self.num_tasks_)
        return 1 + (p @ self.gram_norm_) / (self.beta * p.sum(dim=1))

    def right_solve(self, terms: torch.Tensor, prefs: torch.Tensor, executor: Executor | None = None) -> torch.Tensor:
        """(sum_t p_t terms_t) (sum_t p_t C_t)^{-1} per preference, (P, K, d) for float64 terms (T, K, d).

        Cholesky factorisation and two triangular solves with K right-hand sides (C is symmetric), in
        `dtype` where `condition_bound` allows it and in float64 otherwise; the result is in `dtype`.
        With an `executor` (threads running single-threaded torch ops), chunks of preferences are solved
        on its threads in parallel (torch releases the GIL), e.g. one per core the backbone leaves idle.
        """
        self.require_fit()
        p = _check_preferences(prefs.to(self.device, torch.float64), self.num_tasks_)
        if self.dtype == torch.float64:
            return self._right_solve(terms, self.C_, p, executor)
        out = torch.empty(len(p), *terms.shape[1:], dtype=self.dtype, device=self.device)
        exact = self.condition_bound(p) > self.max_float32_condition
        fast = ~exact
        if fast.any():
            out[fast] = self._right_solve(terms.to(self.dtype), self._C_work, p[fast], executor)
        if exact.any():
            out[exact] = self._right_solve(terms, self.C_, p[exact], executor).to(self.dtype)
        return out

    def _right_solve(self, terms: torch.Tensor, C: torch.Tensor, p: torch.Tensor,
                     executor: Executor | None) -> torch.Tensor:
        """right_solve in the dtype of `terms` and `C`, in chunks of preferences on CPU (cache, bounded memory)."""
        p = p.to(C.dtype)
        chunk = CPU_CHUNK if C.device.type == "cpu" else len(p)
        d, rows = C.shape[-1], terms.shape[-2]
        flat_C, flat_terms = C.reshape(len(C), -1), terms.reshape(len(terms), -1)
        out = torch.empty(len(p), rows, d, dtype=C.dtype, device=C.device)

        def solve_chunk(start: int) -> None:
            q = p[start:start + chunk]
            L, info = torch.linalg.cholesky_ex((q @ flat_C).view(-1, d, d))
            if (info != 0).any():
                raise torch.linalg.LinAlgError("sum_t p_t C_t is not positive definite; increase beta")
            # Two triangular solves: ~2.5x faster than torch.cholesky_solve for batched few-column solves on CPU.
            y = torch.linalg.solve_triangular(L, (q @ flat_terms).view(-1, rows, d).transpose(-1, -2), upper=False)
            x = torch.linalg.solve_triangular(L.transpose(-1, -2), y, upper=True)
            out[start:start + chunk] = x.transpose(-1, -2)

        starts = range(0, len(p), chunk)
        if executor is None or len(starts) == 1:
            for start in starts:
                solve_chunk(start)
        else:
            for done in [executor.submit(solve_chunk, start) for start in starts]:
                done.result()  # re-raises a failed chunk's error
        return out

    def task_corrections(self) -> torch.Tensor:
        """W_t for every task, shape (T, d, d)."""
        self.require_fit()
        return self.solve(torch.eye(self.num_tasks_, dtype=torch.float64, device=self.device))

    def solve(self, prefs: torch.Tensor) -> torch.Tensor:
        """W_p for a (P, T) stack of preferences (or one (T,) preference): shape (P, d, d)."""
        self.require_fit()
        return self.right_solve(self.M_, prefs)

    # -- losses ------------------------------------------------------------------------------
    def loss(self, W: torch.Tensor) -> torch.Tensor:
        """Closed-form per-task loss L_t(W) from the statistics alone, shape (P, T) for W (P, d, d).

        L_t(W) = tr(W A_t W^T) - 2 tr(W B_t^T) + e_t + beta ||W - O_t||^2 (normalised statistics).
        """
        self.require_fit()
        W = W.to(self.device, torch.float64)
        if W.ndim == 2:
            W = W.unsqueeze(0)
        # ||W - O_t||^2 = ||W||^2 - 2 <W, O_t> + ||O_t||^2, without a (P, T, d, d) difference tensor.
        prior = (W**2).sum(dim=(-1, -2))[:, None] - 2 * _inner(W, self.O_) + self.O_sq_
        return quadratic_loss(W, self.A_, self.B_, self.e_) + self.beta * prior

    @property
    def tradeoff_bytes_per_preference(self) -> int:
        """Upper bound of `tradeoff`'s temporaries per preference, for callers that bound its memory.

        W_p is formed: its numerator, sum_t p_t C_t, the Cholesky factor and a solve output in the
        solve dtype, then G_p and a contiguous copy of W_p in float64 (peak RSS measured at 4 d^2 x 8).
        """
        self.require_fit()
        size = torch.finfo(self.dtype).bits // 8
        return self.dim_ * self.dim_ * (4 * size + 2 * 8)

    def tradeoff(self, prefs: torch.Tensor) -> torch.Tensor:
        """Per-task closed-form loss at W_p for each preference, shape (P, T)."""
        return self.loss(self.solve(prefs))

    def reference_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(best, uncorrected), each (T,), float64: L_t at the task's own one-hot W_t and at W = I.

        The two ends of `quality_kept`'s scale; solved once (T preference solves) and kept.
        """
        self.require_fit()
        if self._references is None:
            best = self.tradeoff(torch.eye(self.num_tasks_, dtype=torch.float64)).diagonal()
            uncorrected = self.loss(torch.eye(self.dim_, dtype=torch.float64, device=self.device))[0]
            self._references = (best.cpu(), uncorrected.cpu())
        return self._references

    def quality_kept(self, prefs: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """`quality_kept` of every task under each preference, (P, T); `losses` = `tradeoff(prefs)` if known."""
        losses = self.tradeoff(prefs) if losses is None else losses
        return quality_kept(losses.cpu(), *self.reference_losses())


def quality_kept(losses: torch.Tensor, best: torch.Tensor, uncorrected: torch.Tensor) -> torch.Tensor:
    """How much of each task's attainable improvement a correction keeps, in [0, 1], shape of `losses` (P, T).

    kept_t = (L_t(I) - L_t(W_p)) / (L_t(I) - L_t(W_t)), clipped to [0, 1]: 1 at the task's own one-hot
    correction (its lowest loss), 0 at or beyond the loss of the uncorrected merged backbone (W = I) -- what a
    task with weight 0 typically gets, since the other tasks' corrections pull its representation away
    from its expert. A task whose uncorrected loss is already its best (W_t = I) keeps 1 exactly where its
    loss is still the best (to float64 rounding), else 0.
    """
    gap = uncorrected - best
    tolerance = 1e-9 * uncorrected.abs().clamp_min(1.0)
    flat = gap <= tolerance
    kept = (uncorrected - losses) / torch.where(flat, torch.ones_like(gap), gap)
    kept = torch.where(flat, (losses - best <= tolerance).to(kept.dtype), kept)
    return kept.clamp(0.0, 1.0)
