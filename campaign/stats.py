"""Interval estimates for SDC rates. (The statistics issue grows this into stratified estimates,
sequential plans and baseline-vs-text ratios.)"""

from __future__ import annotations

import math

from scipy.stats import norm


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: sound near 0, unlike Wald's."""
    if trials <= 0:
        return (0.0, 1.0)
    z = norm.ppf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))
