"""Checks on a set of experts before they are merged: shared head initialisation and distance from the base.

Two traps make a merge fail quietly:
- heads that started from one random Linear (one seed for every task, as transformers' example scripts
  do with `set_seed(42)` by default): one epoch moves a head a few percent, so every task's class
  direction stays on one shared axis and merging adds the experts' pushes along it up (issue 10: TIES
  0.645 mean accuracy on text6 with one seed, 0.851 with a seed per task). Independently started heads
  have near-orthogonal rows (cosine ~ 1/sqrt(d)); shared starts leave rows at cosine ~0.99.
- an expert that was not fine-tuned from this base: its task vector is orders of magnitude longer than
  its peers' and swamps them.
Pure math on tensors; the caller loads weights and logs the warnings.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import torch
from torch import Tensor

from reprmerge_core.diagnostics import COSINE_THRESHOLD, NORM_RATIO_THRESHOLD, ExpertDiagnostics, HeadPair


def _unit_rows(weight: Tensor) -> Tensor:
    w = weight.detach().to(torch.float64)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp_min(1e-300))


def head_pair(names: tuple[str, str], a: Tensor, b: Tensor, threshold: float = COSINE_THRESHOLD) -> HeadPair:
    """Compare two head weights (classes, d); `aligned` when either cosine's magnitude exceeds `threshold`."""
    rows = float((_unit_rows(a) @ _unit_rows(b).T).max())
    direction = None
    if a.shape == b.shape:
        ca, cb = (w.detach().to(torch.float64) for w in (a, b))
        direction = _cosine(ca - ca.mean(0), cb - cb.mean(0))
    aligned = rows > threshold or (direction is not None and abs(direction) > threshold)
    return HeadPair(tasks=names, max_row_cosine=rows, direction_cosine=direction, aligned=aligned)


def task_vector_norm(base: Mapping[str, Tensor], expert: Mapping[str, Tensor]) -> float:
    """Euclidean norm of expert - base over the floating-point parameters both hold with the same shape."""
    total = 0.0
    for name, b in base.items():  # `base` and `expert` may read each tensor from disk (stream.LazyCheckpoint)
        e = expert.get(name)
        if e is not None and e.shape == b.shape and b.is_floating_point() and not torch.equal(e, b):
            diff = e.detach().to(torch.float64)
            diff -= b.detach().to(torch.float64)  # in place: one float64 copy of a (possibly huge) embedding
            total += float(diff.pow_(2).sum())
    return total ** 0.5


def diagnose_experts(
    heads: Mapping[str, Tensor],
    norms: Mapping[str, float] | None = None,
    *,
    cosine_threshold: float = COSINE_THRESHOLD,
    norm_ratio_threshold: float = NORM_RATIO_THRESHOLD,
) -> ExpertDiagnostics:
    """Every pair of `heads` (task -> weight (classes, d)) and every task's `norms` against its peers."""
    names = list(heads)
    pairs = [
        head_pair((x, y), heads[x], heads[y], cosine_threshold)
        for i, x in enumerate(names) for y in names[i + 1:]
        if heads[x].shape[1] == heads[y].shape[1]
    ]
    warnings = []
    aligned = [p for p in pairs if p.aligned]
    if aligned:
        listed = ", ".join(
            f"{p.tasks[0]}~{p.tasks[1]} (row cosine {p.max_row_cosine:.3f}"
            + ("" if p.direction_cosine is None else f", class-direction cosine {p.direction_cosine:.3f}") + ")"
            for p in aligned
        )
        warnings.append(
            f"{len(aligned)} of {len(pairs)} pairs of task heads are nearly parallel (> {cosine_threshold}): {listed}. "
            "Their heads most likely started from the same random initialisation (one seed for every expert, e.g. "
            "transformers' set_seed(42) by default), so merging pushes every task onto one shared class axis and "
            "the merged model favours one class. Fine-tune each expert with its own seed."
        )
    ratios: dict[str, float] = {}
    if norms is not None and len(norms) > 1:
        for task, norm in norms.items():
            peers = statistics.median(v for t, v in norms.items() if t != task)
            if peers > 0:
                ratios[task] = norm / peers
        far = {t: r for t, r in ratios.items() if r > norm_ratio_threshold}
        if far:
            listed = ", ".join(f"{t} (norm {norms[t]:.3g}, {r:.1f}x)" for t, r in far.items())
            warnings.append(
                f"experts far from the base: {listed} against the median task-vector norm of their peers "
                f"(threshold {norm_ratio_threshold}x). Such an expert was probably not fine-tuned from this base "
                "and will swamp the others in the merge."
            )
    return ExpertDiagnostics(
        head_pairs=pairs, task_vector_norms=None if norms is None else dict(norms), norm_ratios=ratios,
        cosine_threshold=cosine_threshold, norm_ratio_threshold=norm_ratio_threshold, warnings=warnings,
    )
