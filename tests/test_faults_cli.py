"""Faults at the command line, injected through the real CLI: each case gets one line naming the
key or path, a non-zero exit, no traceback, and nothing already written is lost."""

import json

import pytest
from helpers import FAST, hstu_exp, tmpfs

QUIET = [*FAST, "logger=none"]


def one_line_error(proc, code=2):
    """The process failed with `code`, said one `hstu-exp: error:` line and no traceback."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hstu-exp: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_experiment_grid_without_multirun_runs_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = hstu_exp("experiment=quick", *QUIET, f"hydra.run.dir={run_dir}")
    line = one_line_error(proc)
    assert "experiment=quick" in line and "24 points" in line and "-m" in line
    assert not run_dir.exists()


def test_experiment_with_every_swept_key_set_is_one_point(tmp_path):
    run_dir = tmp_path / "run"
    proc = hstu_exp(
        "experiment=quick",
        "cache=paged",
        "workload.batch_size=1",
        "workload.total_history=128",
        "workload.new_history=32",
        *QUIET,
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert (record["status"], record["total_history"], record["new_history"]) == ("ok", 128, 32)


@pytest.mark.parametrize("prefix", ["+", "++"])
def test_added_unknown_key_is_refused(tmp_path, prefix):
    run_dir = tmp_path / "run"
    proc = hstu_exp(f"{prefix}workload.batch_sise=8", *QUIET, f"hydra.run.dir={run_dir}")
    assert one_line_error(proc) == "hstu-exp: error: workload.batch_sise: unknown key"
    assert not run_dir.exists()


def test_forced_known_key_still_works(tmp_path):
    run_dir = tmp_path / "run"
    proc = hstu_exp("++workload.batch_size=1", *QUIET, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "results.jsonl").read_text())["batch_size"] == 1


def test_sweep_into_a_used_sweep_dir_needs_resume(tmp_path):
    grid = ["-m", "model=tiny", "workload.batch_size=1,2", *QUIET, f"hydra.sweep.dir={tmp_path}"]
    assert hstu_exp(*grid).returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("results.*")}
    line = one_line_error(hstu_exp(*grid))
    assert f"hydra.sweep.dir={tmp_path}" in line and "resume=true" in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("results.*")} == before  # nothing mixed
    assert hstu_exp(*grid, "resume=true").returncode == 0


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_output_dir_under_a_file(tmp_path, multirun):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    proc = hstu_exp(*(["-m"] if multirun else []), *QUIET, f"{key}={blocker}/out")
    line = one_line_error(proc)
    assert f"{key}={blocker}/out" in line and "not a directory" in line
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_output_dir_that_is_an_existing_file(tmp_path, multirun):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    line = one_line_error(hstu_exp(*(["-m"] if multirun else []), *QUIET, f"{key}={blocker}"))
    assert str(blocker) in line and "not a directory" in line
    assert blocker.read_text() == "keep me"


def test_output_dir_in_proc():
    line = one_line_error(hstu_exp("-m", *QUIET, "hydra.sweep.dir=/proc/hstu-exp-x"))
    assert "hydra.sweep.dir=/proc/hstu-exp-x" in line and "cannot write" in line


@pytest.fixture
def read_only_dir(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        yield ro


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_output_dir_on_a_read_only_mount(read_only_dir, multirun):
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    line = one_line_error(hstu_exp(*(["-m"] if multirun else []), *QUIET, f"{key}={read_only_dir}/out"))
    assert f"{key}={read_only_dir}/out" in line and "Read-only file system" in line


def test_unwritable_record_stops_the_sweep_and_closes_out_the_rest(tmp_path):
    # A directory stands where point 1's results.jsonl must go: its record cannot be written.
    (tmp_path / "1" / "results.jsonl").mkdir(parents=True)
    proc = hstu_exp(
        "-m",
        "model=tiny",
        "workload.batch_size=1,2",
        "workload.total_history=128,256",
        "workload.new_history=128",
        *QUIET,
        f"hydra.sweep.dir={tmp_path}",
    )
    line = one_line_error(proc, code=1)
    assert "results.jsonl" in line and "the sweep stopped" in line
    assert "[3/4]" not in proc.stdout  # no point ran after the one that could not be recorded
    records = [json.loads(x) for x in (tmp_path / "0" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"]
    csv = (tmp_path / "results.csv").read_text().splitlines()  # the close-out covers point 0
    assert len(csv) == 2, csv


def test_console_is_quiet_and_each_job_log_holds_its_lines(tmp_path):
    proc = hstu_exp(
        "-m",
        "workload=e2e",
        "model=tiny",
        "workload.mode=baseline",
        "workload.batch_size=1,2,4",
        "workload.num_batches=2",
        *QUIET,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for noise in ("Successfully loaded", "[HYDRA]", "Launching", "fontManager", "is_fx_tracing"):
        assert noise not in console, noise
    for k in range(3):
        log = (tmp_path / str(k) / "cli.log").read_text()
        assert f"[{k + 1}/3] " in log and ": running" in log and ": ok median" in log
    # No ETA before two points after the first (it carries the one-off costs) gave a pace, and
    # none on the last point: a 3-point sweep shows none.
    done = [line for line in proc.stdout.splitlines() if ": ok median" in line]
    assert len(done) == 3 and not any("ETA" in line for line in done), done
