"""Data-aware merges of one linear layer from input Gram matrices (method.md section 2). Pure float64 math.

Notation: base weight W0 (m x n), task updates `deltas[k] = W_k - W0` stacked (K, m, n), input Grams
`grams[k] = S_k = X_k X_k^T` stacked (K, n, n). Only the Grams are needed: the residual R_k = Delta_k X_k
and every output-space quantity reduce to traces with S_k, so calibration outputs are never materialised.

- residual energy ||r||^2 = sum_k tr(Delta_k S_k Delta_k^T): the calibration loss of the base (update 0).
- calibration loss of an update U: J(U) = sum_k tr((U - Delta_k) S_k (U - Delta_k)^T).
- at a QP optimum the captured energy a^T g = ||projection of r||^2, so rho = a^T g / ||r||^2 lies in [0, 1]
  and J = (1 - rho) ||r||^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float64


def _check(deltas: Tensor, grams: Tensor) -> None:
    if deltas.ndim != 3 or grams.ndim != 3:
        raise ValueError(
            f"deltas must be (K, m, n) and grams (K, n, n), got {tuple(deltas.shape)} and {tuple(grams.shape)}"
        )
    k, _, n = deltas.shape
    if grams.shape != (k, n, n):
        raise ValueError(
            f"grams must be ({k}, {n}, {n}) to match deltas {tuple(deltas.shape)}, got {tuple(grams.shape)}"
        )


def residual_energy(deltas: Tensor, grams: Tensor) -> float:
    """||r||^2 = sum_k ||Delta_k X_k||_F^2."""
    _check(deltas, grams)
    return float(torch.einsum("kmn,knp,kmp->", deltas, grams, deltas))


def calibration_loss(update: Tensor, deltas: Tensor, grams: Tensor) -> float:
    """J(U) = sum_k ||U X_k - Delta_k X_k||_F^2."""
    _check(deltas, grams)
    diff = update.unsqueeze(0) - deltas
    return float(torch.einsum("kmn,knp,kmp->", diff, grams, diff))


def shrink_gram(gram: Tensor, alpha: float) -> Tensor:
    """RegMean's stabiliser: off-diagonal entries scaled by alpha, diagonal kept."""
    if alpha == 1.0:
        return gram
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def regmean(deltas: Tensor, grams: Tensor, alpha: float = 1.0, ridge: float = 0.0) -> Tensor:
    """Update of W* = (sum_k W_k S_k)(sum_k S_k)^{-1}, written on the deltas: (sum_k Delta_k S_k) S^{-1}.

    S = sum_k shrink(S_k) + ridge * mean(diag S) I, solved by Cholesky (S is symmetric PSD).
    """
    _check(deltas, grams)
    shrunk = shrink_gram(grams, alpha)
    total = shrunk.sum(0)
    total = total + ridge * total.diagonal().mean() * torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    rhs = torch.einsum("kmn,knp->pm", deltas, shrunk)  # (sum_k Delta_k S_k)^T
    chol, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        raise ValueError(
            "summed Gram matrix is singular (an input direction never occurs in the calibration data); "
            "raise `ridge` or lower `alpha`"
        )
    return torch.cholesky_solve(rhs, chol).T


@dataclass(frozen=True)
class QPSolution:
    """Optimal update over a basis; `captured` = ||projection of r onto the basis span||^2."""

    update: Tensor  # (m, n)
    coefficients: Tensor  # (rows, K): one coefficient per task and basis direction
    captured: float
    basis: Tensor | None = None  # (m, r) output directions for the eigen basis, None for the standard rows


def diagonal_qp(deltas: Tensor, grams: Tensor, ridge: float = 1e-10) -> QPSolution:
    """Best update of the form sum_k D_k Delta_k with D_k diagonal: per output row i solve G_i a = g_i,
    (G_i)_jl = Delta_j[i] S Delta_l[i]^T with S = sum_k S_k, (g_i)_j = Delta_j[i] (sum_k Delta_k S_k)[i]^T.

    All rows are solved at once (batched Cholesky). `ridge` * mean(diag G_i) is added only to keep singular
    systems (tasks with proportional rows, all-zero rows) solvable; rows where Cholesky still fails use lstsq.
    """
    _check(deltas, grams)
    k = deltas.shape[0]
    weighted = torch.einsum("kmn,np->kmp", deltas, grams.sum(0))  # Delta_j S
    gram_rows = torch.einsum("jmn,lmn->mjl", weighted, deltas)  # (m, K, K)
    target = torch.einsum("kmn,knp->mp", deltas, grams)  # sum_k Delta_k S_k
    rhs = torch.einsum("jmn,mn->mj", deltas, target)  # (m, K)
    scale = gram_rows.diagonal(dim1=1, dim2=2).mean(-1)
    shift = (ridge * scale).clamp_min(torch.finfo(DTYPE).tiny)
    eye = torch.eye(k, dtype=deltas.dtype, device=deltas.device)
    chol, info = torch.linalg.cholesky_ex(gram_rows + shift[:, None, None] * eye)
    coef = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    failed = info != 0
    if bool(failed.any()):
        coef[failed] = torch.linalg.lstsq(
            gram_rows[failed], rhs[failed].unsqueeze(-1), driver="gelsd"
        ).solution.squeeze(-1)
    update = torch.einsum("mj,jmn->mn", coef, deltas)
    return QPSolution(update, coef, float((coef * rhs).sum()))


def residual_energy_matrix(deltas: Tensor, grams: Tensor) -> Tensor:
    """E = sum_k R_k R_k^T = sum_k Delta_k S_k Delta_k^T (m x m), from the Grams only."""
    _check(deltas, grams)
    return torch.einsum("kmn,knp,kqp->mq", deltas, grams, deltas)


def eigen_qp(deltas: Tensor, grams: Tensor, rank: int | None = None, ridge: float = 1e-10) -> QPSolution:
    """The diagonal QP in the eigenbasis of E: basis B_{k,b} = u_b u_b^T Delta_k over the `rank` leading
    eigenvectors u_b of E (default all m). Output directions are orthonormal, so the loss splits per
    direction exactly as per row: the diagonal QP on the rotated updates U^T Delta_k, rotated back.
    A coefficient then scales a correlated group of output units; truncation drops low-energy directions."""
    m = deltas.shape[1]
    rank = m if rank is None else rank
    if not 1 <= rank <= m:
        raise ValueError(f"rank must be in [1, {m}] for a layer with {m} outputs, got {rank}")
    _, vectors = torch.linalg.eigh(residual_energy_matrix(deltas, grams))
    basis = vectors[:, -rank:].flip(-1)  # leading first
    rotated = diagonal_qp(torch.einsum("mr,kmn->krn", basis, deltas), grams, ridge)
    return QPSolution(basis @ rotated.update, rotated.coefficients, rotated.captured, basis)
