"""Interval functions against scipy, and coverage by simulation."""

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from campaign.stats import (
    clopper_pearson_interval,
    leveugle_sample_size,
    neyman_allocation,
    ratio_interval,
    stratified_estimate,
    wilson_interval,
)

CASES = [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (0, 5000), (250, 300), (1, 1)]


@pytest.mark.parametrize(("k", "n"), CASES)
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_intervals_match_scipy(k, n, confidence):
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-9)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    assert clopper_pearson_interval(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-9)


def _coverage(true_rate, trials, runs, rng, interval):
    successes = rng.binomial(trials, true_rate, size=runs)
    hits = sum(
        low <= true_rate <= high for low, high in (interval(int(k), trials) for k in successes)
    )
    return hits / runs


def _exact_coverage(true_rate, trials, interval):
    """Probability that the interval covers the rate, summed over every binomial outcome."""
    top = int(trials * true_rate * 5) + 30
    return sum(
        binom.pmf(k, trials, true_rate)
        for k in range(top)
        if interval(k, trials)[0] <= true_rate <= interval(k, trials)[1]
    )


def test_wilson_covers_95_percent_of_2000_simulated_campaigns():
    rng = np.random.default_rng(0)
    assert 0.94 <= _coverage(0.05, 1000, 2000, rng, wilson_interval) <= 0.96
    assert 0.945 <= _exact_coverage(0.05, 1000, wilson_interval) <= 0.955


def test_wilson_coverage_near_zero_rates():
    # At a rate of 1e-4, Wilson's coverage oscillates with n around the nominal 95% (the
    # binomial is lumpy when few SDCs are expected): within 94-97% at these campaign sizes.
    for trials in (100_000, 150_000, 200_000):
        assert 0.94 <= _exact_coverage(1e-4, trials, wilson_interval) <= 0.97


def test_stratified_estimate_covers_and_weights_by_fault_space():
    rng = np.random.default_rng(1)
    rates = np.array([0.001, 0.02, 0.2, 0.05])
    population = np.array([4e6, 1e6, 2e5, 8e5])
    truth = float((rates * population).sum() / population.sum())
    trials = np.array([4000, 1000, 400, 800])
    hits = 0
    for _ in range(2000):
        estimate = stratified_estimate(rng.binomial(trials, rates), trials, population)
        hits += estimate.low <= truth <= estimate.high
    assert 0.94 <= hits / 2000 <= 0.96
    exact = stratified_estimate([10, 0], [100, 100], [1, 3])
    assert exact.rate == pytest.approx(0.1 * 0.25)


def test_leveugle_sample_sizes():
    # The classic figure: about 16,600 trials for a 1% margin at 99% over a huge population.
    assert leveugle_sample_size(10**12, 0.01, 0.99) == 16_588
    # The finite-population correction: never more trials than the space has sites.
    assert leveugle_sample_size(100, 0.01, 0.99) <= 100


def test_neyman_allocation_spends_where_the_variance_is():
    extra = neyman_allocation([0, 50], [100, 100], [1e6, 1e6], 1000)
    assert extra.sum() == 1000 and extra[1] > extra[0]


def test_ratio_interval_contains_the_ratio():
    ratio, low, high = ratio_interval(0.02, 1e-6, 0.005, 1e-7)
    assert ratio == pytest.approx(4.0) and low < 4.0 < high
    with pytest.raises(ValueError):
        ratio_interval(0.0, 1e-6, 0.01, 1e-6)
