"""Validity: timing goes on while the samples are noisy (up to max_time_s), and a point says
why it is not valid. Real steps (sleeps of fixed or random length) through time_fn, then real
points through the CLI; statistics checked against numpy."""

import json
import random
import time

import numpy as np
import pytest
import torch
from helpers import FAST, hstu_exp

from hstu_exp.bench.timer import StopRule, latency_stats, time_fn

CPU = torch.device("cpu")


def rule(**over):
    settings = dict(iters=5, min_time_s=0.05, max_time_s=0.8, cv_max=0.25, min_samples=10)
    return StopRule(**{**settings, **over})


def numpy_cv(samples):
    s = np.asarray(samples)
    return s.std(ddof=1) / s.mean()


def timed(step, stop):
    t0 = time.perf_counter()
    timing = time_fn(step, device=CPU, warmup=1, rule=stop)
    return timing.samples_ms, time.perf_counter() - t0


def test_a_steady_step_stops_once_it_has_enough_samples_and_is_valid():
    stop = rule()
    samples, elapsed = timed(lambda i: time.sleep(0.01), stop)
    assert stop.min_samples <= len(samples) and elapsed < stop.max_time_s
    assert numpy_cv(samples) <= stop.cv_max and stop.problems(samples) == []


def test_a_noisy_step_is_timed_up_to_max_time_s_then_says_its_cv():
    stop = rule()
    rng = random.Random(0)
    samples, elapsed = timed(lambda i: time.sleep(rng.choice([0.001, 0.02])), stop)
    assert elapsed >= stop.max_time_s  # went on past min_time_s and min_samples
    assert len(samples) > stop.min_samples
    cv = numpy_cv(samples)
    assert cv > stop.cv_max
    assert stop.problems(samples) == [f"CV {100 * cv:.1f}% > 25%"]


def test_too_few_samples_before_max_time_s_are_named():
    stop = rule(iters=2, max_time_s=0.35)
    samples, _ = timed(lambda i: time.sleep(0.1), stop)
    assert 2 <= len(samples) < stop.min_samples
    assert stop.problems(samples)[0] == f"too few samples ({len(samples)} < min_samples 10)"


def test_statistics_over_the_raw_samples_match_numpy():
    rng = np.random.default_rng(1)
    for n in (2, 7, 500):
        s = rng.lognormal(0, 0.5, n)
        stats = latency_stats(list(s))
        want = np.percentile(s, [10, 50, 90, 99])
        got = [stats[k] for k in ("p10_ms", "p50_ms", "p90_ms", "p99_ms")]
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert stats["median_ms"] == np.median(s) and stats["iterations"] == n
        assert (stats["min_ms"], stats["max_ms"]) == (s.min(), s.max())
        np.testing.assert_allclose([stats["mean_ms"], stats["cv"]], [s.mean(), numpy_cv(s)])


def test_the_cli_records_an_invalid_point_as_ok_with_the_reason(tmp_path):
    """cv_max=0.0001: no CPU timing is that steady, so the point is timed until max_time_s and
    recorded ok, valid=false; cv_max=10 stops at min_samples (max_time_s is generous: this
    machine's cores are shared, and a loaded core stretches a sample a hundredfold)."""
    recs = {}
    for cv_max, max_time in (("0.0001", "0.4"), ("10", "20")):
        proc = hstu_exp(
            "logger=none",
            "workload.total_history=64",
            "workload.new_history=8",
            *FAST,
            f"workload.cv_max={cv_max}",
            f"workload.max_time_s={max_time}",
            f"hydra.run.dir={tmp_path / cv_max}",
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        (recs[cv_max],) = [
            json.loads(line) for line in (tmp_path / cv_max / "results.jsonl").read_text().splitlines()
        ]
        recs[cv_max]["stdout"] = proc.stdout
    strict, lenient = recs["0.0001"], recs["10"]
    for r in (strict, lenient):
        assert r["status"] == "ok" and r["cv_basis"] == "samples" and r["headline"] == "median_ms"
        # the record keeps its samples to 6 significant digits; cv came from them as timed
        assert r["cv"] == pytest.approx(numpy_cv(r["samples_ms"]), rel=1e-4)
        assert r["min_samples"] == 10 and r["iterations"] == len(r["samples_ms"]) >= 3
    assert (strict["cv_max"], strict["max_time_s"]) == (0.0001, 0.4)
    assert strict["valid"] is False
    assert strict["invalid_reason"].endswith(f"CV {100 * strict['cv']:.1f}% > 0.01%")
    assert strict["wall_s"] >= 0.4  # timed on past min_time_s, up to max_time_s
    assert f"INVALID: {strict['invalid_reason']}" in strict["stdout"]
    assert lenient["valid"] is True and lenient["invalid_reason"] is None
    assert lenient["iterations"] >= 10 and "INVALID" not in lenient["stdout"]


@pytest.mark.gpu
def test_cuda_timing_goes_on_while_noisy_and_reads_clocks():
    """CUDA events, samples read in chunks: a steady matmul stops at min_samples; one that
    alternates between two sizes is timed up to max_time_s."""
    cuda = torch.device("cuda")
    a, b = torch.randn(2048, 2048, device=cuda), torch.randn(256, 256, device=cuda)
    stop = rule(iters=10, min_time_s=0.05, max_time_s=0.5, cv_max=0.5, min_samples=20)
    steady = time_fn(lambda i: a @ a, device=cuda, warmup=5, rule=stop)
    assert len(steady.samples_ms) >= 20 and min(steady.samples_ms) > 0
    assert stop.problems(steady.samples_ms) == []
    assert set(steady.clocks) >= {"sm_clock_mhz", "throttled", "clocks_unavailable"}
    t0 = time.perf_counter()
    noisy = time_fn(
        lambda i: (a if i % 2 else b) @ (a if i % 2 else b), device=cuda, warmup=5, rule=stop
    )
    assert time.perf_counter() - t0 >= stop.max_time_s
    assert numpy_cv(noisy.samples_ms) > stop.cv_max
    assert stop.problems(noisy.samples_ms)[0].startswith("CV ")


def test_a_record_keeps_six_significant_digits_of_its_samples():
    """The stats come from the samples as timed; the record's copy drops the float noise beyond
    6 significant digits and nothing above it."""
    from omegaconf import OmegaConf

    from hstu_exp.bench.measure import Measured, finish

    raw = [10 ** random.uniform(-3, 3) for _ in range(50)] + [1.23456789, 0.0120000449]
    rule = StopRule(iters=1, min_time_s=0, max_time_s=1, cv_max=100, min_samples=2)
    cfg = OmegaConf.create({"verify": False, "calibrate": False, "profile": False, "kernel": {}})
    m = Measured(samples_ms=raw, flops=1.0, nbytes=1.0, rule=rule, dtype=torch.float32)
    rec = finish(m, cfg, torch.device("cpu"))
    assert rec["samples_ms"][-2:] == [1.23457, 0.012]
    assert len(rec["samples_ms"]) == len(raw)
    assert all(abs(a - b) <= 5e-6 * b for a, b in zip(rec["samples_ms"], raw))
    assert rec["median_ms"] == latency_stats(raw)["median_ms"]
    assert all(len(f"{s:e}".split("e")[0].rstrip("0").replace(".", "")) <= 6 for s in rec["samples_ms"])
