"""W&B as a dashboard, read back from the offline .wandb files with wandb's own reader: a real
multirun through the CLI (issue 10's CPU command), a resume, a failed point, the importer on
live and published sweeps, the mode notice and the dashboard script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, ROOT, failing_pool, hstu_exp, offline_runs, read_run

from hstu_exp.tracking.records import SWEPT_KEYS
from hstu_exp.tracking.wandb_sink import run_id, sweep_where

# The H200 seed_e2e records as published on 2026-11-29 (schema 1: no samples, no validity).
OLD_SCHEMA = ROOT / "tests" / "data" / "seed_e2e_h200_schema1.csv"


def records(root):
    return [
        json.loads(line)
        for p in sorted(Path(root).glob("*/results.jsonl"))
        for line in p.read_text().splitlines()
    ]


def wandb_import(*args):
    return subprocess.run(
        [sys.executable, "-m", "hstu_exp.wandb_import", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """model=tiny B 1,2 x cache none,paged x n 16,256 (T=256): 6 points run, the two cache=none
    points with n < T are skipped."""
    out = tmp_path_factory.mktemp("wb") / "s1"
    os.environ.pop("WANDB_MODE", None)
    proc = hstu_exp(
        "-m",
        "model=tiny",
        "workload.batch_size=1,2",
        "cache=none,paged",
        "workload.total_history=256",
        "workload.new_history=16,256",
        "logger.tags=[nightly,h200]",
        *FAST,
        f"hydra.sweep.dir={out}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def point_runs(out):
    return {d.parent.parent.name: read_run(d) for d in out.glob("*/wandb/offline-run-*")}


def test_point_runs_hold_what_ran_env_and_samples(sweep):
    recs = {str(r["point"]): r for r in records(sweep)}
    runs = point_runs(sweep)
    ran = {k for k, r in recs.items() if r["status"] != "skipped"}
    assert set(runs) == ran and len(ran) == 6  # skipped points are on disk, not runs
    for k, run in runs.items():
        rec = recs[k]
        cfg = run["config"]
        assert cfg["point"] == {key: rec[key] for key in SWEPT_KEYS if rec.get(key) is not None}
        assert cfg["env"]["torch"] == rec["torch"] and cfg["env"]["git_sha"] == rec["git_sha"]
        assert cfg["env"]["device_name"] == rec["device_name"]
        assert cfg["cfg"]["workload"]["batch_size"] == rec["batch_size"]
        assert f"workload.batch_size={rec['batch_size']}" in cfg["overrides"]
        assert run["id"] == run_id(sweep.name, rec["config_key"], sweep_where(rec))
        assert run["group"] == sweep.name and run["exit_code"] == 0
        assert {"nightly", "h200", f"cache:{rec['cache']}"} <= set(run["tags"])
        assert run["name"].startswith(f"B{rec['batch_size']} T256 n{rec['new_history']} ·")
        # every sample is a history step on the iteration axis, plus a histogram
        history = [(row["iteration"], row["latency_ms"]) for row in run["history"]]
        assert history == list(enumerate(rec["samples_ms"]))
        assert run["metrics"]["latency_ms"] == "iteration"
        s = run["summary"]
        assert s["latency/median_ms"] == pytest.approx(rec["median_ms"])
        assert s["latency/p90_ms"] == pytest.approx(rec["p90_ms"])
        assert s["latency/hist_ms"]["_type"] == "histogram"
        assert sum(s["latency/hist_ms"]["values"]) == len(rec["samples_ms"])
        assert s["validity/valid"] == rec["valid"] and s["status"] == "ok"
        assert not [v for v in s.values() if isinstance(v, str) and v.startswith("/")]
        assert not run["artifacts"]  # no per-point tables: nothing staged, nothing to sync


def test_summary_run_has_grid_counts_charts_and_artifact(sweep):
    (summary_dir,) = (sweep / "wandb").glob("offline-run-*")
    run = read_run(summary_dir)
    rec = json.loads(next(sweep.rglob("results.jsonl")).read_text().splitlines()[0])
    assert run["job_type"] == "summary" and run["id"] == run_id(sweep.name, "summary", sweep_where(rec))
    s, cfg = run["summary"], run["config"]
    ok = [r for r in records(sweep) if r["status"] == "ok"]
    assert (s["points"], s["ok"], s["skipped"], s["failed"]) == (8, 6, 2, 0)
    assert s["valid"] + s["invalid"] == 6
    assert s["valid"] == sum(1 for r in ok if r["valid"])
    assert cfg["grid"]["swept"]["workload.batch_size"] == ["1", "2"]
    assert cfg["env"]["git_sha"] == ok[0]["git_sha"] and cfg["model"]["hidden"] == ok[0]["hidden"]
    charts = {
        k.split("/", 2)[-1]: v["panel_config"]["panelDefId"]
        for k, v in cfg.items()
        if k.startswith("_wandb/visualize/")
    }
    # one T (256): no degenerate line over T, its table is logged instead
    assert "charts/latency_vs_T_B1" not in charts
    assert charts["charts/speedup"] == "wandb/bar/v0"
    assert not [k for k in charts if k.startswith("charts/serve_")]  # no serve points
    speedups = {k: v for k, v in s.items() if k.startswith("speedup/")}
    assert speedups and all(v["ci_low"] <= v["speedup"] <= v["ci_high"] for v in speedups.values())
    logged = {k.split("/")[0] + "/" + k.split("/")[1] for row in run["history"] for k in row if "/" in k}
    assert {
        "tables/skipped",
        "tables/results",
        "tables/latency_B1",
        "figures/latency_vs_batch",  # one T: latency against batch size, not over T
    } <= logged
    captions = [v for row in run["history"] for k, v in row.items() if k.endswith("/caption")]
    assert captions and all(sweep.name in c for c in captions)
    (art,) = [a for a in run["artifacts"] if a["type"] == "benchmark-results"]
    assert "results.csv" in art["files"]
    # W&B stages tables and artifacts inside the sweep dir (wandb sync portability)
    staged = [p for a in run["artifacts"] for p in a["local_paths"] if p]
    assert staged and all(Path(p).is_relative_to(sweep) for p in staged), staged


def test_resume_and_import_update_runs_never_duplicate(sweep):
    before = offline_runs(sweep)
    proc = hstu_exp(
        "-m",
        "model=tiny",
        "workload.batch_size=1,2",
        "cache=none,paged",
        "workload.total_history=256",
        "workload.new_history=16,256",
        "logger.tags=[nightly,h200]",
        "resume=true",
        *FAST,
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = offline_runs(sweep)
    assert set(after) == set(before) and len(after) == 7  # 6 points + 1 summary, same ids
    rec = json.loads(next(sweep.rglob("results.jsonl")).read_text().splitlines()[0])
    summary_id = run_id(sweep.name, "summary", sweep_where(rec))
    assert len(after[summary_id]) == 1  # the second close-out resumed it: one local copy
    # importing the recorded sweep gives the very same run ids
    proc = wandb_import(str(sweep))
    assert proc.returncode == 0, proc.stderr
    imported = offline_runs(sweep / "wandb-import")
    assert set(imported) == set(before)
    assert "wandb sync" in proc.stdout and "latest-run" in proc.stdout
    proc = wandb_import(str(sweep))  # again: still one local copy per id
    assert proc.returncode == 0, proc.stderr
    assert all(len(dirs) == 1 for dirs in offline_runs(sweep / "wandb-import").values())


def test_failed_point_is_a_failed_run(tmp_path):
    pools, cap = failing_pool()  # the first pool fits the machine, not the process's cap
    proc = hstu_exp("-m", *pools, *FAST, f"hydra.sweep.dir={tmp_path}", address_space=cap)
    assert proc.returncode == 1, proc.stderr[-2000:]
    recs = {str(r["point"]): r for r in records(tmp_path)}
    runs = point_runs(tmp_path)
    assert recs["0"]["status"] == "failed" and recs["1"]["status"] == "ok"
    assert runs["0"]["exit_code"] == 1 and runs["0"]["summary"]["status"] == "failed"
    assert "can't allocate memory" in runs["0"]["summary"]["error"]
    assert runs["1"]["exit_code"] == 0


def test_environment_mode_wins_with_one_notice(tmp_path):
    proc = hstu_exp(
        "workload.total_history=64",
        "workload.new_history=64",
        *FAST,
        f"hydra.run.dir={tmp_path}",
        env={"WANDB_MODE": "disabled"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    notices = [line for line in (proc.stdout + proc.stderr).splitlines() if "WANDB_MODE" in line]
    assert notices == [
        "[hstu-exp] W&B mode: WANDB_MODE=disabled from the environment wins over logger.mode=offline"
    ]
    assert not list(tmp_path.rglob("offline-run-*")) and (tmp_path / "results.jsonl").is_file()


def test_import_published_sweep_of_an_older_schema(tmp_path):
    proc = wandb_import(str(OLD_SCHEMA), "--dir", str(tmp_path), "--tags", "h200")
    assert proc.returncode == 0, proc.stderr
    runs = {r["name"]: r for r in map(read_run, tmp_path.rglob("offline-run-*"))}
    assert len(runs) == 9  # 8 points and the summary
    summary = next(r for r in runs.values() if r["job_type"] == "summary")
    assert summary["summary"]["points"] == 8
    assert summary["config"]["env"]["device_name"] == "NVIDIA H200"
    assert any(k.startswith("speedup/e2e cache_graph vs baseline") for k in summary["summary"])
    point = next(r for r in runs.values() if r["job_type"] == "e2e")
    assert point["config"]["point"]["batch_size"] in (1, 2, 4, 8)  # ints, not CSV floats
    assert "h200" in point["tags"] and not point["history"]  # the CSV has no samples


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such sweep dir or file"),
        ("", "empty CSV"),
        ("status,workload,batch_size\nok,block,1\n", "missing column(s) model, median_ms"),
    ],
)
def test_import_bad_input_is_one_line(tmp_path, content, message):
    path = tmp_path / "results.csv"
    if content is not None:
        path.write_text(content)
    proc = wandb_import(str(path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_dashboard_builds_offline():
    pytest.importorskip("wandb_workspaces")  # the optional extra `dashboard`
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/wandb_dashboard.py",
            "--entity",
            "team",
            "--project",
            "hstu-exp",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ws = json.loads(proc.stdout)
    panels = {p["type"] for s in ws["sections"] for p in s["panels"]}
    assert {
        "ScatterPlot",
        "ParallelCoordinatesPlot",
        "LinePlot",
        "MediaBrowser",
        "CustomChart",
    } <= panels
    titles = " | ".join(str(p["title"]) for s in ws["sections"] for p in s["panels"])
    assert "vs batch size, by cache mode and graph" in titles and "p99 latency" in titles
    assert ws["entity"] == "team" and len(ws["groupby"]) == 2
    proc = subprocess.run(
        [sys.executable, "scripts/wandb_dashboard.py", "--workload", "serve", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "serve" in json.loads(proc.stdout)["filters"]
    proc = subprocess.run(
        [sys.executable, "scripts/wandb_dashboard.py", "--save"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "WANDB_ENTITY"},
    )
    assert proc.returncode == 2 and "--entity" in proc.stderr


def test_run_names_lead_with_what_varies():
    from hstu_exp.tracking.wandb_sink import run_name

    common = {"model": "tiny", "cache": "paged", "kernel": "reference", "graph": "none"}
    assert (
        run_name(
            {**common, "workload": "block", "batch_size": 2, "total_history": 256, "new_history": 32.0}
        )
        == "B2 T256 n32 · paged/reference/none · block tiny"
    )
    assert run_name(
        {**common, "workload": "e2e", "mode": "cache", "batch_size": 4, "num_candidates": 32}
    ).startswith("B4 c32 · cache/paged/")
    assert run_name(
        {**common, "workload": "serve", "mode": "online-fifo", "batch_size": 8, "qps": 200.0}
    ).startswith("B8 qps200 · online-fifo/paged/")
