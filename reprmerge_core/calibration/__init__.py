"""From models and unlabeled calibration inputs to ReACT statistics, and label-free choice of beta."""

from reprmerge_core.calibration.beta import (
    DEFAULT_BETAS,
    DEFAULT_IDENTITY_WEIGHTS,
    BetaSelection,
    CorrectionChoice,
    choose_correction,
    cross_validate,
    prior_identity_weight,
    select_beta,
)
from reprmerge_core.calibration.collect import CalibrationStatistics, collect_statistics, head_agreement

__all__ = ["DEFAULT_BETAS", "DEFAULT_IDENTITY_WEIGHTS", "BetaSelection", "CalibrationStatistics", "CorrectionChoice",
           "choose_correction", "collect_statistics", "cross_validate", "head_agreement", "prior_identity_weight",
           "select_beta"]
