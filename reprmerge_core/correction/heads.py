"""Folding a preference's correction into the task heads.

logits_t = H_t (W_p z) + b_t = (H_t W_p) z + b_t. Since W_p = M_p C_p^{-1}, the fused weight is
H_t W_p = (H_t M_p) C_p^{-1}: with the products H M_s precomputed per task s, a new preference costs
one Cholesky factorisation and a solve with K (total classes) right-hand sides, never W_p itself:
(1/3) d^3 + 2 K d^2 flops instead of (7/3) d^3.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from reprmerge_core.correction.solver import CorrectionSolver


@dataclass(frozen=True)
class TaskHead:
    """A linear classification head: logits = weight @ z + bias."""

    weight: torch.Tensor  # (classes, d)
    bias: torch.Tensor  # (classes,)

    def __post_init__(self) -> None:
        if self.weight.ndim != 2:
            raise ValueError(f"head weight must be (classes, d), got shape {tuple(self.weight.shape)}")
        if self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"head bias must be ({self.weight.shape[0]},), got {tuple(self.bias.shape)}")

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class FusedHeads:
    """Fused heads of P preferences: rows of all tasks stacked, `slices[t]` selects task t."""

    weight: torch.Tensor  # (P, K, d)
    bias: torch.Tensor  # (K,)
    slices: tuple[slice, ...]

    def logits(self, z: torch.Tensor, pref_index: int, task: int) -> torch.Tensor:
        """Logits of task `task` under preference `pref_index` for features z (batch, d)."""
        s = self.slices[task]
        return z @ self.weight[pref_index, s].T + self.bias[s]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.bias.numel() * self.bias.element_size()


class HeadFolder:
    """Precomputes H M_s for every task s so that folding a batch of preferences is cheap."""

    def __init__(self, solver: CorrectionSolver, heads: Sequence[TaskHead], out_dtype: torch.dtype = torch.float32):
        solver.require_fit()
        if len(heads) != solver.num_tasks_:
            raise ValueError(f"need one head per task ({solver.num_tasks_}), got {len(heads)}")
        for t, h in enumerate(heads):
            if h.weight.shape[1] != solver.dim_:
                raise ValueError(f"head {t} has input size {h.weight.shape[1]}, representation size is {solver.dim_}")
        self.solver = solver
        self.out_dtype = out_dtype
        H = torch.cat([h.weight for h in heads]).to(solver.device, torch.float64)
        self._H = H
        self._HM = torch.einsum("kd,tde->tke", H, solver.M_)  # (T, K, d), float64: the solver casts it
        self.bias = torch.cat([h.bias for h in heads]).to(solver.device, out_dtype)
        bounds = torch.tensor([0] + [h.num_classes for h in heads]).cumsum(0).tolist()
        self.slices = tuple(slice(a, b) for a, b in itertools.pairwise(bounds))

    @property
    def fold_bytes_per_preference(self) -> int:
        """Upper bound of `fold`'s temporaries per preference, for callers that bound a fold's memory.

        Two d x d matrices (sum_t p_t C_t and its Cholesky factor; peak RSS measured at exactly that)
        plus a few K x d right-hand sides and outputs, counted in float64: a float32 solver falls back
        to float64 for ill-conditioned preferences.
        """
        size = 8
        K, d = self._H.shape
        return 2 * d * d * size + 6 * K * d * size

    def fold(self, prefs: torch.Tensor, executor: Executor | None = None) -> FusedHeads:
        """Fused heads H_t W_p for a (P, T) stack of preferences (chunks spread over `executor`'s threads if given)."""
        weight = self.solver.right_solve(self._HM, prefs, executor).to(self.out_dtype)
        return FusedHeads(weight, self.bias, self.slices)

    def fold_matrices(self, W: torch.Tensor) -> FusedHeads:
        """Fused heads H_t W for explicit corrections W (P, d, d), e.g. baselines and ablations."""
        H = self._H.to(W.device, W.dtype)
        return FusedHeads((H @ W).to(self.out_dtype), self.bias, self.slices)
