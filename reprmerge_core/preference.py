"""User preferences over tasks: validation at the boundary, canonical form, snapping, fingerprints.

A preference arrives as a mapping task -> weight (tasks left out weigh 0) or as a list in the
bundle's task order. W_p is invariant to scaling p, so the canonical form sums to 1; it is rounded
to `DECIMALS` places so that float noise from clients never creates a distinct cache entry.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DECIMALS = 9


class PreferenceError(ValueError):
    """An invalid preference; `field` names the offending element (e.g. ``preference.trec6``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Preference:
    """A canonical preference: non-negative weights in task order, summing to 1."""

    tasks: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def fingerprint(self) -> str:
        """Stable 16-hex-digit id of the canonical preference (same weights, same id)."""
        payload = json.dumps({"tasks": self.tasks, "weights": [f"{w:.{DECIMALS}f}" for w in self.weights]})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights, strict=True))


def _weight(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PreferenceError(field, f"weight must be a number, got {type(value).__name__}")
    try:
        w = float(value)
    except OverflowError:  # an int beyond the float range (~1.8e308): JSON allows any number of digits
        raise PreferenceError(field, f"weight must be at most {sys.float_info.max:.3g}, got a larger integer") from None
    if not math.isfinite(w):
        raise PreferenceError(field, f"weight must be finite, got {value!r}")
    if w < 0:
        raise PreferenceError(field, f"weight must be non-negative, got {value!r}")
    return w


def grid_points(tasks: int, steps: int) -> list[tuple[int, ...]]:
    """Every preference on the grid of step 1/steps, as integer weights summing to `steps`, C(steps+T-1, T-1) of them.

    Pure Python (no numpy) so a load generator can draw from it; `evaluation.metrics.simplex_grid` divides by steps.
    """
    if tasks < 1 or steps < 1:
        raise ValueError(f"need tasks >= 1 and steps >= 1, got {tasks}, {steps}")
    # stars and bars: the T - 1 bar positions among steps + T - 1 slots fix the T counts between them
    return [tuple(b - a - 1 for a, b in zip((-1, *bars), (*bars, steps + tasks - 1), strict=True))
            for bars in itertools.combinations(range(steps + tasks - 1), tasks - 1)]


def snap(weights: Sequence[float], grid: int) -> tuple[float, ...]:
    """Round normalised weights to multiples of 1/grid, keeping the sum exactly 1.

    Largest-remainder rounding: floor every weight, then give the leftover steps to the largest
    remainders (ties to the earlier task). A positive weight may round to 0, never all of them.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    scaled = [w * grid for w in weights]
    floors = [math.floor(x + 1e-12) for x in scaled]
    leftover = grid - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-(scaled[i] - floors[i]), i))
    for i in order[:leftover]:
        floors[i] += 1
    return tuple(f / grid for f in floors)


def canonical_preference(
    value: Mapping[str, object] | Sequence[object],
    tasks: Sequence[str],
    *,
    grid: int | None = None,
    field: str = "preference",
) -> Preference:
    """Validate a user preference against the bundle's tasks and return its canonical form."""
    tasks = tuple(tasks)
    if isinstance(value, Mapping):
        known = set(tasks)
        for name in value:
            if name not in known:
                raise PreferenceError(f"{field}.{name}", f"unknown task; known tasks: {', '.join(tasks)}")
        raw = [_weight(value[t], f"{field}.{t}") if t in value else 0.0 for t in tasks]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(tasks):
            raise PreferenceError(field,
                                  f"expected {len(tasks)} weights (one per task: {', '.join(tasks)}), got {len(value)}")
        raw = [_weight(v, f"{field}[{i}]") for i, v in enumerate(value)]
    else:
        raise PreferenceError(field,
                              f"must be a mapping task -> weight or a list of weights, got {type(value).__name__}")
    top = max(raw, default=0.0)
    if not top > 0:
        raise PreferenceError(field, "at least one weight must be positive")
    scaled = [w / top for w in raw]  # divide by the largest first: huge weights cannot overflow the sum
    total = math.fsum(scaled)
    weights = tuple(w / total for w in scaled)
    if grid is not None:
        weights = snap(weights, grid)
    return Preference(tasks, tuple(round(w, DECIMALS) + 0.0 for w in weights))
