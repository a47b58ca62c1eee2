"""Evaluating a controllable merge: metrics, scoring of fused heads, the report and its plots."""

from reprmerge_core.evaluation.evaluate import (
    CheckpointExpert,
    EvaluationData,
    EvaluationInputs,
    evaluate_bundle,
)
from reprmerge_core.evaluation.metrics import hypervolume, pareto_front, simplex_grid, uniformity
from reprmerge_core.evaluation.scoring import Scores, TestSet, score

__all__ = [
    "CheckpointExpert", "EvaluationData", "EvaluationInputs", "Scores", "TestSet", "evaluate_bundle", "hypervolume",
    "pareto_front", "score", "simplex_grid", "uniformity",
]
