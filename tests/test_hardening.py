"""Hardening round two (issue 22, docs/hardening.md): what a careless or hurried user types, and
what a full disk, a killed process or a second copy at once do, each through the real CLI. Every
test here failed on 029de16 (docs/hardening.md says how)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, ROOT, hstu_exp, tmpfs

QUIET = [*FAST, "logger=none"]


def one_line(proc, needle, status=2):
    """Exit `status`, one line `hstu-exp: error: ...` holding `needle`, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == status, out[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hstu-exp: error: "), proc.stderr[-3000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in out


# (id, arguments, what the one line says). Each was accepted on 029de16 (a failed point with a
# raw Python error, a record with nan in it, or a run for hours) or refused without the key.
REFUSED = [
    ("serve-qps-inf", ["workload=serve", "workload.qps=inf"], "workload.qps=inf: must be a finite"),
    ("serve-qps-nan", ["workload=serve", "workload.qps=nan"], "workload.qps=nan: must be a finite"),
    (
        "serve-duration-inf",
        ["workload=serve", "workload.duration_s=inf"],
        "workload.duration_s=inf: must be a finite",
    ),
    (
        "serve-warmup-nan",
        ["workload=serve", "workload.warmup_s=nan"],
        "workload.warmup_s=nan: must be a finite",
    ),
    (
        "serve-skew-nan",
        ["workload=serve", "workload.user_skew=nan"],
        "workload.user_skew=nan: must be a finite",
    ),
    (
        "serve-wait-inf",
        ["workload=serve", "workload.max_wait_ms=inf"],
        "workload.max_wait_ms=inf: must be a finite",
    ),
    ("serve-slo-nan", ["workload=serve", "workload.slo_ms=nan"], "workload.slo_ms=nan: must be a"),
    (
        "serve-qps-1e6",
        ["workload=serve", "workload.clock=simulated", "workload.qps=1e6"],
        "workload.qps=1e+06: 2.5e+06 requests in warmup_s + duration_s = 2.5 s, more than the 200000",
    ),
    (
        "serve-real-qps-1e6",
        ["workload=serve", "workload.qps=1e6"],
        "workload.qps=1e+06: 6.05e+07 requests in warmup_s + min_duration_s = 60.5 s, more than "
        "the 2000000",
    ),
    (
        "serve-users-1e9",
        ["workload=serve", "workload.num_users=1000000000"],
        "workload.num_users=1000000000: at most 10000000 (the population alone would take 24.0 GB)",
    ),
    ("max-time-nan", ["workload.max_time_s=nan"], "workload.max_time_s=nan: must be a finite"),
    ("cv-max-nan", ["workload.cv_max=nan"], "workload.cv_max=nan: must be a finite"),
    ("min-time-inf", ["workload.min_time_s=inf"], "workload.min_time_s=inf: must be a finite"),
    ("min-time-nan", ["workload.min_time_s=nan"], "workload.min_time_s=nan: must be a finite"),
    ("timeout-nan", ["logger.timeout_s=nan"], "logger.timeout_s=nan: must be a finite"),
    ("timeout-inf", ["logger.timeout_s=inf"], "logger.timeout_s=inf: must be a finite"),
    ("seed-negative", ["seed=-1"], "seed=-1: must be in [0, 9223372036854775807]"),
    ("seed-huge", ["seed=99999999999999999999"], "seed=99999999999999999999: must be in [0, "),
    (
        "name-with-slash",
        ["-m", "name=a/b", "workload.batch_size=1,2"],
        "name=a/b: names a dir: must be a non-empty name without '/'",
    ),
    ("name-empty", ["name="], "name=: names a dir"),
    ("resume-single-run", ["resume=true"], "resume=true: continues a sweep: add -m"),
    (
        "resume-without-dir",
        ["-m", "resume=true", "workload.batch_size=1,2"],
        "resume=true: name the sweep to continue with hydra.sweep.dir",
    ),
    (
        "duplicate-value",
        ["-m", "workload.batch_size=1,1"],
        "workload.batch_size=1: given twice (the same point would run twice)",
    ),
    (
        "empty-range",
        ["-m", "workload.batch_size=range(1,1)"],
        "workload.batch_size: the sweep gives it no values",
    ),
    ("pool-pages-huge", ["cache.num_pages=1000000000"], "cache.num_pages=1000000000: the KV pool"),
    ("layers-too-many", ["model.num_layers=100000"], "the KV pool takes"),
    (
        "serve-duration-huge",
        ["workload=serve", "workload.clock=simulated", "workload.duration_s=1e9"],
        "workload.qps=20: 2e+10 requests in warmup_s + duration_s",
    ),
    (
        "serve-warmup-huge",
        ["workload=serve", "workload.clock=simulated", "workload.warmup_s=1e9"],
        "workload.qps=20: 2e+10 requests in warmup_s + duration_s",
    ),
    (
        "cfg-float-int",
        ["--cfg", "job", "workload.min_samples=1.5"],
        "workload.min_samples: Value '1.5' of type 'float' could not be converted to Integer",
    ),
    ("empty-run-dir", ["hydra.run.dir="], "hydra.run.dir=: empty"),
    (
        "plus-experiment",
        ["+experiment=quick"],
        "+experiment: experiment is already in the defaults: write experiment=<option> (no +)",
    ),
    (
        "same-subdir",
        ["-m", "seed=0,1", "hydra.sweep.subdir=x"],
        "hydra.sweep.subdir=x: every point would write into the same job dir",
    ),
    (
        "absolute-subdir",
        ["-m", "seed=0", "hydra.sweep.subdir=/tmp/elsewhere"],
        "hydra.sweep.subdir=/tmp/elsewhere: a dir inside the sweep dir",
    ),
    (
        "empty-sweep-dir",
        ["-m", "workload.batch_size=1,2", "hydra.sweep.dir="],
        "hydra.sweep.dir=: empty",
    ),
    ("graph-bucket-zero", ["graph.token_buckets=[0,128]"], "graph.token_buckets=0: must be positive"),
    ("head-widths-zero", ["model.head_widths=[128,0,1]"], "model.head_widths=0: must be positive"),
    ("context-vocab-zero", ["model.context_vocab=0"], "model.context_vocab=0: must be positive"),
    (
        "pool-too-big",
        ["model.max_batch=100000000"],
        "model.max_batch=100000000 x model.max_history=512: the KV pool takes",
    ),
    (
        "weights-too-big",
        ["model.hidden=100000000"],
        "model.hidden=100000000, model.num_layers=2: the layers' weights take",
    ),
    (
        "history-too-big",
        ["workload.total_history=100000000", "model.max_history=100000000"],
        "the KV pool takes",
    ),
    (
        "schema-option",
        ["cache=cache_schema"],
        "cache=cache_schema: no such option (available: none, paged, paged_offload)",
    ),
    ("schema-option-model", ["model=model_schema"], "model=model_schema: no such option"),
    (
        "schema-option-swept",
        ["-m", "workload=block,block_schema"],
        "workload=block_schema: no such option",
    ),
    ("unclosed-list", ["logger.tags=[a,b"], "logger.tags=[a,b: Hydra cannot read this value"),
    (
        "tilde-dir",
        ["-m", "workload.batch_size=1,2", "hydra.sweep.dir=~/x"],
        "hydra.sweep.dir=~/x: the shell did not expand ~ here",
    ),
    (
        "spaces-dir",
        ["-m", "workload.batch_size=1,2", "hydra.sweep.dir=/tmp/my sweeps/été"],
        "hydra.sweep.dir=/tmp/my sweeps/été: spaces and non-ASCII letters need quotes",
    ),
    ("cfg-typo", ["--cfg", "job", "workload.batch_sise=2"], "workload.batch_sise: unknown key"),
    (
        "cfg-bad-value",
        ["--cfg", "job", "workload.qps=nan", "workload=serve"],
        "workload.qps=nan: must be a finite",
    ),
    ("multirun-cfg", ["-m", "--cfg", "job"], "--cfg prints the config of one run: drop -m"),
]


def leading_flags(args) -> list:
    """The flags that open a command line (`-m`, `--cfg job`): Hydra's parser wants them
    before the overrides."""
    n = 0
    while n < len(args) and args[n].startswith("-"):
        n += 2 if args[n] == "--cfg" else 1
    return args[:n]


@pytest.mark.parametrize("args,needle", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_in_one_line_before_anything_is_written(tmp_path, args, needle):
    run_dir = (
        [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={tmp_path}/run"]
    )
    proc = hstu_exp(
        *leading_flags(args), *QUIET, *run_dir, *args[len(leading_flags(args)) :], cwd=tmp_path
    )
    one_line(proc, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_slurm_launcher_without_slurm_is_one_line(tmp_path):
    bare = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "sbatch").exists())
    proc = hstu_exp(
        "-m",
        "hydra/launcher=slurm",
        "workload.batch_size=1,2",
        *QUIET,
        f"hydra.sweep.dir={tmp_path}/s",
        env={"PATH": bare},
    )
    one_line(proc, "hydra/launcher=slurm: no Slurm on this machine (sbatch is not on PATH)")
    assert not (tmp_path / "s").exists()


def user_configs(tmp_path):
    """A user's own group files beside the shipped ones (hydra.searchpath)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "broken.yaml").write_text(
        "defaults:\n  - model_schema\nname: broken\nnum_layers: [1, 2\nhidden: 64\n"
    )
    (tmp_path / "model" / "typo.yaml").write_text("name: typo\nnum_layrs: 2\n")
    return f"hydra.searchpath=[file://{tmp_path}]"


def test_yaml_error_names_file_and_line(tmp_path):
    proc = hstu_exp("model=broken", user_configs(tmp_path), *QUIET, cwd=tmp_path)
    one_line(proc, f"{tmp_path}/model/broken.yaml, line 5: expected ',' or ']', but got ':'")


def test_unknown_key_in_a_group_file_keeps_its_reason(tmp_path):
    proc = hstu_exp("model=typo", user_configs(tmp_path), *QUIET, cwd=tmp_path)
    one_line(proc, "In 'model/typo': model.num_layrs: unknown key")


@pytest.mark.parametrize("args", [["--help"], ["model=tiny", "-h"]])
def test_help_is_hstu_exps_own(args):
    proc = hstu_exp(*args)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("hstu-exp: GPU inference experiments for HSTU")
    for needle in (
        "-m",
        "quick, seed_attention",
        "serve_smoke",
        "outputs/multirun/",
        "results.csv",
        "cache:      none, paged, paged_offload",
        "hydra.sweep.dir=DIR",
    ):
        assert needle in text, needle
    assert "_schema" not in text and "powered by Hydra" not in text


def test_version_is_hstu_exps():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = hstu_exp("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"hstu-exp {version}"
    assert "Hydra" not in proc.stdout


def test_sweeps_started_in_the_same_second_get_their_own_dirs(tmp_path):
    """Two sweeps started at once into the default dir (named by the second): each gets a dir of
    its own, holding only its points."""
    cmd = [sys.executable, "-m", "hstu_exp", "-m", *QUIET]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [*cmd, f"workload.batch_size={b}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for b in ("1,2", "4,8")
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(dirs) == 2, dirs
    batches = sorted(
        sorted(
            json.loads(line)["batch_size"]
            for f in d.glob("*/results.jsonl")
            for line in f.read_text().splitlines()
        )
        for d in dirs
    )
    assert batches == [[1, 2], [4, 8]]


def test_second_sweep_into_a_running_sweeps_dir_is_refused(tmp_path):
    sweep = tmp_path / "s"
    # one point of at least 3 s after the lock is taken: the second sweep comes within it
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hstu_exp",
            "-m",
            "workload.batch_size=1",
            *QUIET,
            "workload.min_time_s=3",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (
            (sweep / ".hstu-exp.lock").is_file() and (sweep / ".hstu-exp.lock").read_text().strip()
        ):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        proc = hstu_exp(
            "-m", "workload.batch_size=1,2", *QUIET, "resume=true", f"hydra.sweep.dir={sweep}"
        )
        one_line(
            proc, f"hydra.sweep.dir={sweep}: another hstu-exp sweep (pid {first.pid}) is writing into it"
        )
    finally:
        out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out[-3000:]
    assert len((sweep / "0" / "results.jsonl").read_text().splitlines()) == 1


def test_resume_of_an_older_schema_is_refused(tmp_path):
    (tmp_path / "0").mkdir()
    old = {"status": "ok", "name": "block-tiny", "config_key": "abc", "median_ms": 1.0}
    (tmp_path / "0" / "results.jsonl").write_text(json.dumps(old) + "\n")
    proc = hstu_exp(
        "-m", "workload.batch_size=1,2", *QUIET, "resume=true", f"hydra.sweep.dir={tmp_path}"
    )
    from hstu_exp.runner import SCHEMA_VERSION

    one_line(
        proc,
        f"recorded with record schema 1, this hstu-exp writes schema {SCHEMA_VERSION}; "
        "resume=true cannot tell its points apart",
    )
    assert (tmp_path / "0" / "results.jsonl").read_text() == json.dumps(old) + "\n"
    assert not (tmp_path / "1").exists()


def test_a_disk_full_from_the_start_is_one_line(tmp_path):
    with tmpfs(tmp_path / "full", "size=256k") as mount:
        try:
            with open(mount / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:  # full (the close's flush says so again)
            pass
        for args in (
            ["-m", "workload.batch_size=1,2", f"hydra.sweep.dir={mount}/s"],
            [f"hydra.run.dir={mount}/r"],
        ):
            proc = hstu_exp(*args, *QUIET)
            one_line(proc, "No space left on device")
        assert sorted(p.name for p in mount.iterdir()) == ["filler"]


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    """SIGINT half a second or four seconds in: while torch loads or while 5001 values are
    checked. One line, exit 130, nothing run."""
    for delay in (0.5, 4.0):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hstu_exp",
                "-m",
                "seed=range(0,5000)",
                *QUIET,
                f"hydra.sweep.dir={tmp_path}/s{delay}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, out + err
        assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
        assert "Traceback" not in out + err
        assert not list((tmp_path / f"s{delay}").glob("*/results.jsonl"))


def test_large_sweep_checks_fast_and_says_so_first(tmp_path):
    """301 values are checked in seconds (029de16: a composition each, about 50 s), with a line
    before the checks; here the sweep is then refused, so the time is the checks'."""
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.jsonl").write_text('{"status": "skipped", "schema_version": 2}\n')
    t0 = time.perf_counter()
    proc = hstu_exp("-m", "seed=range(0,300)", *QUIET, f"hydra.sweep.dir={tmp_path}")
    elapsed = time.perf_counter() - t0
    one_line(proc, "holds the records of an earlier sweep")
    assert proc.stdout.startswith("[hstu-exp] 300 points: checking 301 values")
    assert elapsed < 40, elapsed


def test_unwritable_cache_costs_a_calibration_not_the_point(tmp_path):
    """HOME below a regular file: nothing can be made there, even as root."""
    (tmp_path / "file").write_text("")
    env = {"HOME": str(tmp_path / "file" / "home"), "HSTU_EXP_CACHE_DIR": "", "XDG_CACHE_HOME": ""}
    proc = hstu_exp(*QUIET, f"hydra.run.dir={tmp_path}/run", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text())
    assert record["status"] == "ok" and record["peak_tflops"] > 0
    if "not cached (" in proc.stdout:  # an idle machine tried to cache it, and said why not
        assert "set HSTU_EXP_CACHE_DIR to a writable dir, or calibrate=false" in proc.stdout


def test_xdg_cache_home_is_honoured(tmp_path, monkeypatch):
    import hstu_exp.bench.roofline as roofline

    monkeypatch.setattr(roofline, "_busy", lambda: False)  # this shared machine is always busy
    monkeypatch.delenv("HSTU_EXP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    import torch

    peak = roofline.peaks(torch.device("cpu"), torch.float32)
    table = json.loads((tmp_path / "xdg" / "hstu-exp" / "calibration.json").read_text())
    (entry,) = table.values()
    assert entry["peak_tflops"] == peak["peak_tflops"] > 0 and entry["measured_at"] > 0


def test_a_calibration_under_load_is_not_cached(tmp_path, monkeypatch):
    import torch

    import hstu_exp.bench.roofline as roofline

    monkeypatch.setenv("HSTU_EXP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(roofline, "_busy", lambda: True)
    assert roofline.peaks(torch.device("cpu"), torch.float32)["peak_gbps"] > 0
    assert not (tmp_path / "calibration.json").exists()
    # an entry past CACHE_DAYS is measured again
    monkeypatch.setattr(roofline, "_busy", lambda: False)
    key = f"{roofline.device_name(torch.device('cpu'))}|{torch.float32}"
    stale = {key: {"peak_tflops": 1e-9, "peak_gbps": 1e-9, "measured_at": 0}}
    (tmp_path / "calibration.json").write_text(json.dumps(stale))
    assert roofline.peaks(torch.device("cpu"), torch.float32)["peak_tflops"] > 1e-9


def test_single_run_says_where_its_record_is_and_counts_one_point(tmp_path):
    proc = hstu_exp(*QUIET, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[hstu-exp] record: {tmp_path}/run/results.jsonl" in proc.stdout
    assert "1 point: 1 ok" in proc.stdout and "1 points" not in proc.stdout


GRID = ["cache=none,paged", "workload.batch_size=1,32", "workload.min_samples=50"]


@pytest.fixture(scope="module")
def small_sweep_run(tmp_path_factory):
    """Four points: cache none and paged at batch 1 (ok, and invalid: too few samples for
    min_samples=50), two impossible ones at batch 32 (skipped)."""
    sweep = tmp_path_factory.mktemp("sweep")
    proc = hstu_exp("-m", *GRID, *QUIET, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep, proc


@pytest.fixture
def small_sweep(small_sweep_run):
    return small_sweep_run[0]


def test_headline_speedup_between_invalid_points_is_marked(small_sweep_run):
    line = next(x for x in small_sweep_run[1].stdout.splitlines() if "paged vs none" in x)
    assert line.endswith("(INVALID: point and baseline)"), line


def test_resume_that_has_nothing_to_do_appends_nothing(small_sweep):
    before = {p: p.read_text() for p in small_sweep.glob("*/results.jsonl")}
    proc = hstu_exp("-m", *GRID, *QUIET, "resume=true", f"hydra.sweep.dir={small_sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p: p.read_text() for p in small_sweep.glob("*/results.jsonl")} == before
    assert (
        proc.stdout.count(
            "skipped again (workload.batch_size=32: more than the model's "
            "max_batch=16); its record stands"
        )
        == 2
    )


@pytest.mark.parametrize(
    "line,what",
    [
        ("[1, 2, 3]", "not an object"),
        ('{"status": "ok"}', "an ok record without a median"),
        ('{"status": "ok", "name": "x", "median_ms": "n/a"}', "text where a number goes"),
        ('{"status": "done", "median_ms": 1.0}', "an unknown status"),
    ],
)
def test_malformed_record_lines_are_passed_over_and_counted(small_sweep, tmp_path, line, what):
    import shutil

    sweep = tmp_path / "s"
    shutil.copytree(small_sweep, sweep)
    with open(sweep / "0" / "results.jsonl", "a") as f:
        f.write(line + "\n")
    if what == "not an object":  # the readers besides the close-out: plot_sweep, compare
        plot = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(sweep), "--csv"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=300,
        )
        assert plot.returncode == 0 and "Traceback" not in plot.stderr, plot.stderr[-3000:]
        assert "passed over 1 malformed record(s)" in plot.stdout + plot.stderr
        compare = subprocess.run(
            [
                sys.executable,
                "-m",
                "hstu_exp.report.compare",
                str(sweep),
                str(small_sweep),
                "--no-figure",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert compare.returncode == 0 and "Traceback" not in compare.stderr, compare.stderr[-3000:]
        assert "passed over 1 malformed record(s)" in compare.stdout + compare.stderr
    proc = hstu_exp("-m", *GRID, *QUIET, "resume=true", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, what + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "passed over 1 malformed record(s) in results.jsonl" in proc.stdout, what
    assert "4 points: 2 ok, 2 skipped, 0 failed" in proc.stdout, what
    assert len((sweep / "results.csv").read_text().splitlines()) == 5


def test_close_out_that_raises_exits_1_in_one_line(small_sweep, tmp_path):
    """A record that reads fine but breaks the table (a list where a swept key's value goes):
    the close-out stops with one line and exit 1, not Hydra's warning and exit 0."""
    import shutil

    sweep = tmp_path / "s"
    shutil.copytree(small_sweep, sweep)
    (path,) = [p for p in sweep.glob("*/results.jsonl") if '"status": "ok"' in p.read_text()][:1]
    record = json.loads(path.read_text().splitlines()[0])
    path.write_text(json.dumps({**record, "total_history": [256]}) + "\n")
    proc = hstu_exp("-m", *GRID, *QUIET, "resume=true", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith(f"hstu-exp: error: close-out: {sweep}: ") and line.endswith(
        "the points' records are on disk"
    )
    assert "UserWarning" not in proc.stderr and "Traceback" not in proc.stderr


def test_eta_reads_as_hours_and_minutes():
    from hstu_exp.runner import duration

    assert [duration(s) for s in (4, 89, 95, 3599, 3600 * 2 + 15 * 60)] == [
        "4 s",
        "89 s",
        "0:02 h",
        "1:00 h",
        "2:15 h",
    ]


def test_serve_table_tells_qps_points_apart():
    from hstu_exp.report.console import format_table

    rows = [
        {
            "status": "ok",
            "workload": "serve",
            "qps": q,
            "p99_ms": p99,
            "achieved_qps": a,
            "slo_met": met,
            "clock": "simulated",
            "median_ms": 5.0,
            "name": f"q{q}",
        }
        for q, p99, a, met in ((5, 12.0, 4.9, True), (400, 350.0, 120.0, False))
    ]
    header, one, two = format_table(rows).splitlines()[:3]
    for col in ("qps", "p99 ms", "achieved qps", "SLO", "clock"):
        assert col in header
    assert "5" in one and "met" in one and "simulated" in one
    assert "400" in two and "missed" in two and "350.000" in two


def test_single_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    cmd = [sys.executable, "-m", "hstu_exp", *QUIET]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [*cmd, f"workload.batch_size={b}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for b in (1, 2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    files = sorted((tmp_path / "outputs" / "runs").glob("*/results.jsonl"))
    assert sorted(len(f.read_text().splitlines()) for f in files) == [1, 1], files


def test_serve_sweep_table_tells_qps_points_apart(tmp_path):
    proc = hstu_exp(
        "-m",
        "experiment=serve_smoke",
        "workload.qps=40,100",  # cells of two widths; LoadGen's 50 queries take 1.25 s, 0.5 s
        "workload.min_duration_s=0.5",
        "cache=paged",
        "verify=false",
        "logger=none",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    at = next(i for i, x in enumerate(lines) if x.lstrip().startswith("status"))
    header, rows = lines[at], lines[at + 1 : at + 3]
    for col in ("p99 ms", "achieved qps", "SLO"):  # and clock once serve records carry it
        assert col in header, header
    # the plain `qps` column (right-aligned): the cells that end where its header ends
    end = next(
        m.end()
        for m in re.finditer(r"(?<!\S)qps(?!\S)", header)
        if not header[: m.start()].rstrip().endswith(("target", "achieved", "completed", "max"))
    )
    assert sorted(row[:end].split()[-1] for row in rows) == ["100", "40"], (header, rows)


def test_a_torn_calibration_cache_is_measured_again(tmp_path, monkeypatch):
    import torch

    import hstu_exp.bench.roofline as roofline

    monkeypatch.setenv("HSTU_EXP_CACHE_DIR", str(tmp_path))
    (tmp_path / "calibration.json").write_text('{"x86_64|torch.fl')
    assert roofline.peaks(torch.device("cpu"), torch.float32)["peak_tflops"] > 0


def test_headline_marks_speedups_between_invalid_points():
    import pandas as pd

    from hstu_exp.report.aggregate import format_headline, headline

    base = {
        "status": "ok",
        "workload": "block",
        "model": "tiny",
        "dtype": "float32",
        "kernel": "reference",
        "graph": "none",
        "batch_size": 1,
        "total_history": 256,
        "num_candidates": 32,
        "device": "cpu",
        "page_size": 32,
    }
    df = pd.DataFrame(
        [
            {**base, "cache": "none", "new_history": 256, "median_ms": 4.0, "valid": False},
            {**base, "cache": "paged", "new_history": 32, "median_ms": 1.0, "valid": True},
        ]
    )
    text = format_headline(headline(df))
    line = next(x for x in text.splitlines() if "4.00x" in x)
    assert line.endswith("(INVALID: baseline)"), text


def test_plot_sweep_refuses_a_dir_of_several_sweeps(tmp_path):
    """`plot_sweep.py outputs/published` merged every published sweep into one table and wrote
    figures into the parent dir (029de16: rc 0); now one line, exit 2, no figures dir."""
    import shutil

    for name in ("seed_e2e_h200", "serve_slo_h200"):
        shutil.copytree(
            ROOT / "outputs" / "published" / name,
            tmp_path / "all" / name,
            ignore=shutil.ignore_patterns("wandb-import", "figures"),
        )
    plot = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(tmp_path / "all")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert plot.returncode == 2, plot.stdout[-2000:] + plot.stderr[-2000:]
    assert plot.stderr.startswith("plot_sweep.py: error: ") and plot.stderr.count("\n") == 1
    assert "holds 2 sweeps (e2e, serve_slo); draw each sweep dir alone" in plot.stderr, plot.stderr
    assert not (tmp_path / "all" / "figures").exists()
