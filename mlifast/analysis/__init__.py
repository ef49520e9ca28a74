"""Analysis layer: metrics of loss curves and weight vectors (MLI, barriers, distances)
and of output paths (Gauss length, logit linearity). See :mod:`mlifast.analysis.mli`.
"""

from . import mli
from .mli import (
    RUNNING_STAT_SUFFIXES,
    Bump,
    MLISummary,
    NonMonotonicFraction,
    average_bump_height,
    barrier_height,
    bumps,
    default_distance_include,
    delta_min,
    endpoint_barrier,
    gauss_length,
    fraction_non_monotonic,
    is_monotonic,
    logit_linearity,
    max_step_increase,
    report,
    summarize,
    weight_distance,
)

__all__ = ["mli", *mli.__all__]
