"""Evaluating a controllable merge: metrics, scoring of fused heads, the report and its plots.

`metrics` and `scoring` import at once; the evaluation driver (`evaluate`, which trains and loads experts) loads
on first use, so `training` can score with `metrics.macro_f1` without importing itself back through here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reprmerge_core.evaluation.metrics import hypervolume, macro_f1, pareto_front, simplex_grid, uniformity
from reprmerge_core.evaluation.scoring import Scores, TestSet, score

if TYPE_CHECKING:
    from reprmerge_core.evaluation.evaluate import (
        CheckpointExpert,
        EvaluationData,
        EvaluationInputs,
        evaluate_bundle,
    )

_EVALUATE = ("CheckpointExpert", "EvaluationData", "EvaluationInputs", "evaluate_bundle")

__all__ = [
    "CheckpointExpert", "EvaluationData", "EvaluationInputs", "Scores", "TestSet", "evaluate_bundle", "hypervolume",
    "macro_f1", "pareto_front", "score", "simplex_grid", "uniformity",
]


def __getattr__(name: str) -> Any:
    if name in _EVALUATE:
        return getattr(importlib.import_module("reprmerge_core.evaluation.evaluate"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
