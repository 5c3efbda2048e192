"""scripts/compare.py (= hstu-exp-compare): two real sweeps of the same grid give a ratio table
with the geometric mean and a figure; a synthetic regression trips --fail-above."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAST, ROOT, hstu_exp
from test_sweep import assert_real_png

from hstu_exp.report.compare import main as compare_main

GRID = [
    "model=tiny",
    "logger=none",
    "cache=none,paged",
    "workload.batch_size=1,2",
    "workload.total_history=64",
    "workload.new_history=64",
    *FAST,
]


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    out = []
    for name in ("before", "after"):
        sweep = tmp_path_factory.mktemp("cmp") / name
        proc = hstu_exp("-m", *GRID, f"hydra.sweep.dir={sweep}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out.append(sweep)
    return out


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a sweep whose records went through edit(record) -> record."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("results.csv", "figures"))
    for f in dst.rglob("results.jsonl"):
        recs = [edit(json.loads(line)) for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst


def with_batch(r, batch):
    """The record as if swept at another batch size: point key, override and config agree."""
    config = {**r["config"], "workload": {**r["config"]["workload"], "batch_size": batch}}
    overrides = [
        o if not o.startswith("workload.batch_size=") else f"workload.batch_size={batch}"
        for o in r["overrides"]
    ]
    return {**r, "batch_size": batch, "config": config, "overrides": overrides}


def slower(factor, only=lambda r: True):
    def edit(r):
        if r["status"] == "ok" and only(r):
            r = {
                **r,
                "median_ms": r["median_ms"] * factor,
                "p90_ms": r["p90_ms"] * factor,
                "samples_ms": [v * factor for v in r["samples_ms"]],
            }
        return r

    return edit


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_two_sweeps_of_one_grid_give_ratio_table_geomean_and_figure(two_sweeps, tmp_path):
    a, b = two_sweeps
    proc = run_script(a, b, "--csv", tmp_path / "joined.csv")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for column in ("A median ms", "B median ms", "median B/A", "p90 B/A", "floor B/A"):
        assert column in out, out
    assert re.search(r"^geomean\s+\d+\.\d{3}", out, re.M), out
    assert "4 points joined" in out and "(0 only in A, 0 only in B)" in out
    assert_real_png(b / "figures" / "compare_vs_before.png")
    joined = pd.read_csv(tmp_path / "joined.csv")
    assert len(joined) == 4
    assert joined["median_ms_ratio"].tolist() == pytest.approx(
        (joined["median_ms_b"] / joined["median_ms_a"]).tolist()
    )


def steady(r):
    """The record as if timed on a quiet machine: 40 samples within 1 % of its median (CPU
    timings of the tiny model scatter too much for a 1.2x slowdown to be sure)."""
    if r["status"] != "ok":
        return r
    m = r["median_ms"]
    return {**r, "samples_ms": [m * (1 + 0.01 * ((i % 9) - 4) / 4) for i in range(40)]}


def test_synthetic_regression_fails_the_gate(two_sweeps, tmp_path, capsys):
    a = edited_copy(two_sweeps[0], tmp_path / "before", steady)
    same = edited_copy(a, tmp_path / "same", lambda r: r)
    worse = edited_copy(a, tmp_path / "worse", slower(1.2))
    one_worse = edited_copy(
        a,
        tmp_path / "one_worse",
        slower(1.5, only=lambda r: (r["cache"], r["batch_size"]) == ("paged", 2)),
    )

    assert compare_main([str(a), str(same), "--fail-above", "1.05", "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^geomean\s+1\.000", out, re.M) and "gate passed" in out

    # the CLI as a user runs it: script, exit status, message
    proc = run_script(a, worse, "--fail-above", "1.05")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "REGRESSION: 4 point(s) with median latency B/A above 1.05 by the 95% interval's "
        "lower end" in proc.stderr
    )
    assert re.search(r"^geomean\s+1\.200\s+1\.200", proc.stdout, re.M), proc.stdout
    assert proc.stdout.count("1.200!") >= 8  # median and p90 of every point flagged
    assert (worse / "figures" / "compare_vs_before.png").is_file()

    # one point 1.5x slower: fails per point, passes on the geometric mean (1.5 ** 0.25)
    assert compare_main([str(a), str(one_worse), "--fail-above", "1.05", "--no-figure"]) == 1
    assert (
        compare_main(
            [str(a), str(one_worse), "--fail-above", "1.15", "--gate", "geomean", "--no-figure"]
        )
        == 0
    )
    assert f"{1.5**0.25:.3f}" in capsys.readouterr().out
    # without --fail-above it only reports
    assert compare_main([str(a), str(worse), "--no-figure"]) == 0


def test_join_on_swept_keys(two_sweeps, tmp_path, capsys):
    a, _ = two_sweeps
    # a sweep-wide change of one choice (kernel) is left out of the join and said so
    other = edited_copy(a, tmp_path / "triton", lambda r: {**r, "kernel": "triton"})
    assert compare_main([str(a), str(other), "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert "ignoring keys that differ between the sweeps: kernel (reference -> triton)" in out
    assert "4 points joined" in out
    # a results.csv (as in outputs/published/) joins with a sweep dir; the grid's overlap only
    shutil.copy(a / "results.csv", tmp_path / "results.csv")
    part = edited_copy(a, tmp_path / "part", lambda r: with_batch(r, r["batch_size"] * 2))
    assert compare_main([str(tmp_path / "results.csv"), str(part), "--no-figure"]) == 0
    assert "2 points joined" in capsys.readouterr().out
    # nothing in common: exit 2 with the keys it tried
    none = edited_copy(a, tmp_path / "none", lambda r: with_batch(r, r["batch_size"] + 10))
    assert compare_main([str(a), str(none), "--no-figure"]) == 2
    assert "no point of A matches" in capsys.readouterr().err
    assert compare_main([str(a), str(tmp_path / "missing")]) == 2


def test_console_script_and_plot_sweep(two_sweeps, tmp_path):
    a, b = two_sweeps
    exe = Path(sys.executable).parent / "hstu-exp-compare"
    if exe.exists():
        proc = subprocess.run(
            [str(exe), str(a), str(b), "--no-figure"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and "geomean" in proc.stdout, proc.stderr
    # plot_sweep redraws the figures (and the CSV) from disk alone
    copy = edited_copy(a, tmp_path / "replot", lambda r: r)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(copy), "--csv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("latency_vs_batch", "speedup_bars", "speedup_heatmap"):  # one T
        assert_real_png(copy / "figures" / f"{name}.png")
    assert (copy / "results.csv").read_text() == (a / "results.csv").read_text()


def test_gate_looks_at_the_interval_not_the_point_estimate(two_sweeps, tmp_path, capsys):
    """A point 1.10x slower by its median, but timed with so few and so scattered samples that
    its 95 % interval reaches below 1.05, does not fail --fail-above 1.05; a point 1.10x slower
    with tight samples does. The interval ends are checked against the exact bootstrap
    distribution of a median, worked out from the binomial law rather than by resampling."""
    from math import comb

    import numpy as np

    a = edited_copy(two_sweeps[0], tmp_path / "steady", steady)
    # 11 scattered samples: the median of a resample is the k-th of them with a probability the
    # binomial law gives; 11 (not 9) keeps the 2.5 % and 97.5 % points away from a jump
    factors = (0.55, 0.7, 0.8, 0.85, 0.9, 1.0, 1.1, 1.2, 1.3, 1.6, 1.9)

    def noisy(r):
        if r["status"] != "ok":
            return r
        m = r["median_ms"] * 1.10
        return {**r, "median_ms": m, "samples_ms": [m * f for f in factors]}

    wide = edited_copy(a, tmp_path / "wide", noisy)
    assert (
        compare_main(
            [
                str(a),
                str(wide),
                "--fail-above",
                "1.05",
                "--no-figure",
                "--csv",
                str(tmp_path / "wide.csv"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "latency B/A 95% CI" in out and "gate passed" in out
    assert "1.100!" in out  # the point estimate is still flagged against --threshold
    joined = pd.read_csv(tmp_path / "wide.csv")

    n, half = len(factors), (len(factors) + 1) // 2
    cdf = [
        sum(comb(n, j) * (k / n) ** j * (1 - k / n) ** (n - j) for j in range(half, n + 1))
        for k in range(1, n + 1)
    ]  # P(median of a resample <= k-th smallest sample)
    low_k = next(k for k, c in enumerate(cdf) if c >= 0.025)
    high_k = next(k for k, c in enumerate(cdf) if c >= 0.975)
    assert cdf[low_k - 1] < 0.01 and cdf[low_k] > 0.04  # far from a jump: no Monte-Carlo luck
    assert cdf[high_k - 1] < 0.96 and cdf[high_k] > 0.99
    # A's steady samples lie within 1 % of its median, so B/A sits within 1 % of 1.1 x factor
    ok = joined.dropna(subset=["ci_low"])
    assert len(ok) > 0
    assert np.allclose(ok["ci_low"], 1.1 * factors[low_k], rtol=0.011)
    assert np.allclose(ok["ci_high"], 1.1 * factors[high_k], rtol=0.011)
    assert (ok["ci_low"] < 1.05).all() and (ok["ci_high"] > 1.10).all()

    tight = edited_copy(a, tmp_path / "tight", slower(1.10))
    proc = run_script(a, tight, "--fail-above", "1.05", "--no-figure")
    assert proc.returncode == 1 and "by the 95% interval's lower end" in proc.stderr


def test_published_older_schema_csvs_load_with_versions_as_text(tmp_path):
    """The published H200 sweeps (schema before validity and intervals) load through the one
    loader with versions and shas as text, and the report scripts run on them as shown."""
    from hstu_exp.report.aggregate import load_sweep

    published = ROOT / "outputs" / "published"
    df = load_sweep(published / "seed_e2e_h200")
    assert set(df["cuda"].dropna()) == {"13.0"} and set(df["driver"].dropna()) == {"580.159.04"}
    assert all(isinstance(v, str) for v in df["git_sha"].dropna())
    proc = subprocess.run(
        [
            str(ROOT / "scripts" / "goals.py"),
            str(published / "goal_cases_h200"),
            str(published / "seed_e2e_h200"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| batch 8, cached | paged | triton | cudagraph |" in proc.stdout
    assert "| cache_graph | 1 |" in proc.stdout
    proc = subprocess.run(
        [
            str(ROOT / "scripts" / "plot_sweep.py"),
            str(published / "seed_block_reference_h200" / "results.csv"),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("latency_bars", "speedup_bars", "speedup_heatmap"):
        assert_real_png(tmp_path / f"{name}.png")


def test_goals_table_judges_e2e_speedup_by_its_interval(tmp_path):
    """scripts/goals.py on GPU records with samples: cache_graph 4x over baseline with tight
    samples meets '>= 3x, CI above'; 3.2x with scattered samples (interval reaching below 3) does
    not; an invalid point never meets a goal."""
    import numpy as np

    rng = np.random.default_rng(3)

    def rec(mode, b, ms, spread, valid=True, factors=None):
        s = (
            [ms * f for f in factors]
            if factors
            else (ms * np.exp(spread * rng.standard_normal(60))).tolist()
        )
        return {
            "status": "ok",
            "workload": "e2e",
            "mode": mode,
            "batch_size": b,
            "device": "cuda",
            "cache": "none",
            "graph": "none",
            "kernel": "triton",
            "total_history": 4096,
            "num_candidates": 256,
            "median_ms": float(np.median(s)),
            "samples_ms": s,
            "valid": valid,
            "config_key": f"{mode}{b}",
            "total_ms": float(np.median(s)),
            "num_batches": 1,
        }  # a sample a pass

    recs = [
        rec("baseline", 2, 8.0, 0.01),
        rec("cache_graph", 2, 2.0, 0.01),
        rec("baseline", 4, 8.0, 0.01),
        rec("cache_graph", 4, 2.5, 0, factors=(0.5, 0.7, 0.85, 0.95, 1, 1.05, 1.2, 1.6, 2.2)),
        rec("baseline", 16, 8.0, 0.01),
        rec("cache_graph", 16, 2.0, 0.01, valid=False),
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = subprocess.run(
        [str(ROOT / "scripts" / "goals.py"), str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        int(line.split("|")[2]): line
        for line in proc.stdout.splitlines()
        if line.startswith("| cache_graph")
    }
    assert rows[2].rstrip().endswith("| yes |"), rows[2]
    assert re.search(r"\| 3\.\d\dx \| [0-2]\.\d\d-", rows[4]) and rows[4].rstrip().endswith("| no |"), (
        rows[4]
    )
    assert rows[16].rstrip().endswith("| no (invalid point) |"), rows[16]


def test_agreement_says_what_the_records_know_about_a_difference(two_sweeps, tmp_path, capsys):
    """B/A within its interval agrees; a 1 % shift outside the (±0.25 %) intervals is put down
    to what the records show: another GPU, another boot, throttling, or none of them."""

    def on(uuid, boot, throttled=False):
        return lambda r: {
            **r,
            "gpu_uuid": uuid,
            "boot_id": boot,
            "throttled": throttled,
            "valid": not throttled,
        }

    a = edited_copy(two_sweeps[0], tmp_path / "a", lambda r: on("GPU-1", "boot-1")(steady(r)))
    same = edited_copy(a, tmp_path / "same", lambda r: r)
    cases = {
        "card": (on("GPU-2", "boot-2"), "no: another GPU"),
        "boot": (on("GPU-1", "boot-2"), "no: another boot"),
        "hot": (on("GPU-1", "boot-1", throttled=True), "no: throttled in B"),
        "code": (on("GPU-1", "boot-1"), "no: same GPU and boot: a real difference"),
    }
    assert compare_main([str(a), str(same), "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert "agreement: 4 of 4 points with B/A's 95% interval holding 1" in out
    for name, (where, verdict) in cases.items():
        b = edited_copy(a, tmp_path / name, lambda r, w=where: slower(1.01)(w(r)))
        assert compare_main([str(a), str(b), "--no-figure"]) == 0
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if re.match(r"^\s*(none|paged)\s", line)]
        assert len(rows) == 4 and all(line.rstrip().endswith(verdict) for line in rows), out
        assert "agreement: 0 of 4 points" in out and verdict[4:] in out.splitlines()[-1]


def test_gate_fails_when_b_lacks_points_and_refuses_bad_limits(two_sweeps, tmp_path, capsys):
    """--fail-above cannot pass a sweep whose candidate failed or never ran a point; nan and 0
    are refused in one line (nan would turn the gate off, 0 would divide by zero)."""
    a = edited_copy(two_sweeps[0], tmp_path / "a", steady)
    points = sorted(
        {
            r["config_key"]
            for f in a.rglob("results.jsonl")
            for r in map(json.loads, f.read_text().splitlines())
        }
    )

    def broken(r):
        if r["config_key"] == points[0]:
            return {**r, "status": "failed", "error": "interrupted"}
        return r

    b = edited_copy(a, tmp_path / "b", broken)
    gone = next(f for f in b.rglob("results.jsonl") if points[1] in f.read_text() and f.parent != b)
    gone.unlink()
    assert compare_main([str(a), str(b), "--fail-above", "1.05", "--no-figure"]) == 1
    captured = capsys.readouterr()
    assert "2 points joined" in captured.out and "(2 only in A" in captured.out
    assert "REGRESSION: 2 point(s) ok in A have no ok record in B" in captured.err
    for bad in (["--fail-above", "nan"], ["--threshold", "0"], ["--threshold", "-1"]):
        assert compare_main([str(a), str(a), "--no-figure", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hstu-exp-compare: error: ") and "\n" not in err, err


def test_points_are_told_apart_by_any_swept_knob(tmp_path, capsys):
    """graph.fit_rows is no point key: sweeping it keeps four points apart in the sweep's
    console table (a fit_rows column), in speedups (two pairs, none across fit_rows) and in
    compare (four joined, not two)."""
    from hstu_exp.report.aggregate import block_speedups, load_sweep

    sweep = tmp_path / "fit"
    proc = hstu_exp(
        "-m",
        "model=tiny",
        "logger=none",
        "cache=none,paged",
        "graph.fit_rows=true,false",
        "workload.batch_size=1",
        "workload.total_history=64",
        "workload.new_history=64",
        *FAST,
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["status"])
    table = [line.split() for line in lines[header : header + 5]]
    col = table[0].index("graph.fit_rows")
    rows = {(row[table[0].index("cache")], row[col].lower()) for row in table[1:]}
    assert rows == {(c, f) for c in ("none", "paged") for f in ("true", "false")}, lines
    df = load_sweep(sweep)
    assert len(df) == 4 and all(isinstance(c, dict) for c in df["config"])
    sp = block_speedups(df)
    assert len(sp) == 2
    for _, r in sp.iterrows():  # each pair within one fit_rows value
        base = df[(df["cache"] == "none") & (df["median_ms"] == r["baseline_median_ms"])]
        assert base["config"].iloc[0]["graph"]["fit_rows"] == r["config"]["graph"]["fit_rows"]
    assert compare_main([str(sweep), str(sweep), "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert "4 points joined" in out and "fit_rows" in out.splitlines()[1], out


def test_gate_says_when_flagged_points_ran_on_another_gpu(two_sweeps, tmp_path, capsys):
    """A sweep on all GPUs of a host puts a point on whichever card is free: a slower point on
    another card is not called a regression without saying so."""

    def on(uuid):
        return lambda r: {**r, "gpu_uuid": uuid, "gpu_index": int(uuid[-1])}

    a = edited_copy(two_sweeps[0], tmp_path / "a", lambda r: on("GPU-0")(steady(r)))
    moved = edited_copy(a, tmp_path / "moved", lambda r: slower(1.2)(on("GPU-1")(r)))
    stayed = edited_copy(a, tmp_path / "stayed", slower(1.2))
    assert compare_main([str(a), str(moved), "--fail-above", "1.05", "--no-figure"]) == 1
    err = capsys.readouterr().err
    assert (
        "REGRESSION: 4 point(s)" in err
        and "; 4 of them ran on another GPU in B than in A "
        "(cards of one kind differ: rerun both on one card"
        in err
    ), err
    assert (
        compare_main([str(a), str(moved), "--fail-above", "1.05", "--gate", "geomean", "--no-figure"])
        == 1
    )
    assert "1.200 (point estimate); 4 of the points ran on another GPU" in capsys.readouterr().err
    assert compare_main([str(a), str(stayed), "--fail-above", "1.05", "--no-figure"]) == 1
    err = capsys.readouterr().err
    assert "REGRESSION: 4 point(s)" in err and "another GPU" not in err, err


def test_e2e_points_compare_by_pass_totals_with_the_spread_between_repeats(tmp_path, capsys):
    """e2e with 3 repeats a point: B/A of the median pass total, its within-run interval, and the
    lowest and highest repeat-pair ratio; a repeat 30 % off is flagged DISAGREE."""
    import numpy as np

    rng = np.random.default_rng(5)

    def rec(mode, passes):
        units = [(p * (1 + 0.01 * rng.standard_normal(10))).tolist() for p in passes]
        batches = [[t * w / 10 for w in (1, 2, 3, 4)] for t in units[0]]
        return {
            "status": "ok",
            "workload": "e2e",
            "model": "seed",
            "mode": mode,
            "batch_size": 2,
            "cache": "none",
            "graph": "none",
            "kernel": "triton",
            "num_candidates": 256,
            "device": "cuda",
            "num_batches": 4,
            "samples_ms": [b for p in batches for b in p],
            "median_ms": float(np.median(batches)),
            "total_ms": float(np.median(units[1])),
            "repeat_units_ms": units,
            "repeats": 3,
            "valid": True,
            "overrides": [f"workload.mode={mode}"],
            "config_key": mode,
        }

    def sweep(name, passes):
        path = tmp_path / name / "results.jsonl"
        path.parent.mkdir()
        path.write_text(json.dumps(rec("cache_graph", passes)) + "\n")
        return path.parent

    a = sweep("a", (20, 20.2, 19.9))
    b = sweep("b", (21, 26, 20.9))
    assert compare_main([str(a), str(b), "--no-figure", "--csv", str(tmp_path / "j.csv")]) == 0
    out = capsys.readouterr().out
    assert "B/A between repeats" in out and "DISAGREE" in out and "pass B/A" in out
    j = pd.read_csv(tmp_path / "j.csv").iloc[0]
    assert j["ratio_of"] == "pass total" and j["repeats"] == 3
    assert j["spread_low"] < 1.06 < 1.25 < j["spread_high"]


def test_regression_line_says_when_flagged_points_are_invalid(two_sweeps, tmp_path):
    """A point invalid in A or B (its CV above the gate) is noise: the REGRESSION line, through
    the script a user runs, says how many of the flagged points are invalid (029de16 did not)."""
    a = edited_copy(two_sweeps[0], tmp_path / "a", lambda r: {**steady(r), "valid": True})
    noisy = edited_copy(a, tmp_path / "noisy", lambda r: {**slower(1.2)(r), "valid": False})
    proc = run_script(a, noisy, "--fail-above", "1.05", "--no-figure")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION: 4 point(s)" in proc.stderr
    assert "; 4 of them invalid in A or B (noise, not a verdict)" in proc.stderr, proc.stderr
