"""hstu_exp.stats.bootstrap_ratio against independent checks: the nominal coverage over many
fresh random draws, the large-sample (delta-method) width of a ratio of medians, and the
shrinking of the interval with the sample size."""
import math

import numpy as np
import pytest

from hstu_exp.stats import bootstrap_ratio


def test_point_estimate_is_the_ratio_of_the_statistic():
    rng = np.random.default_rng(123)
    a, b = rng.gamma(4.0, 1.0, 301), rng.gamma(9.0, 0.5, 57)
    r, lo, hi = bootstrap_ratio(a, b, n=500)
    assert r == pytest.approx(np.median(a) / np.median(b))
    assert lo < r < hi
    r, lo, hi = bootstrap_ratio(a, b, stat=np.mean, n=500)
    assert r == pytest.approx(a.mean() / b.mean()) and lo < r < hi
    # the same seed gives the same interval; another seed a slightly different one
    assert bootstrap_ratio(a, b, seed=7) == bootstrap_ratio(a, b, seed=7)
    assert bootstrap_ratio(a, b, seed=7) != bootstrap_ratio(a, b, seed=8)
    assert all(math.isnan(v) for v in bootstrap_ratio([], b))


def test_interval_covers_the_true_ratio_at_about_the_nominal_rate():
    # medians 10 and 4: the true ratio of medians is 2.5
    covered, trials = 0, 150
    for seed in range(trials):
        rng = np.random.default_rng(10_000 + seed)
        a, b = rng.normal(10, 1.0, 300), rng.normal(4, 0.5, 200)
        _, lo, hi = bootstrap_ratio(a, b, n=1000, seed=seed)
        covered += lo <= 2.5 <= hi
    # 95 % nominal; 150 trials give a binomial sd of about 1.8 %
    assert 0.89 <= covered / trials <= 0.99, covered


def test_width_matches_the_delta_method_and_shrinks_with_n():
    def width(size, seed):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(10, 1.0, size), rng.normal(4, 0.5, size)
        _, lo, hi = bootstrap_ratio(a, b, n=2000, seed=seed)
        return hi - lo

    def delta_width(size):
        # sd of a normal sample's median: sigma * sqrt(pi / 2 / size)
        rel = math.hypot(1.0 / 10, 0.5 / 4) * math.sqrt(math.pi / 2 / size)
        return 2 * 1.959964 * 2.5 * rel

    for size in (400, 1600):
        mean_width = np.mean([width(size, s) for s in range(8)])
        assert mean_width == pytest.approx(delta_width(size), rel=0.25)
    # four times the samples: about half the width
    assert np.mean([width(100, s) for s in range(8)]) / np.mean(
        [width(1600, s) for s in range(8)]) == pytest.approx(4.0, rel=0.35)


def test_bad_level_is_refused():
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0, 2.0], [1.0], level=1.5)
