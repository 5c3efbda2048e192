"""A sweep through a real single-node Slurm (tests/slurm_cluster.py) with hydra/launcher=slurm:
every point is a job of a Slurm array on one (fake) GPU, the records land in the sweep dir, the
close-out (CSV, figures, summary W&B run) runs from them, and resume=true works in the jobs.

Skips with the reason where Slurm cannot run (not root, no packages and no apt to fetch them); with
HSTU_EXP_REQUIRE_SLURM=1 (.ci/run sets it where it can fetch the packages) it fails instead.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAST, hstu_exp
from slurm_cluster import PARTITION, LocalSlurm
from test_sweep import assert_real_png, records

from hstu_exp.report.callback import close_out
from hstu_exp.tracking.records import SWEPT_KEYS
from hstu_exp.tracking.wandb_sink import read_offline_run

# Starts a single-node Slurm and runs sweeps through it.
pytestmark = pytest.mark.slow

REQUIRED = os.environ.get("HSTU_EXP_REQUIRE_SLURM") == "1"
TIMEOUT_S = 180  # a bound on each sweep: a Slurm that never runs a job fails, it does not hang
# The preset as it is, but sized for this small node (2 CPUs, a few GB).
LAUNCHER = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=5",
    # the batch script prints the GPU Slurm gave the job
    'hydra.launcher.setup=["echo slurm-gpu=$CUDA_VISIBLE_DEVICES"]',
]
GRID = ["model=tiny", "cache=paged", "workload.total_history=64", "workload.new_history=64", *FAST]


@pytest.fixture(scope="session")
def slurm():
    reason = LocalSlurm.unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(f"HSTU_EXP_REQUIRE_SLURM=1 but no local Slurm: {reason}")
        pytest.skip(f"no local Slurm: {reason}")
    root = Path(tempfile.mkdtemp(prefix="hstu-slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001
        cluster.stop()
        if REQUIRED:
            raise
        pytest.skip(f"local Slurm did not start: {str(exc)[:500]}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def sweep_through(slurm, out, *args):
    return hstu_exp(
        "-m", *LAUNCHER, *GRID, *args, f"hydra.sweep.dir={out}", timeout=TIMEOUT_S, env=slurm.env()
    )


@pytest.fixture(scope="module")
def slurm_sweep(slurm, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_sweep")
    proc = sweep_through(slurm, out, "workload.batch_size=1,2,4", "logger=wandb")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def job_logs(out):
    return sorted((out / ".submitit").glob("*_*/*_log.out"))


def test_every_point_ran_as_a_slurm_job_and_left_its_record(slurm_sweep):
    out, proc = slurm_sweep
    recs = records(out)
    assert sorted(r["batch_size"] for r in recs) == [1, 2, 4]
    for r in recs:
        assert r["status"] == "ok", r
        assert set(SWEPT_KEYS) <= set(r)
        assert Path(r["job_dir"]) == out / str(r["point"])
        assert r["sweep"] == out.name and r["hostname"]
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    logs = job_logs(out)
    assert len(logs) == 3, logs  # one array task per point
    for log in logs:
        text = log.read_text()
        # one GPU per point, progress with the sweep's size, the result line
        assert re.search(r"^slurm-gpu=\d$", text, re.M), text
        assert re.search(r"^\[\d/3\] block-tiny-paged.*: ok median ", text, re.M), text


def test_close_out_reads_the_records_the_jobs_wrote(slurm_sweep):
    out, proc = slurm_sweep
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 3 and set(df["status"]) == {"ok"}
    assert "3 points: 3 ok, 0 skipped, 0 failed" in proc.stdout
    assert_real_png(out / "figures" / "latency_bars.png")
    # W&B offline: a run per point inside its job dir (written in the job), a summary run
    for r in records(out):
        (run_dir,) = (Path(r["job_dir"]) / "wandb").glob("offline-run-*")
        run = read_offline_run(run_dir)
        assert run["group"] == out.name and f"cache:{r['cache']}" in run["tags"]
        assert run["summary"]["latency/median_ms"] == pytest.approx(r["median_ms"])
    (summary_dir,) = (out / "wandb").glob("offline-run-*")
    assert read_offline_run(summary_dir)["summary"]["points"] == 3

    # the close-out again, from disk alone (no Hydra, no Slurm, no W&B)
    (out / "results.csv").unlink()
    shutil.rmtree(out / "figures")
    result = close_out(out)
    assert result["records"] == 3
    assert pd.read_csv(out / "results.csv")["median_ms"].tolist() == df["median_ms"].tolist()
    assert_real_png(out / "figures" / "latency_bars.png")


def test_resume_in_slurm_jobs_runs_only_the_new_point(slurm, slurm_sweep, tmp_path):
    out, _ = slurm_sweep
    sweep = tmp_path / "sweep"
    shutil.copytree(out, sweep, ignore=shutil.ignore_patterns(".submitit", "wandb", "figures"))
    for f in sweep.rglob("results.jsonl"):  # the records point at their copies
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps({**r, "job_dir": str(f.parent)}) + "\n" for r in recs))
    proc = sweep_through(slurm, sweep, "workload.batch_size=1,2,4,8", "logger=none", "resume=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = "\n".join(p.read_text() for p in job_logs(sweep))
    assert logs.count("skipped (resume=true)") == 3
    assert len(re.findall(r"^\[\d/4\] .*: running$", logs, re.M)) == 1
    df = pd.read_csv(sweep / "results.csv")
    assert sorted(df["batch_size"]) == [1, 2, 4, 8] and set(df["status"]) == {"ok"}
    assert len(records(sweep)) == 4  # nothing ran twice
