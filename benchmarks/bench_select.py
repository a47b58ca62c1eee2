"""Cost of the label-free choice of beta and prior: shared eigendecomposition vs one Cholesky solve per candidate.

Synthetic statistics of text6's shape (d = 384, 6 tasks, 5 folds, 100 samples per fold). `select_beta` scores
every (beta, alpha) from one eigendecomposition per fold and preference; the reference solves each candidate
directly (SVDs once per fold, then a Cholesky solve per fold, preference and beta: the selection before the prior
was chosen) and scores it the same way.

    nice -n 10 python benchmarks/bench_select.py [--dim 384] [--tasks 6]
"""

from __future__ import annotations

import argparse
import time
from functools import reduce
from operator import add

import torch

from reprmerge_core.calibration import DEFAULT_BETAS, DEFAULT_IDENTITY_WEIGHTS, select_beta
from reprmerge_core.correction import CorrectionSolver, TaskStatistics
from reprmerge_core.correction.solver import quadratic_loss


def folds_of(dim: int, tasks: int, folds: int, n: int) -> list[list[TaskStatistics]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(tasks):
        mix = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, generator=g, dtype=torch.float64)
        task = []
        for _ in range(folds):
            zm = torch.randn(n, dim, generator=g, dtype=torch.float64)
            noise = 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)
            task.append(TaskStatistics.from_features(zm, zm @ mix.T + noise))
        out.append(task)
    return out


def direct(fold_stats: list[list[TaskStatistics]], alphas: tuple[float, ...]) -> float:
    """Held-out losses of every (alpha, beta) by one batched Cholesky solve each; returns the best score."""
    T, k = len(fold_stats), len(fold_stats[0])
    prefs = torch.cat([torch.eye(T), torch.ones(1, T)]).double()
    best = float("inf")
    for alpha in alphas:
        num = torch.zeros(len(DEFAULT_BETAS), 2, T, dtype=torch.float64)
        den = torch.zeros(T, dtype=torch.float64)
        for f in range(k):
            held = [task[f] for task in fold_stats]
            train = [reduce(add, [s for j, s in enumerate(task) if j != f]) for task in fold_stats]
            fitted = CorrectionSolver(1.0, identity_weight=alpha).fit(train)  # SVDs once per fold, as before
            A, B = torch.stack([s.A for s in held]), torch.stack([s.B for s in held])
            e = torch.tensor([s.e for s in held], dtype=torch.float64)
            den += e
            for i, beta in enumerate(DEFAULT_BETAS):
                losses = quadratic_loss(fitted.with_beta(beta).solve(prefs), A, B, e)
                num[i, 0] += losses[:T].diagonal()
                num[i, 1] += losses[T]
        best = min(best, float((num / den).mean(2).mean(1).min()))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--tasks", type=int, default=6)
    args = parser.parse_args()
    stats = folds_of(args.dim, args.tasks, 5, 100)
    rows = []
    for label, alphas in (("beta only (Procrustes)", (0.0,)), (f"beta x {len(DEFAULT_IDENTITY_WEIGHTS)} priors",
                                                              DEFAULT_IDENTITY_WEIGHTS)):
        start = time.perf_counter()
        selection = select_beta(stats, identity_weights=alphas)
        shared = time.perf_counter() - start
        start = time.perf_counter()
        best = direct(stats, alphas)
        reference = time.perf_counter() - start
        rows.append((label, shared, reference, min(selection.score), best))
    print(f"{'candidates':<24} {'shared eigh s':>14} {'per-candidate Cholesky s':>25}  best score (shared / direct)")
    for label, shared, reference, a, b in rows:
        print(f"{label:<24} {shared:14.2f} {reference:25.2f}  {a:.6f} / {b:.6f}")


if __name__ == "__main__":
    main()
