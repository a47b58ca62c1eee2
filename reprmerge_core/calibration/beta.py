"""Choosing beta and the prior without labels: k-fold cross-validation of the held-out representation loss.

For each candidate (beta, alpha) and fold, solve on the other folds' statistics and score on the held-out
fold's statistics (closed form, no data pass): the relative squared error of the corrected
representation, (tr(W A W^T) - 2 tr(W B^T) + e) / e with e the expert features' energy. (Dividing
by e rather than by the error of no correction keeps the score finite when an expert equals the
merged backbone.) The score averages, over tasks, the
relative loss of the one-hot corrections W_t and of the equal-preference correction, since those
are the two ends of what users ask for. The pair with the lowest score wins.

alpha is the prior's identity weight: O_t = alpha I + (1 - alpha) P_t with P_t the Procrustes rotation
(alpha = 0 is the paper's prior, alpha = 1 the identity; see `CorrectionSolver`).

Every candidate is scored from one decomposition per fold and preference (derived). With the training
folds' sum_t p_t A_t = Q diag(lambda) Q^T and s = sum_t p_t, every beta shares the eigenvectors:
    W = R D Q^T,  D = diag(1 / (lambda + beta s)),  R = R_B + beta (1 - alpha) R_P + beta alpha R_I
with R_B = (sum p B_t) Q, R_P = (sum p P_t) Q, R_I = s Q. The held-out loss is then
    tr(W A W^T) = sum_ab c_a c_b D^T (Q^T A Q o R_a^T R_b) D,   tr(W B^T) = sum_a c_a D . colsum(B Q o R_a)
with c = (1, beta (1 - alpha), beta alpha): O(d^2) per beta, and a quadratic polynomial in alpha, so any
number of alphas costs nothing more. One eigendecomposition and ~15 d x d products per (fold, preference)
replace a Cholesky solve and a Gram product per (fold, preference, beta).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from operator import add

import torch

from reprmerge_core.choices import prior_identity_weight
from reprmerge_core.correction.solver import CorrectionSolver, Normalisation
from reprmerge_core.correction.statistics import TaskStatistics

DEFAULT_BETAS: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# alpha = 0: Procrustes (the paper), 1: identity, in between: blends. Extra alphas are free (see the module docstring).
DEFAULT_IDENTITY_WEIGHTS: tuple[float, ...] = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class BetaSelection:
    """The cross-validated choice; the per-beta curves are at the chosen identity weight."""

    beta: float
    candidates: list[float]
    one_hot: list[float]  # mean relative held-out error of W_t on task t, per candidate beta
    equal: list[float]  # mean relative held-out error of W_equal over tasks, per candidate beta
    score: list[float]
    folds: int
    identity_weight: float = 0.0
    identity_weights: list[float] | None = None  # candidate alphas
    prior_score: list[float] | None = None  # per candidate alpha, its score at its own best beta
    prior_beta: list[float] | None = None  # per candidate alpha, that best beta


@dataclass(frozen=True)
class CorrectionChoice:
    """The correction settings a bundle is built with, and the cross-validation behind them.

    Model selection's own result: the bundle manifest stores a conversion of it (`CorrectionInfo.from_choice`),
    so the file format and the selection can change apart.
    """

    beta: float
    identity_weight: float  # the prior's alpha
    normalisation: Normalisation
    selection: BetaSelection
    beta_chosen: bool  # False: beta was fixed by the caller (the curves are still measured)
    prior_chosen: bool  # False: the prior was fixed by the caller


PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # (a, b) with a <= b: R^T R is symmetric in (a, b)


def _grams(R: torch.Tensor, s: float) -> torch.Tensor:
    """R_a^T R_b for the upper `PAIRS` of one preference's (3, d, d) R; R_I^T R_I = s^2 I (Q is orthogonal)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype)
    return torch.stack([s * s * eye if (a, b) == (2, 2) else R[a].T @ R[b] for a, b in PAIRS])


