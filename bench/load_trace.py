"""Pieces shared by the serving-side load benchmarks: request lengths and latency percentiles."""

from __future__ import annotations

import math
import random


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    """A token count from a log-normal with this median, clipped to [low, high] (ShareGPT-like skew)."""
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
