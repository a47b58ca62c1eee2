"""ReACT: closed-form, preference-aware correction of a merged backbone's representations.

Pure tensor math, no I/O: statistics accumulate in float64, solves are batched over preferences.
"""

from reprmerge_core.correction.heads import FusedHeads, HeadFolder, TaskHead
from reprmerge_core.correction.solver import CorrectionSolver, Normalisation, procrustes
from reprmerge_core.correction.statistics import StatisticsAccumulator, TaskStatistics

__all__ = [
    "CorrectionSolver",
    "FusedHeads",
    "HeadFolder",
    "Normalisation",
    "StatisticsAccumulator",
    "TaskHead",
    "TaskStatistics",
    "procrustes",
]