def _losses(A: torch.Tensor, B: torch.Tensor, e: float, Q: torch.Tensor, R: torch.Tensor, grams: torch.Tensor,
            D: torch.Tensor, betas: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Held-out loss of one task under one preference for every (alpha, beta), shape (alphas, betas)."""
    H = (Q.T @ A @ Q)[None] * grams  # (pairs, d, d)
    upper = ((H @ D.T) * D.T[None]).sum(1)  # D^T H_ab D, (pairs, betas)
    K = torch.zeros(len(betas), 3, 3, dtype=torch.float64)
    for i, (a, b) in enumerate(PAIRS):
        K[:, a, b] = K[:, b, a] = upper[i]
    lin = D @ ((B @ Q)[None] * R).sum(dim=1).T  # D . colsum(B Q o R_a), (betas, 3)
    zero, one = torch.zeros_like(betas), torch.ones_like(betas)
    c0 = torch.stack([one, betas, zero], dim=1)  # c = c0 + alpha c1
    c1 = torch.stack([zero, -betas, betas], dim=1)

    def quad(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("na,nab,nb->n", x, K, y)

    constant = quad(c0, c0) - 2 * (c0 * lin).sum(1) + e
    linear = 2 * quad(c0, c1) - 2 * (c1 * lin).sum(1)
    return constant[None] + alphas[:, None] * linear[None] + alphas[:, None] ** 2 * quad(c1, c1)[None]


def cross_validate(
    fold_stats: Sequence[Sequence[TaskStatistics]],
    betas: Sequence[float],
    identity_weights: Sequence[float],
    normalisation: Normalisation | str = Normalisation.ENERGY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean relative held-out error of the one-hot and of the equal corrections, each (alphas, betas)."""
    k = len(fold_stats[0])
    if k < 2 or any(len(f) != k for f in fold_stats):
        raise ValueError("need the same number (>= 2) of folds for every task")
    if not betas or not identity_weights:
        raise ValueError("need at least one candidate beta and one candidate identity weight")
    if any(not 0 <= a <= 1 for a in identity_weights):
        raise ValueError(f"identity weights must lie in [0, 1], got {list(identity_weights)}")
    T = len(fold_stats)
    b = torch.tensor(betas, dtype=torch.float64)
    alphas = torch.tensor(identity_weights, dtype=torch.float64)
    num = torch.zeros(2, T, len(alphas), len(b), dtype=torch.float64)
    den = torch.zeros(T, dtype=torch.float64)
    prefs = torch.cat([torch.eye(T), torch.ones(1, T)]).double()
    for f in range(k):
        held = [task[f].to("cpu") for task in fold_stats]
        train = [reduce(add, [s for j, s in enumerate(task) if j != f]).to("cpu") for task in fold_stats]
        den += torch.tensor([s.e for s in held], dtype=torch.float64)
        fitted = CorrectionSolver(1.0, normalisation).fit(train)  # normalised A_t, B_t and Procrustes P_t
        lam, Q = torch.linalg.eigh(torch.einsum("pt,tij->pij", prefs, fitted.A_))
        s = prefs.sum(1)
        R = torch.stack([torch.einsum("pt,tij->pij", prefs, fitted.B_) @ Q,  # (P, 3, d, d)
                         torch.einsum("pt,tij->pij", prefs, fitted.O_) @ Q, s[:, None, None] * Q], dim=1)
        D = 1.0 / (lam.clamp_min(0)[:, None, :] + b[None, :, None] * s[:, None, None])  # (P, betas, d)
        for p in range(T + 1):
            grams = _grams(R[p], float(s[p]))
            for t in ([p] if p < T else range(T)):
                num[int(p == T), t] += _losses(held[t].A, held[t].B, held[t].e, Q[p], R[p], grams, D[p], b, alphas)
    rel = (num / den[None, :, None, None]).mean(dim=1)  # (2, alphas, betas)
    return rel[0], rel[1]


def select_beta(
    fold_stats: Sequence[Sequence[TaskStatistics]],
    candidates: Sequence[float] = DEFAULT_BETAS,
    *,
    normalisation: Normalisation | str = Normalisation.ENERGY,
    identity_weights: Sequence[float] = (0.0,),
    beta: float | None = None,
    identity_weight: float | None = None,
) -> BetaSelection:
    """Pick beta and the prior's identity weight from per-task, per-fold statistics (`fold_stats[task][fold]`).

    `beta` or `identity_weight`, when given, is kept fixed (and added to the candidates) and only the other is chosen.
    """
    betas = sorted({float(x) for x in (*candidates, *([] if beta is None else [beta]))})
    alphas = sorted({float(x) for x in (*identity_weights, *([] if identity_weight is None else [identity_weight]))})
    one_hot, equal = cross_validate(fold_stats, betas, alphas, normalisation)
    score = (one_hot + equal) / 2
    rows = torch.tensor([identity_weight is None or a == identity_weight for a in alphas])
    cols = torch.tensor([beta is None or x == beta for x in betas])
    allowed = rows[:, None] & cols[None, :]
    masked = torch.where(allowed, score, torch.inf)
    best = int(torch.argmin(masked))
    i, j = divmod(best, len(betas))
    return BetaSelection(
        beta=betas[j], candidates=betas, one_hot=one_hot[i].tolist(), equal=equal[i].tolist(), score=score[i].tolist(),
        folds=len(fold_stats[0]), identity_weight=alphas[i], identity_weights=alphas,
        prior_score=score.min(dim=1).values.tolist(), prior_beta=[betas[int(x)] for x in score.argmin(dim=1)],
    )


def choose_correction(fold_stats: Sequence[Sequence[TaskStatistics]], beta: float | str,
                      normalisation: Normalisation | str = Normalisation.ENERGY,
                      prior: float | str = "auto") -> CorrectionChoice:
    """The bundle's correction settings: "auto" takes the cross-validated beta / prior; the curves are kept either way.

    `prior` is "auto", "procrustes" (alpha 0), "identity" (alpha 1) or an identity weight alpha in [0, 1].
    """
    fixed_prior = None if prior == "auto" else prior_identity_weight(prior)
    selection = select_beta([[s.to("cpu") for s in task] for task in fold_stats], normalisation=normalisation,
                            identity_weights=DEFAULT_IDENTITY_WEIGHTS,
                            beta=None if beta == "auto" else float(beta), identity_weight=fixed_prior)
    return CorrectionChoice(beta=selection.beta, identity_weight=selection.identity_weight,
                            normalisation=Normalisation(normalisation), selection=selection,
                            beta_chosen=beta == "auto", prior_chosen=prior == "auto")
