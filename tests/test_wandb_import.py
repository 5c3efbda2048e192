"""hstu-exp-wandb on recorded sweeps (published GPU records, copied): what the W&B run files hold,
read back from disk. Items of issue 21 (W&B and figures) and issue 22 (the importer's faults)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, offline_runs, read_run

PUBLISHED = ROOT / "outputs" / "published"


def wandb_import(*args):
    return subprocess.run(
        [sys.executable, "-m", "hstu_exp.wandb_import", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**__import__("os").environ, "WANDB_BASE_URL": "http://127.0.0.1:9"},
    )


def subset(src: Path, dst: Path, keep) -> Path:
    """A sweep dir holding the records of `src` that keep(record) selects."""
    from hstu_exp.report.aggregate import load_sweep

    df = load_sweep(src)
    rows = [r for r in df.to_dict("records") if keep(r)]
    dst.mkdir(parents=True)
    (dst / "results.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if v == v}, default=str) + "\n" for r in rows)
    )
    return dst


def summary_of(root: Path):
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    return run_dir, read_run(run_dir)


def test_e2e_import_has_its_speedups_provenance_and_one_copy_per_id(tmp_path):
    sweep = tmp_path / "seed_e2e_h200"
    shutil.copytree(
        PUBLISHED / "seed_e2e_h200", sweep, ignore=shutil.ignore_patterns("wandb-import", "figures")
    )
    proc = wandb_import(sweep)
    assert proc.returncode == 0, proc.stderr
    root = sweep / "wandb-import"
    run_dir, summary = summary_of(root)
    speedups = [k for k in summary["summary"] if k.startswith("speedup/")]
    assert len(speedups) == 12  # the swallowed KeyError gave 0
    (table,) = (run_dir / "files" / "media" / "table" / "charts").glob("speedup_vs_batch_table*")
    data = json.loads(table.read_text())
    series = {row[0] for row in data["data"]}
    assert "e2e cache_graph vs baseline (95% low)" in series and len(data["data"]) == 3 * 12
    # provenance of the record, not of the importing machine
    first = json.loads((sweep / "results.jsonl").read_text().splitlines()[0])
    point = read_run(next(d for d in root.glob("*/wandb/offline-run-*")))
    assert point["git_commit"] == first["git_sha"] and point["host"] == first["hostname"]
    assert "environment" not in point  # no importer's program, host or gpu_count 0
    env = point["config"]["env"]
    assert isinstance(env["power_w"], float) and isinstance(env["cpu_cores"], int)
    # re-import and --group: the same ids, one local copy each; sync takes latest-run
    before = offline_runs(root)
    proc = wandb_import(sweep, "--group", "renamed")
    assert proc.returncode == 0, proc.stderr
    after = offline_runs(root)
    assert set(after) == set(before) and all(len(d) == 1 for d in after.values())
    assert f"wandb sync {root}/*/wandb/latest-run {root}/wandb/latest-run" in proc.stdout
    assert read_run(after[summary["id"]][0])["group"] == "renamed"


def test_sweep_dir_with_spaces_and_accents_gets_its_summary_and_quoted_commands(tmp_path):
    sweep = subset(
        PUBLISHED / "seed_e2e_h200",
        tmp_path / "my sweeps" / "été ü",
        lambda r: r["batch_size"] == 1 and r["mode"] in ("baseline", "cache_graph"),
    )
    proc = wandb_import(sweep)
    assert proc.returncode == 0, proc.stderr
    _, summary = summary_of(sweep / "wandb-import")
    (results,) = [a for a in summary["artifacts"] if a["type"] == "benchmark-results"]
    assert results["name"] == "results--t---"  # 'été ü': W&B allows ASCII letters only
    assert results["files"] == ["results.jsonl"]  # the sweep's own file, not the import dir's
    assert len([k for k in summary["summary"] if k.startswith("speedup/")]) == 1
    assert f"'{sweep}/wandb-import'/*/wandb/latest-run" in proc.stdout


def test_a_dir_of_several_sweeps_is_refused(tmp_path):
    for name in ("seed_e2e_h200", "serve_slo_h200"):
        shutil.copytree(
            PUBLISHED / name,
            tmp_path / "all" / name,
            ignore=shutil.ignore_patterns("wandb-import", "figures"),
        )
    proc = wandb_import(tmp_path / "all")
    assert proc.returncode == 2 and "holds 2 sweeps" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "all" / "wandb-import").exists()


def test_torn_lines_are_passed_over_and_said(tmp_path):
    """A sweep killed mid-write leaves a torn last line: the import goes on and says so, as
    plot_sweep and hstu-exp-compare do (029de16 imported it without a word)."""
    sweep = subset(
        PUBLISHED / "seed_e2e_h200",
        tmp_path / "torn",
        lambda r: r["batch_size"] == 1 and r["mode"] == "baseline",
    )
    with (sweep / "results.jsonl").open("a") as f:
        f.write('{"status": "ok", "median_ms": 1.')
    proc = wandb_import(sweep)
    assert proc.returncode == 0, proc.stderr
    assert f"[hstu-exp] {sweep}: passed over 1 torn line" in proc.stdout, proc.stdout
    assert "1 point run" in proc.stdout, proc.stdout


def test_latency_vs_t_chart_has_one_value_per_mode_and_t_with_validity(tmp_path):
    """The native line chart's table: each mode at its fewest new tokens, one row per T (it
    zig-zagged over every n before), with a valid column."""
    sweep = subset(
        PUBLISHED / "seed_block_triton_cudagraph_h200",
        tmp_path / "block",
        lambda r: r["status"] == "ok" and r["batch_size"] == 1 and r["total_history"] in (256, 1024),
    )
    proc = wandb_import(sweep)
    assert proc.returncode == 0, proc.stderr
    run_dir, _ = summary_of(sweep / "wandb-import")
    (table,) = (run_dir / "files" / "media" / "table" / "charts").glob("latency_vs_T_B1_table*")
    data = json.loads(table.read_text())
    assert "valid" in data["columns"]
    label, t, n = (data["columns"].index(c) for c in ("label", "total_history", "new_history"))
    keys = [(row[label], row[t]) for row in data["data"]]
    assert len(keys) == len(set(keys)) > 2
    for row in data["data"]:
        if row[label].startswith("paged"):
            assert row[n] < row[t]


def test_serve_runs_are_named_by_what_they_ran_and_knobs_are_config(tmp_path):
    sweep = subset(PUBLISHED / "serve_slo_h200", tmp_path / "serve", lambda r: r["cache"] == "paged")
    proc = wandb_import(sweep)
    assert proc.returncode == 0, proc.stderr
    runs = [read_run(d[0]) for d in offline_runs(sweep / "wandb-import").values()]
    points = [r for r in runs if r["job_type"] == "serve"]
    assert points and all("qpsNone" not in r["name"] and "max_qps" in r["name"] for r in points)
    for r in points:
        assert "policy" in r["config"]["workload"] and "workload/policy" not in r["summary"]
    _, summary = summary_of(sweep / "wandb-import")
    charts = {
        k: v["panel_config"] for k, v in summary["config"].items() if k.startswith("_wandb/visualize/")
    }
    serve_charts = [c for k, c in charts.items() if "serve_" in k]
    assert serve_charts and all("clock: simulated" in json.dumps(c) for c in serve_charts)


def test_run_ids_differ_by_commit_and_gpu_and_not_by_display_group(tmp_path):
    from hstu_exp.tracking.wandb_sink import point_spec

    rec = {
        "status": "ok",
        "config_key": "k",
        "workload": "block",
        "model": "tiny",
        "batch_size": 1,
        "git_sha": "aaa",
        "gpu_uuid": "GPU-1",
        "median_ms": 1.0,
    }

    def rid(r, group="nightly"):
        return point_spec(
            r, logger={}, job_dir=tmp_path, group=group, cfg=None, data_dir=tmp_path, id_group="nightly"
        )["init"]["id"]

    same = rid(rec)
    assert rid(dict(rec)) == same and rid(rec, group="renamed") == same
    assert rid({**rec, "git_sha": "bbb"}) != same and rid({**rec, "gpu_uuid": "GPU-2"}) != same
