"""Summaries of benchmark samples: medians, percentiles and paired ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no samples: the benchmark recorded nothing for this figure")
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the `fraction` quantile (0 to 1) with linear interpolation between ranks."""
    if not values:
        raise ValueError("percentile of no samples: the benchmark recorded nothing for this figure")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expected a fraction from 0 to 1, got {fraction!r}")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    weight = position - low
    return ordered[low] * (1.0 - weight) + ordered[high] * weight


def paired_ratio(subject: Sequence[float], baseline: Sequence[float]) -> float:
    """Return the median over rounds of subject/baseline, each pair measured in the same round.

    Pairing cancels most of the machine's drift, which moves both values of a
    round together.
    """
    if len(subject) != len(baseline):
        raise ValueError(
            f"paired samples differ in length: {len(subject)} against {len(baseline)}; "
            "every round must measure both variants"
        )
    ratios = [s / b for s, b in zip(subject, baseline, strict=True) if b]
    return median(ratios)
