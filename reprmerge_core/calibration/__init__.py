"""From models and unlabeled calibration inputs to ReACT statistics, and label-free choice of beta."""

from reprmerge_core.calibration.beta import BetaSelection, select_beta
from reprmerge_core.calibration.collect import CalibrationStatistics, collect_statistics

__all__ = ["BetaSelection", "CalibrationStatistics", "collect_statistics", "select_beta"]
