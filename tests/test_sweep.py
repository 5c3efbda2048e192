"""A real multirun into a temporary dir: records, CSV, figures and W&B offline runs."""

import subprocess

import matplotlib.image as mpimg
import pandas as pd
import pytest
from helpers import FAST, ROOT, failing_pool, hstu_exp

from hstu_exp.env import environment
from hstu_exp.tracking.records import SWEPT_KEYS, read_records
from hstu_exp.tracking.wandb_sink import read_offline_run


def records(root):
    """The points' records under root (the project's reader: a sweep-level copy made by the
    close-out is not counted twice)."""
    return list(read_records(root))


def assert_real_png(path):
    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.02, f"{path} looks blank"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = hstu_exp(
        "-m",
        "model=tiny",
        "workload.batch_size=1,2",
        "cache=none,paged",
        "workload.total_history=64",
        "workload.new_history=16,64",
        "verify=true",
        *FAST,
        f"hydra.sweep.dir={out}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_every_point_has_a_record(sweep):
    out, proc = sweep
    recs = records(out)
    assert len(recs) == 8
    by_status = {s: [r for r in recs if r["status"] == s] for s in ("ok", "skipped", "failed")}
    assert len(by_status["ok"]) == 6 and not by_status["failed"]
    # cache=none with new_history < total_history is no point of its own
    assert all(r["cache"] == "none" and r["new_history"] == 16 for r in by_status["skipped"])
    assert all("cache=none" in r["reason"] for r in by_status["skipped"])
    for r in by_status["ok"]:
        assert set(SWEPT_KEYS) <= set(r)
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["iterations"] == len(r["samples_ms"]) >= 3
        assert r["flops"] > 0 and 0 < r["floor_fraction"] < 5 and r["floor_ms"] > 0
        assert r["max_rel_error"] < 1e-5, r  # float32 tiny model vs fp32 full recompute
        assert r["torch"] and r["hostname"] and r["device_name"]
        assert (r["kv_pool_bytes"] > 0) == (r["cache"] == "paged")
    assert "[8/8]" in proc.stdout and "ETA" in proc.stdout


def test_csv_and_figures(sweep):
    out, proc = sweep
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 8 and set(df["status"]) == {"ok", "skipped"}
    assert "samples_ms" not in df
    for name in ("latency_vs_batch", "speedup_bars", "speedup_heatmap", "roofline_fraction"):
        assert_real_png(out / "figures" / f"{name}.png")
    assert "8 points: 6 ok, 2 skipped, 0 failed" in proc.stdout


def test_wandb_offline_runs_hold_the_records(sweep):
    out, _ = sweep
    recs = {r["job_dir"]: r for r in records(out)}
    for job_dir, rec in recs.items():
        runs = list((out / job_dir.split("/")[-1] / "wandb").glob("offline-run-*"))
        if rec["status"] == "skipped":  # on disk and in the summary run, not a run of its own
            assert not runs
            continue
        run = read_offline_run(runs[0])
        assert run["group"] == out.name
        assert run["summary"]["status"] == rec["status"]
        if rec["status"] == "ok":
            assert run["summary"]["latency/median_ms"] == pytest.approx(rec["median_ms"])
        assert f"cache:{rec['cache']}" in run["tags"]
        assert run["config"]["point"]["batch_size"] == rec["batch_size"]
    (summary_dir,) = (out / "wandb").glob("offline-run-*")
    summary = read_offline_run(summary_dir)
    assert summary["job_type"] == "summary" and summary["summary"]["points"] == 8
    assert list((summary_dir / "files" / "media" / "images").rglob("*.png"))


def test_single_run_prints_summary(tmp_path):
    proc = hstu_exp(
        "logger=none",
        "workload.total_history=64",
        "workload.new_history=8",
        *FAST,
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = records(tmp_path)
    assert rec["status"] == "ok" and rec["cached_tokens"] == 2 * 56
    assert "1 point: 1 ok, 0 skipped, 0 failed" in proc.stdout


def test_impossible_point_is_skipped_and_sweep_goes_on(tmp_path):
    # A pool of 3 pages x 32 tokens holds one 64-token user but not two.
    proc = hstu_exp(
        "-m",
        "logger=none",
        "workload.batch_size=1,2",
        "cache.num_pages=3",
        "workload.total_history=64",
        "workload.new_history=64",
        *FAST,
        f"hydra.sweep.dir={tmp_path}",
    )
    recs = sorted(records(tmp_path), key=lambda r: r["batch_size"])
    assert [r["status"] for r in recs] == ["ok", "skipped"]
    assert "cache.num_pages=3" in recs[1]["reason"]
    assert proc.returncode == 0


def test_failing_point_is_recorded_and_sweep_goes_on(tmp_path):
    """A pool past the process's address-space cap cannot be allocated: that point raises, the
    next one still runs."""
    pools, cap = failing_pool()
    proc = hstu_exp("-m", "logger=none", *pools, *FAST, f"hydra.sweep.dir={tmp_path}", address_space=cap)
    recs = {r["point"]: r for r in records(tmp_path)}
    assert recs[0]["status"] == "failed", (recs[0], proc.stderr[-2000:])
    assert "can't allocate memory" in recs[0]["error"], recs[0]["error"]
    assert recs[1]["status"] == "ok"
    assert proc.returncode == 1
    assert (tmp_path / "results.csv").exists() and "1 failed" in proc.stdout


def test_cpu_only_options_are_refused_or_skipped(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {"TRITON_INTERPRET": "0"}
    proc = hstu_exp("kernel=triton", "logger=none", f"hydra.run.dir={tmp_path}/run", env=env)
    assert proc.returncode == 2 and "kernel=triton: needs a CUDA device" in proc.stderr
    proc = hstu_exp(
        "-m", "logger=none", "graph=none,cudagraph", *FAST, f"hydra.sweep.dir={tmp_path}/sweep", env=env
    )
    recs = {r["graph"]: r for r in records(tmp_path / "sweep")}
    assert recs["none"]["status"] == "ok" and recs["cudagraph"]["status"] == "skipped"
    assert proc.returncode == 0


def test_records_name_the_commit_the_caller_gives_over_the_checkout(monkeypatch):
    # A GPU box may hold a stale .git under a newer tree: HSTU_EXP_GIT_SHA must win there.
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    try:
        monkeypatch.delenv("HSTU_EXP_GIT_SHA", raising=False)
        environment.cache_clear()
        if head:
            assert environment("cpu")["git_sha"].removesuffix("-dirty") == head
        monkeypatch.setenv("HSTU_EXP_GIT_SHA", "0123456789ab")
        environment.cache_clear()
        assert environment("cpu")["git_sha"] == "0123456789ab"
    finally:
        environment.cache_clear()
