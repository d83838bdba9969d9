"""Interval functions against scipy, and coverage by simulation."""

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm

from campaign.analysis.stats import (
    ClusterSums,
    bootstrap_ratio_interval,
    clopper_pearson_interval,
    effective_sample_size,
    effective_sample_size_from_sums,
    leveugle_sample_size,
    neyman_allocation,
    neyman_total,
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
    # At small expected counts Wilson's coverage oscillates with n (the binomial is lumpy):
    # computed exactly at a rate of 1e-4, it ranges over about 93.6-96.5% while n * p is
    # between 10 and 20, and dips to 91-93% below 5 expected SDCs. With 100-200 expected it
    # stays within about 94.4-95.5%, so the check uses campaigns of 1e6 and 2e6 trials;
    # Clopper-Pearson is the conservative option when few SDCs are expected.
    rng = np.random.default_rng(0)
    assert 0.94 <= _coverage(1e-4, 1_000_000, 2000, rng, wilson_interval) <= 0.96
    for trials in (1_000_000, 2_000_000):
        assert 0.945 <= _exact_coverage(1e-4, trials, wilson_interval) <= 0.955
    for trials in (10_000, 50_000, 100_000, 150_000, 200_000):
        assert _exact_coverage(1e-4, trials, clopper_pearson_interval) >= 0.95


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


def test_stratified_estimate_covers_rare_rates():
    # Rates of 1e-4..1e-3 with 40,000 trials per stratum: 88 SDCs expected overall, 4 in the
    # rarest strata. The normal interval is slightly short here: 94.8% over 400,000 runs.
    rng = np.random.default_rng(0)
    rates = np.array([1e-4, 2e-4, 5e-4, 1e-3, 3e-4, 1e-4])
    population = np.array([4e8, 1e8, 2e8, 5e7, 8e8, 1e9])
    truth = float((rates * population).sum() / population.sum())
    trials = np.full(len(rates), 40_000)
    hits = 0
    for _ in range(2000):
        estimate = stratified_estimate(rng.binomial(trials, rates), trials, population)
        hits += estimate.low <= truth <= estimate.high
    assert 0.94 <= hits / 2000 <= 0.96


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


def test_neyman_total_is_cochrans_sample_size():
    successes, trials, population = [2, 30], [20, 40], [200.0, 600.0]
    margin, confidence = 0.05, 0.95
    # By hand: W = N_h / N, S_h from the shrunk rates, V = (margin / z)^2 (Cochran 5.25: trials
    # are drawn with replacement, so no finite-population term).
    z = norm.ppf(0.975)
    weights = [size / sum(population) for size in population]
    deviations = [
        math.sqrt((k + 0.5) / (n + 1) * (1 - (k + 0.5) / (n + 1)))
        for k, n in zip(successes, trials, strict=True)
    ]
    spread = sum(w * d for w, d in zip(weights, deviations, strict=True))
    total = neyman_total(successes, trials, population, margin, confidence)
    assert total == math.ceil(spread**2 / (margin / z) ** 2)
    # Spread over the strata as Neyman would, that many trials give exactly the margin.
    allocated = [total * w * d / spread for w, d in zip(weights, deviations, strict=True)]
    variance = sum(w**2 * d**2 / n for w, d, n in zip(weights, deviations, allocated, strict=True))
    assert z * math.sqrt(variance) == pytest.approx(margin, rel=0.01)
    assert z * math.sqrt(variance) <= margin
    # A wider margin needs fewer trials.
    totals = [neyman_total(successes, trials, population, m, confidence) for m in (0.02, 0.05, 0.1)]
    assert totals[0] > totals[1] > totals[2]


def test_sampled_strata_get_no_finite_population_correction_but_a_census_has_no_variance():
    # Trials are drawn with replacement: 80, or even 120, draws from 100 are still a sample.
    for trials in (80, 120):
        sampled = stratified_estimate([40], [trials], [100])
        shrunk = 40.5 / (trials + 1)
        assert sampled.variance == pytest.approx(shrunk * (1 - shrunk) / trials)
    census = stratified_estimate([40, 5], [100, 50], [100, 1000], census=[True, False])
    assert census.variance == pytest.approx((1000 / 1100) ** 2 * (5.5 / 51) * (1 - 5.5 / 51) / 50)


def test_bootstrap_ratio_interval_agrees_with_the_delta_method_for_large_counts():
    population = [1e6, 2e5, 5e6]
    a = ([400, 2000, 100], [100_000] * 3, population)
    b = ([100, 500, 20], [100_000] * 3, population)
    ratio, low, high = bootstrap_ratio_interval(a, b, resamples=4000, seed=0)
    rate_a, rate_b = stratified_estimate(*a), stratified_estimate(*b)
    assert ratio == pytest.approx(rate_a.rate / rate_b.rate)
    assert low < ratio < high
    delta = ratio_interval(rate_a.rate, rate_a.variance, rate_b.rate, rate_b.variance)
    assert (ratio, low, high) == pytest.approx(delta, rel=0.03)
    assert bootstrap_ratio_interval(a, b, resamples=4000, seed=0) == (ratio, low, high)
    with pytest.raises(ValueError):
        bootstrap_ratio_interval(a, ([0, 0, 0], [10, 10, 10], population))


def test_effective_sample_size_of_clusters():
    rng = np.random.default_rng(0)
    clusters = 300
    # Every cluster all-SDC or all-clean: one cluster is worth one trial.
    sizes = np.full(clusters, 10)
    all_or_nothing = rng.binomial(1, 0.3, clusters) * sizes
    assert effective_sample_size(all_or_nothing, sizes) == pytest.approx(clusters)
    uneven = rng.integers(2, 20, clusters)
    all_or_nothing = rng.binomial(1, 0.3, clusters) * uneven
    assert effective_sample_size(all_or_nothing, uneven) == pytest.approx(clusters, rel=0.01)
    # Independent trials in clusters: about n.
    independent = rng.binomial(sizes, 0.2)
    assert effective_sample_size(independent, sizes) >= 0.75 * sizes.sum()
    assert effective_sample_size(independent, sizes) <= sizes.sum()
    # The same from the sums a database computes.
    sums = ClusterSums(
        clusters,
        float(sizes.sum()),
        float(independent.sum()),
        float((independent**2 / sizes).sum()),
        float((sizes**2).sum()),
    )
    assert effective_sample_size_from_sums(sums) == pytest.approx(
        effective_sample_size(independent, sizes)
    )
