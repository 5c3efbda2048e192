"""W&B faults through the real CLI: an online endpoint that accepts connections and never answers
must cost one bounded wait, one warning line and no record; a signal during that wait ends the
sweep at once (issue: the old sink hung forever, and ignored SIGINT/SIGTERM in the close-out)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from helpers import FAST, ROOT, hstu_exp

TIMEOUT_S = 2  # logger.timeout_s: an online run is killed after 2 * 2 + 10 = 14 s
DUMMY_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, like a real key


@contextlib.contextmanager
def silent_endpoint():
    """A loopback TCP server that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


@pytest.fixture
def online_env(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logger.mode decides here
    with silent_endpoint() as port:
        yield {
            "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
            "WANDB_API_KEY": DUMMY_KEY,
            "WANDB_SILENT": "true",
        }


def records(root):
    return [
        json.loads(line)
        for p in sorted(root.glob("*/results.jsonl"))
        for line in p.read_text().splitlines()
    ]


def wandb_warnings(text):
    return [line for line in text.splitlines() if "warning: W&B" in line]


def test_unanswering_endpoint_costs_one_bounded_wait(tmp_path, online_env):
    started = time.monotonic()
    proc = hstu_exp(
        "-m",
        "model=tiny",
        "workload.batch_size=1,2",
        "logger.mode=online",
        f"logger.timeout_s={TIMEOUT_S}",
        *FAST,
        f"hydra.sweep.dir={tmp_path}",
        env=online_env,
        timeout=150,
    )
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    recs = records(tmp_path)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), recs
    # one warning for the whole sweep: the second point and the summary run skip W&B
    (warning,) = wandb_warnings(out)
    assert "off for the rest of this sweep" in warning and "hstu-exp-wandb" in warning
    assert (tmp_path / ".wandb-disabled").is_file()
    # the close-out ran on both records
    assert len(pd.read_csv(tmp_path / "results.csv")) == 2
    assert "2 points: 2 ok" in out
    # one W&B wait (14 s) plus two tiny points; the old sink never returned
    assert elapsed < 100, elapsed


def test_signal_during_the_wandb_wait_ends_the_sweep(tmp_path, online_env):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **online_env}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hstu_exp",
            "-m",
            "model=tiny",
            "workload.batch_size=1,2",
            "logger.mode=online",
            "logger.timeout_s=60",
            *FAST,
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "0" / "results.jsonl").is_file():  # the first point is on disk,
            assert time.monotonic() < deadline and proc.poll() is None  # W&B is now waiting
            time.sleep(0.2)
        time.sleep(2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert took < 30, f"{took:.0f} s from SIGTERM to exit"
    (rec,) = records(tmp_path)
    assert rec["status"] == "ok"
    assert (tmp_path / "results.csv").is_file()  # the close-out ran, without W&B
    assert len(wandb_warnings(out)) == 1, out[-3000:]


def test_marker_turns_wandb_off_for_this_sweep_only(tmp_path, monkeypatch, capsys):
    """A Slurm job or the close-out (another process) honours the marker of its own sweep
    invocation; a later invocation (a resume) tries W&B again."""
    from hstu_exp.tracking import wandb_sink

    monkeypatch.delenv("WANDB_MODE", raising=False)
    record = {
        "status": "ok",
        "config_key": "k1",
        "workload": "block",
        "model": "tiny",
        "batch_size": 1,
        "total_history": 64,
        "new_history": 64,
        "median_ms": 1.0,
        "samples_ms": [1.0, 1.1, 0.9],
    }
    logger = {"name": "wandb", "mode": "offline", "project": "hstu-exp", "tags": []}
    (tmp_path / wandb_sink.MARKER).write_text(json.dumps({"started": "111", "reason": "x"}))
    monkeypatch.setenv("HSTU_EXP_STARTED", "111")
    assert (
        wandb_sink.log_point(
            record, logger=logger, job_dir=tmp_path / "0", group="g", cfg={}, sweep_dir=tmp_path
        )
        is None
    )
    assert not list(tmp_path.rglob("offline-run-*")) and "W&B" not in str(capsys.readouterr())
    monkeypatch.setenv("HSTU_EXP_STARTED", "222")
    run_dir = wandb_sink.log_point(
        record, logger=logger, job_dir=tmp_path / "0", group="g", cfg={}, sweep_dir=tmp_path
    )
    assert run_dir and list(tmp_path.rglob("offline-run-*"))


def test_child_writes_the_run_and_reports_its_errors(tmp_path):
    """The online path's child process, driven offline: it writes the very run the parent
    described, and a W&B error inside it comes back as one exception, not a hang."""
    from helpers import read_run

    from hstu_exp.tracking import wandb_sink

    record = {
        "status": "ok",
        "config_key": "k2",
        "workload": "block",
        "model": "tiny",
        "batch_size": 2,
        "total_history": 64,
        "new_history": 8,
        "median_ms": 2.0,
        "samples_ms": [2.0, 2.5, 1.5, 2.0],
    }
    spec = wandb_sink.point_spec(
        record,
        logger={"project": "hstu-exp", "tags": ["t"]},
        job_dir=tmp_path / "0",
        group="g",
        cfg={"seed": 0},
        data_dir=tmp_path,
    )
    spec["init"]["mode"], spec["timeout_s"] = "offline", 5
    run = read_run(wandb_sink._write_in_child(spec))
    assert run["id"] == wandb_sink.run_id("g", "k2") and "t" in run["tags"]
    assert [row["latency_ms"] for row in run["history"]] == record["samples_ms"]
    spec["init"]["id"] = "not/a valid id"
    with pytest.raises(RuntimeError, match="Run ID cannot contain"):
        wandb_sink._write_in_child(spec)


def test_an_unwritable_home_keeps_wandb_cores_log_off_the_console(tmp_path):
    """HOME below a regular file (read-only, even as root): wandb-core could not make
    ~/.cache/wandb/logs and printed its Go log lines to stderr (029de16: 24 lines); its log now
    goes under the run's W&B data dir and the console stays quiet."""
    (tmp_path / "file").write_text("")
    env = {"HOME": str(tmp_path / "file" / "home"), "XDG_CACHE_HOME": "", "WANDB_CACHE_DIR": ""}
    proc = hstu_exp("model=tiny", "logger.mode=offline", *FAST, f"hydra.run.dir={tmp_path}/run", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed to get logger path" not in proc.stderr and " INFO " not in proc.stderr, proc.stderr[
        -3000:
    ]
    (log,) = (tmp_path / "run").rglob("core-debug-*.log")
    assert log.stat().st_size > 0
