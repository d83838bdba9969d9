"""SDC-rate statistics: binomial intervals, stratified estimates over the fault space, sample
sizes, allocation of further trials, and the baseline-vs-text ratio.

A campaign samples each stratum (model x kind x layer x format x bit) separately; a model-level
SDC rate is the average of the stratum rates weighted by each stratum's share of the fault space,
and its variance is the weighted sum of the stratum variances (with the finite-population
correction where a stratum is small enough to matter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, norm


def _z(confidence: float) -> float:
    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: sound near 0, unlike Wald's."""
    if trials <= 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = successes / trials
    denominator = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def clopper_pearson_interval(
    successes: int, trials: int, confidence: float = 0.95
) -> tuple[float, float]:
    """The exact (conservative) binomial interval, from beta quantiles."""
    if trials <= 0:
        return (0.0, 1.0)
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = (
        1.0
        if successes == trials
        else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return (low, high)


@dataclass(frozen=True)
class StratifiedEstimate:
    rate: float
    variance: float
    low: float
    high: float

    @property
    def margin(self) -> float:
        return (self.high - self.low) / 2


def stratified_estimate(
    successes: Sequence[int],
    trials: Sequence[int],
    population: Sequence[float],
    confidence: float = 0.95,
) -> StratifiedEstimate:
    """Rate over the union of strata, each weighted by its ``population`` (fault-space size).

    Per stratum the variance is p(1-p)/n times the finite-population correction (N-n)/(N-1);
    p is replaced by (k + 0.5)/(n + 1) in the variance so that strata with no SDC yet still
    contribute uncertainty (the interval never collapses to a point at 0).
    """
    k = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    size = np.asarray(population, dtype=float)
    if not (len(k) == len(n) == len(size)) or (n <= 0).any() or (k > n).any():
        raise ValueError("strata need 0 <= successes <= trials and trials > 0")
    weight = size / size.sum()
    rate = float((weight * k / n).sum())
    shrunk = (k + 0.5) / (n + 1)
    correction = np.where(size > 1, np.clip((size - n) / np.maximum(size - 1, 1), 0, 1), 0.0)
    variance = float((weight**2 * shrunk * (1 - shrunk) / n * correction).sum())
    half = _z(confidence) * math.sqrt(variance)
    return StratifiedEstimate(rate, variance, max(0.0, rate - half), min(1.0, rate + half))


def leveugle_sample_size(
    population: float, margin: float, confidence: float, p: float = 0.5
) -> int:
    """Statistical fault injection sample size (Leveugle et al., DATE 2009), with the
    finite-population correction: exhaustive when the population is that small."""
    t = _z(confidence)
    n = population / (1 + margin**2 * (population - 1) / (t**2 * p * (1 - p)))
    return max(1, math.ceil(n))


def neyman_allocation(
    successes: Sequence[int], trials: Sequence[int], population: Sequence[float], extra: int
) -> np.ndarray:
    """How to spend ``extra`` more trials across strata: in proportion to population x standard
    deviation (Neyman), less what each stratum already has; never negative."""
    k = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    size = np.asarray(population, dtype=float)
    shrunk = (k + 0.5) / (n + 1)
    score = size * np.sqrt(shrunk * (1 - shrunk))
    target = score / score.sum() * (n.sum() + extra)
    need = np.clip(target - n, 0, None)
    if need.sum() == 0:
        return np.zeros(len(n), dtype=int)
    allocation = np.floor(need / need.sum() * extra).astype(int)
    remainder = extra - allocation.sum()
    allocation[np.argsort(-(need - allocation))[:remainder]] += 1
    return allocation


def ratio_interval(
    rate_a: float, variance_a: float, rate_b: float, variance_b: float, confidence: float = 0.95
) -> tuple[float, float, float]:
    """rate_a / rate_b with a log-method (delta) interval: (ratio, low, high). Used for the
    paper's "improvement in reliability", baseline SDC rate over text-head SDC rate."""
    if rate_a <= 0 or rate_b <= 0:
        raise ValueError("a ratio of SDC rates needs both rates above 0")
    ratio = rate_a / rate_b
    spread = _z(confidence) * math.sqrt(variance_a / rate_a**2 + variance_b / rate_b**2)
    return ratio, ratio * math.exp(-spread), ratio * math.exp(spread)
