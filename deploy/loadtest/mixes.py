"""Preference mixes and texts for load tests: what each request carries.

- `onehot`: one task at a time, uniformly (T distinct preferences).
- `zipf`: `distinct` points of a simplex grid, ranked in a seeded random order and drawn with
  probability proportional to 1 / rank^s (a few hot preferences, a long tail).
- `dirichlet`: a fresh Dirichlet(1, ..., 1) draw per request (uniform on the simplex): every
  request is a new preference, the head cache never hits.
Grid points are sent as integer weights (the service normalises to sum 1), so a point always maps to
one canonical preference and one cache entry.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable

from reprmerge_core.preference import grid_points

MIXES = ("onehot", "zipf", "dirichlet")
Mix = Callable[[], list[float]]


def simplex_grid(tasks: int, distinct: int, seed: int) -> list[list[float]]:
    """`distinct` different points of the finest grid {w : w_t in N, sum w = m} that has that many."""
    if tasks < 1 or distinct < 1:
        raise ValueError(f"need tasks >= 1 and distinct >= 1, got {tasks} and {distinct}")
    if tasks == 1 and distinct > 1:
        raise ValueError("one task has a single preference")
    m = 1
    while math.comb(m + tasks - 1, tasks - 1) < distinct:
        m += 1
    points = [[float(w) for w in point] for point in grid_points(tasks, m)]
    random.Random(seed).shuffle(points)
    return points[:distinct]


def make_mix(name: str, tasks: int, *, distinct: int = 100, zipf_s: float = 1.0, seed: int = 0) -> Mix:
    """A function giving each request's preference (weights in task order)."""
    rng = random.Random(seed)
    if name == "onehot":
        corners = [[float(t == k) for t in range(tasks)] for k in range(tasks)]
        return lambda: rng.choice(corners)
    if name == "zipf":
        points = simplex_grid(tasks, distinct, seed)
        cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** zipf_s for rank in range(len(points))))
        return lambda: points[bisect.bisect_left(cumulative, rng.random() * cumulative[-1])]
    if name == "dirichlet":
        return lambda: [rng.expovariate(1.0) + 1e-12 for _ in range(tasks)]
    raise ValueError(f"unknown preference mix {name!r}; choose from {', '.join(MIXES)}")


# Texts in the style of the default bundle's tasks (SMS spam, question type, movie sentiment).
_TEMPLATES = (
    "WINNER! you have been selected for a {adj} prize, call {num} now to claim",
    "hey are we still on for {noun} tonight? i can bring the {noun}",
    "what is the {adj} {noun} in the world?",
    "who directed the {adj} film about the {noun}?",
    "how many {noun}s does it take to {verb} a {noun}?",
    "this movie was {adj}, the {noun} made me {verb} twice",
    "a {adj} and {adj} story with a {noun} i will never forget",
)
_SLOTS = {
    "adj": ("great", "terrible", "free", "longest", "boring", "brilliant", "cheap", "famous"),
    "noun": ("dinner", "ticket", "river", "camera", "actor", "mountain", "voucher", "plot"),
    "verb": ("laugh", "cry", "fix", "watch", "win", "cook"),
}


def request_texts(n: int, seed: int = 0) -> list[str]:
    """`n` short texts filled in from the templates above (no model or data needed by the client)."""
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES).format(num=rng.randrange(10**7, 10**8),
                                          **{k: rng.choice(v) for k, v in _SLOTS.items()})
            for _ in range(n)]
