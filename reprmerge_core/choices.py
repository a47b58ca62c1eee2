"""Names of the library's options, importable without torch: the command line lists them in its help and the
bundle manifest validates against them before any tensor library loads. The modules that implement the options
(backbone pooling, merge methods, the correction's normalisation) take their names from here.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reprmerge_core.correction.statistics import TaskStatistics

POOLINGS: tuple[str, ...] = ("mean", "cls", "pooler")
MERGE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare", "breadcrumbs", "regmean", "projection")


class Normalisation(str, Enum):
    """How raw statistic sums are scaled before solving, so that one beta means the same everywhere.

    - ``energy`` (default): divide task t's sums by trace(A_t) / d, the mean squared merged feature
      norm per dimension times N_t. The normalised A_t has mean eigenvalue 1, so beta is the ridge
      strength relative to the average per-dimension second moment: independent of sample count,
      feature scale and representation size.
    - ``samples``: divide by N_t (per-sample means); beta then still depends on the feature scale.
    - ``none``: raw sums; beta is only meaningful for one data size.

    Each task's loss is scaled by the same factor, so preference weights compare normalised losses.
    """

    ENERGY = "energy"
    SAMPLES = "samples"
    NONE = "none"

    def scale(self, stats: TaskStatistics) -> float:
        """The divisor applied to this task's A, B and e."""
        if self is Normalisation.NONE:
            return 1.0
        if stats.n == 0:
            raise ValueError("cannot normalise statistics of a task with no samples")
        if self is Normalisation.SAMPLES:
            return float(stats.n)
        energy = stats.merged_energy
        if not energy > 0:
            raise ValueError("cannot normalise statistics with zero merged feature energy")
        return energy / stats.dim


def check_beta(beta: float | str) -> float | str:
    """A beta as configuration files and settings give it: a finite positive number or 'auto' (cross-validated)."""
    if beta == "auto" or (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta < float("inf")):
        return beta
    raise ValueError(f"beta must be a finite positive number or 'auto', got {beta!r}")


def check_prior(prior: float | str) -> float | str:
    """A prior as configuration files give it: 'auto', 'procrustes', 'identity' or an identity weight in [0, 1]."""
    if prior != "auto":
        prior_identity_weight(prior)
    return prior


def prior_identity_weight(prior: float | str) -> float:
    """alpha of a prior given by name ("procrustes" 0, "identity" 1) or as a number in [0, 1]."""
    names = {"procrustes": 0.0, "identity": 1.0}
    if isinstance(prior, str) and prior in names:
        return names[prior]
    try:
        alpha = float(prior)
    except ValueError:
        raise ValueError(f"prior must be 'auto', 'procrustes', 'identity' or a number in [0, 1], got {prior!r}") \
            from None
    if not 0 <= alpha <= 1:
        raise ValueError(f"prior identity weight must be in [0, 1], got {alpha}")
    return alpha


EXPORT_FORMATS: tuple[str, ...] = ("onnx",)  # `reprmerge export --format`
