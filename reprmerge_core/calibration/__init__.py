"""From models and unlabeled calibration inputs to ReACT statistics, and label-free choice of beta."""

from reprmerge_core.calibration.beta import DEFAULT_BETAS, BetaSelection, choose_correction, select_beta
from reprmerge_core.calibration.collect import CalibrationStatistics, collect_statistics

__all__ = ["DEFAULT_BETAS", "BetaSelection", "choose_correction", "CalibrationStatistics", "collect_statistics", "select_beta"]
