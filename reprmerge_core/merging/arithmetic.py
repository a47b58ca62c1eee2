"""Data-free merges of task vectors: task arithmetic, TIES and DARE.

Every function takes the task vectors of one parameter stacked on dim 0, `deltas[k] = theta_k - theta_0`,
and returns the merged update (added to theta_0 by the caller). Semantics follow PEFT's
`peft.utils.merge_utils` so results can be checked against it: `density` is the kept fraction
(k = int(density * numel) largest magnitudes), the elected sign is that of the summed values
(PEFT's "total"; ties go to +), the disjoint mean divides by the number of agreeing non-zero entries.
"""

from __future__ import annotations

import torch
from torch import Tensor


def task_arithmetic(deltas: Tensor, lam: float) -> Tensor:
    """lam * sum_k tau_k."""
    return lam * deltas.sum(dim=0)


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """Keep the int(density * numel) largest-magnitude entries of one task vector, zero the rest."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
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


def sign_election_mean(deltas: Tensor, lam: float) -> Tensor:
    """TIES' second half: elect each entry's sign by summed mass, average the entries that agree, times lam."""
    signs = deltas.sign()
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = signs == elected
    count = agree.sum(dim=0).clamp(min=1)
    return lam * (deltas * agree).sum(dim=0) / count


def ties(deltas: Tensor, density: float, lam: float) -> Tensor:
    """Trim each task vector to its top `density` fraction, then sign election and disjoint mean."""
    trimmed = torch.stack([magnitude_prune(d, density) for d in deltas])
    return sign_election_mean(trimmed, lam)


def dare(deltas: Tensor, drop_rate: float, lam: float, combine: str, generator: torch.Generator | None) -> Tensor:
    """Random drop with rescaling per task (drawn in task order), then `linear` (lam * sum) or `ties`."""
    dropped = torch.stack([random_drop(d, drop_rate, generator) for d in deltas])
    if combine == "ties":
        return sign_election_mean(dropped, lam)
    if combine == "linear":
        return task_arithmetic(dropped, lam)
    raise ValueError(f"combine must be 'linear' or 'ties', got {combine!r}")
