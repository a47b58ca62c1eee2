"""Choosing beta without labels: k-fold cross-validation of the held-out representation loss.

For each candidate beta and fold, solve on the other folds' statistics and score on the held-out
fold's statistics (closed form, no data pass): the relative squared error of the corrected
representation, (tr(W A W^T) - 2 tr(W B^T) + e) / e with e the expert features' energy. (Dividing
by e rather than by the error of no correction keeps the score finite when an expert equals the
merged backbone.) The score averages, over tasks, the
relative loss of the one-hot corrections W_t and of the equal-preference correction, since those
are the two ends of what users ask for. The beta with the lowest score wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from operator import add

import torch

from reprmerge_core.bundle.manifest import CorrectionInfo
from reprmerge_core.correction.solver import CorrectionSolver, Normalisation, quadratic_loss
from reprmerge_core.correction.statistics import TaskStatistics

DEFAULT_BETAS: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class BetaSelection:
    beta: float
    candidates: list[float]
    one_hot: list[float]  # mean relative held-out error of W_t on task t, per candidate
    equal: list[float]  # mean relative held-out error of W_equal over tasks, per candidate
    score: list[float]
    folds: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _stack(stats: Sequence[TaskStatistics]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.stack([s.A for s in stats]), torch.stack([s.B for s in stats]),
            torch.tensor([s.e for s in stats], dtype=torch.float64, device=stats[0].A.device))


def select_beta(
    fold_stats: Sequence[Sequence[TaskStatistics]],
    candidates: Sequence[float] = DEFAULT_BETAS,
    *,
    normalisation: Normalisation | str = Normalisation.ENERGY,
    use_prior: bool = True,
) -> BetaSelection:
    """Pick beta from per-task, per-fold statistics (`fold_stats[task][fold]`, at least 2 folds)."""
    k = len(fold_stats[0])
    if k < 2 or any(len(f) != k for f in fold_stats):
        raise ValueError("need the same number (>= 2) of folds for every task")
    if not candidates:
        raise ValueError("need at least one candidate beta")
    T = len(fold_stats)
    num = torch.zeros(len(candidates), 2, T, dtype=torch.float64)
    den = torch.zeros(T, dtype=torch.float64)
    for f in range(k):
        held = [task[f] for task in fold_stats]
        train = [reduce(add, [s for j, s in enumerate(task) if j != f]) for task in fold_stats]
        A, B, e = _stack(held)
        den += e.cpu()
        prefs = torch.cat([torch.eye(T), torch.ones(1, T)]).double()
        fitted = CorrectionSolver(candidates[0], normalisation, use_prior=use_prior, device=A.device).fit(train)
        for i, beta in enumerate(candidates):
            solver = fitted.with_beta(beta)
            losses = quadratic_loss(solver.solve(prefs), A, B, e).cpu()  # (T + 1, T)
            num[i, 0] += losses[:T].diagonal()
            num[i, 1] += losses[T]
    rel = (num / den).mean(dim=2)  # (candidates, 2)
    score = rel.mean(dim=1)
    best = int(torch.argmin(score))
    return BetaSelection(
        beta=float(candidates[best]), candidates=[float(c) for c in candidates],
        one_hot=rel[:, 0].tolist(), equal=rel[:, 1].tolist(), score=score.tolist(), folds=k,
    )


def choose_correction(fold_stats: Sequence[Sequence[TaskStatistics]], beta: float | str,
                      normalisation: Normalisation | str = Normalisation.ENERGY) -> CorrectionInfo:
    """The bundle's correction settings: `beta="auto"` takes the cross-validated one; the curve is kept either way."""
    selection = select_beta([[s.to("cpu") for s in task] for task in fold_stats], normalisation=normalisation)
    return CorrectionInfo(beta=selection.beta if beta == "auto" else float(beta), normalisation=Normalisation(normalisation),
                          beta_selection={"chosen": beta == "auto", **selection.as_dict()})
