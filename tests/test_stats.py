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
        [width(1600, s) for s in range(8)]
    ) == pytest.approx(4.0, rel=0.35)


def test_bad_level_is_refused():
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0, 2.0], [1.0], level=1.5)


def _e2e(mode, units, per_pass=4, **extra):
    """An e2e record whose passes serve 4 batches of growing size (the second is 3x the first):
    the per-batch median is a middle batch, the pass total the whole stream."""
    repeats = [[t * w / 10 for t in u for w in (1, 2, 3, 4)] for u in units]
    return {
        "status": "ok",
        "workload": "e2e",
        "model": "tiny",
        "mode": mode,
        "batch_size": 2,
        "cache": "none",
        "graph": "none",
        "kernel": "triton",
        "num_candidates": 8,
        "total_history": 512,
        "device": "cuda",
        "num_batches": per_pass,
        "samples_ms": repeats[0],
        "median_ms": float(np.median(repeats[0])),
        "total_ms": float(np.median(units[0])),
        "valid": True,
        "overrides": [f"workload.mode={mode}"],
        **extra,
    }


def test_e2e_speedup_is_the_ratio_of_pass_totals_resampled_by_pass():
    """The e2e speedup is baseline / candidate of the median pass total, its interval the
    bootstrap of the pass totals (worked out of the samples of an older record)."""
    import pandas as pd

    from hstu_exp.report.aggregate import e2e_speedups

    rng = np.random.default_rng(1)
    base_passes = (100 * (1 + 0.02 * rng.standard_normal(12))).tolist()
    fast_passes = (20 * (1 + 0.02 * rng.standard_normal(12))).tolist()
    sp = e2e_speedups(
        pd.DataFrame([_e2e("baseline", [base_passes]), _e2e("cache_graph", [fast_passes])])
    )
    assert len(sp) == 1
    r = sp.iloc[0]
    assert r["speedup"] == pytest.approx(np.median(base_passes) / np.median(fast_passes))
    _, lo, hi = bootstrap_ratio(base_passes, fast_passes)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    assert r["repeats"] == 1 and r["repeats_agree"]


def test_repeats_report_their_spread_and_a_disagreement_is_flagged():
    """Three repeats: the spread is the lowest and highest repeat-pair ratio; when one repeat of
    the candidate ran 30 % slower, beyond every interval, the point is flagged, not averaged."""
    import pandas as pd

    from hstu_exp.report.aggregate import e2e_speedups, format_headline, headline

    rng = np.random.default_rng(2)

    def passes(ms):
        return (ms * (1 + 0.01 * rng.standard_normal(10))).tolist()

    base = [passes(100), passes(101), passes(99)]
    agree = [passes(20), passes(20.2), passes(19.9)]
    apart = [passes(20), passes(26), passes(19.9)]
    for fast, agreeing in ((agree, True), (apart, False)):
        recs = [
            _e2e("baseline", base, repeat_units_ms=base, repeats=3),
            _e2e("cache_graph", fast, repeat_units_ms=fast, repeats=3),
        ]
        r = e2e_speedups(pd.DataFrame(recs)).iloc[0]
        ratios = sorted(np.median(b) / np.median(f) for b, f in zip(base, fast))
        assert (r["spread_low"], r["spread_high"]) == pytest.approx((ratios[0], ratios[-1]))
        assert r["repeats"] == 3 and bool(r["repeats_agree"]) is agreeing
        line = format_headline(headline(pd.DataFrame(recs)))
        assert f"3 repeats {ratios[0]:.2f}-{ratios[-1]:.2f}x" in line
        assert ("REPEATS DISAGREE" in line) is not agreeing


def test_combined_repeats_keep_every_repeat_and_flag_disagreement():
    from hstu_exp.bench.measure import combine_repeats

    def result(ms, valid=True):
        return {"median_ms": ms, "valid": valid, "invalid_reason": None if valid else "CV 9%"}

    units = [[1.0, 1.01, 0.99] * 5, [1.3, 1.31, 1.29] * 5, [1.02, 1.0, 1.01] * 5]
    rec = combine_repeats([result(1.0), result(1.3, valid=False), result(1.01)], units)
    assert rec["repeats"] == 3 and rec["repeat_ms"] == [1.0, 1.3, 1.01]
    assert rec["median_ms"] == 1.01  # the median repeat's body
    assert rec["repeats_agree"] is False and rec["repeat_units_ms"] == units
    assert rec["valid"] is False and rec["invalid_reason"] == "repeat 2: CV 9%"
    assert rec["repeat_spread"] == pytest.approx(0.3 / 1.01)
