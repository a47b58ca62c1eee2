"""The schema of the expert checks' report (`reprmerge_core.merging.diagnostics` computes it), without torch:
merge reports and bundle manifests carry it, and `reprmerge inspect` reads it before any tensor library loads.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

COSINE_THRESHOLD = 0.9
NORM_RATIO_THRESHOLD = 10.0


class HeadPair(BaseModel):
    """How alike two tasks' heads are.

    `max_row_cosine`: the largest cosine between a row of one head and a row of the other (rows drawn
    from one RNG stream coincide even when the class counts differ). `direction_cosine`: cosine of the
    two heads' class directions (rows minus their mean, flattened; for binary heads the cosine of
    w1 - w0), only for heads with the same number of classes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, str]
    max_row_cosine: float
    direction_cosine: float | None = None
    aligned: bool


class ExpertDiagnostics(BaseModel):
    """Head alignment across tasks and each expert's distance from the base, with the warnings they raise.

    `task_vector_norms` is None when the base was not given; `norm_ratios[t]` is the norm of task t's
    vector over the median of the other experts' norms (absent with a single expert).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    head_pairs: list[HeadPair] = []
    task_vector_norms: dict[str, float] | None = None
    norm_ratios: dict[str, float] = {}
    cosine_threshold: float = COSINE_THRESHOLD
    norm_ratio_threshold: float = NORM_RATIO_THRESHOLD
    warnings: list[str] = []
