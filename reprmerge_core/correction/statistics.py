"""Streaming per-task sufficient statistics of the merged and expert representations.

For task t with merged features z_m and expert features z_e (one row per sample):
A = sum z_m z_m^T, B = sum z_e z_m^T, n = sample count, e = sum ||z_e||^2.
They are plain sums, so statistics of disjoint shards add up to those of one pass over all data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE = torch.float64


@dataclass(frozen=True)
class TaskStatistics:
    """Sufficient statistics of one task (raw sums, float64, not normalised)."""

    A: torch.Tensor  # (d, d) merged second moment sum
    B: torch.Tensor  # (d, d) expert-merged cross moment sum
    n: int  # number of calibration samples
    e: float  # sum of squared expert feature norms

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.A.shape[0] != self.A.shape[1]:
            raise ValueError(f"A must be square (d, d), got shape {tuple(self.A.shape)}")
        if self.B.shape != self.A.shape:
            raise ValueError(f"B must have the shape of A {tuple(self.A.shape)}, got {tuple(self.B.shape)}")
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    @property
    def dim(self) -> int:
        return int(self.A.shape[0])

    @property
    def merged_energy(self) -> float:
        """sum ||z_m||^2 = trace(A)."""
        return float(torch.trace(self.A))

    def __add__(self, other: TaskStatistics) -> TaskStatistics:
        if other.dim != self.dim:
            raise ValueError(f"cannot add statistics of size {self.dim} and {other.dim}")
        other_A, other_B = other.A.to(self.A.device), other.B.to(self.A.device)
        return TaskStatistics(self.A + other_A, self.B + other_B, self.n + other.n, self.e + other.e)

    def to(self, device: torch.device | str) -> TaskStatistics:
        return TaskStatistics(self.A.to(device), self.B.to(device), self.n, self.e)

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu") -> TaskStatistics:
        return cls(torch.zeros(dim, dim, dtype=DTYPE, device=device),
                   torch.zeros(dim, dim, dtype=DTYPE, device=device), 0, 0.0)

    @classmethod
    def from_features(cls, merged: torch.Tensor, expert: torch.Tensor) -> TaskStatistics:
        """Statistics of one block of features, rows are samples."""
        acc = StatisticsAccumulator(merged.shape[1], device=merged.device)
        acc.update(merged, expert)
        return acc.result()


class StatisticsAccumulator:
    """Accumulates TaskStatistics batch by batch, in float64, on the features' device."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self._A = torch.zeros(dim, dim, dtype=DTYPE, device=device)
        self._B = torch.zeros(dim, dim, dtype=DTYPE, device=device)
        self._n = 0
        self._e = torch.zeros((), dtype=DTYPE, device=device)

    def update(self, merged: torch.Tensor, expert: torch.Tensor) -> None:
        """Add a batch: `merged` and `expert` are (batch, d) features of the same inputs."""
        if merged.ndim != 2 or merged.shape[1] != self.dim:
            raise ValueError(f"merged features must be (batch, {self.dim}), got {tuple(merged.shape)}")
        if expert.shape != merged.shape:
            raise ValueError(f"expert features {tuple(expert.shape)} must match merged {tuple(merged.shape)}")
        zm = merged.detach().to(device=self._A.device, dtype=DTYPE)
        ze = expert.detach().to(device=self._A.device, dtype=DTYPE)
        if not (torch.isfinite(zm).all() and torch.isfinite(ze).all()):
            raise ValueError("features contain NaN or infinite values")
        self._A.addmm_(zm.T, zm)
        self._B.addmm_(ze.T, zm)
        self._e += (ze * ze).sum()
        self._n += zm.shape[0]

    def result(self) -> TaskStatistics:
        return TaskStatistics(self._A.clone(), self._B.clone(), self._n, float(self._e))
