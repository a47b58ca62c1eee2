"""Data-free merges of task vectors, composed as in mergekit's generalized task arithmetic:
a sparsifier thins each task vector on its own, per-expert weights scale them, a consensus rule combines them,
and a global lam scales the result.

- sparsifiers: `magnitude_prune` (keep the top `density` fraction), `random_drop` (DARE), `breadcrumbs`
  (drop the largest `gamma` fraction and the smallest, keeping `density`).
- consensus rules (`CONSENSUS`): `linear` (task arithmetic: lam * sum_k w_k tau_k) and `ties` (sign election
  and disjoint mean).

Every function takes the task vectors of one parameter stacked on dim 0, `deltas[k] = theta_k - theta_0`,
and returns the merged update (added to theta_0 by the caller). Semantics follow PEFT's
`peft.utils.merge_utils` so results can be checked against it: `density` is the kept fraction
(k = int(density * numel) largest magnitudes), the elected sign is that of the summed values
(PEFT's "total"; ties go to +), the disjoint mean divides by the number of agreeing non-zero entries
(mergekit's `normalize` divides by the agreeing weights instead; the two agree when every weight is 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _scaled(deltas: Tensor, weights: Tensor | None) -> Tensor:
    """Each task vector times its expert's weight (None: all 1, left untouched so results stay bit-exact)."""
    if weights is None:
        return deltas
    return deltas * weights.to(deltas.dtype).view(-1, *[1] * (deltas.ndim - 1))


def task_arithmetic(deltas: Tensor, lam: float, weights: Tensor | None = None) -> Tensor:
    """lam * sum_k w_k tau_k: the one task-arithmetic rule (the paper's preference-weighted baseline is
    weights = preference, lam = 1)."""
    return lam * _scaled(deltas, weights).sum(dim=0)


def sign_election_mean(deltas: Tensor, lam: float, weights: Tensor | None = None) -> Tensor:
    """TIES' second half: elect each entry's sign by the summed mass of the unweighted task vectors, average
    the weighted entries that agree (dividing by their count), times lam. PEFT's order; mergekit elects on
    the weighted vectors, which differs only where weights differ in size or sign."""
    signs = deltas.sign()
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = signs == elected
    count = agree.sum(dim=0).clamp(min=1)
    return lam * (_scaled(deltas, weights) * agree).sum(dim=0) / count


CONSENSUS: dict[str, Callable[[Tensor, float, Tensor | None], Tensor]] = {
    "linear": task_arithmetic,
    "ties": sign_election_mean,
}


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """Keep the int(density * numel) largest-magnitude entries of one task vector, zero the rest."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def breadcrumbs(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (mergekit's `breadcrumbs`): drop the int(gamma * numel) largest-magnitude entries
    (outliers) and the smallest, keeping int(density * numel); when density + gamma > 1, fewer outliers go.
    The sort is stable, so equal magnitudes are ranked by position and the mask is deterministic."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    order = torch.sort(delta.reshape(-1).abs(), stable=True).indices  # ascending
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n - top - keep : n - top]] = 1
    return delta * mask.reshape(delta.shape)


def random_drop(delta: Tensor, drop_rate: float, generator: torch.Generator | None) -> Tensor:
    """DARE: drop each entry with probability drop_rate, rescale survivors by 1 / (1 - drop_rate).

    The mask is `bernoulli(full_like(delta, 1 - drop_rate))`, the same draw PEFT makes, so a generator
    seeded like the global RNG reproduces PEFT's mask exactly.
    """
    if drop_rate <= 0.0:
        return delta
    keep = 1.0 - drop_rate
    mask = torch.bernoulli(torch.full_like(delta, keep), generator=generator)
    return delta * mask / keep
