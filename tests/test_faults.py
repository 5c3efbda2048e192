"""Faults injected through the real CLI (a subprocess, a real sweep dir): a torn results.jsonl,
a full disk during the close-out (a real small tmpfs), a file standing where figures/ must be,
a record that cannot be written, and bad input to the report scripts."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAST, ROOT, hstu_exp, tmpfs
from test_sweep import assert_real_png

GRID = [
    "model=tiny",
    "logger=none",
    "workload.batch_size=1,2",
    "cache=none,paged",
    "workload.total_history=32",
    "workload.new_history=32",
    *FAST,
]
POINTS = 4


def script(name, *args, cwd=None):
    """A script as the README shows it: `scripts/NAME ARGS` (its shebang picks the python)."""
    return subprocess.run(
        [str(ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd or ROOT,
    )


def lines_of(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_error_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr, stderr
    hits = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert len(hits) == 1, stderr
    return hits[0]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "sweep"
    proc = hstu_exp("-m", *GRID, f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def copy_of(sweep: Path, dst: Path) -> Path:
    shutil.copytree(sweep, dst)
    return dst


def test_torn_record_is_set_aside_and_resume_counts_the_point(sweep, tmp_path):
    s = copy_of(sweep, tmp_path / "s")
    job = s / "3" / "results.jsonl"
    whole = job.read_text()
    fragment = whole[: len(whole) // 2]  # the point was killed mid-write
    job.write_text(fragment)

    proc = script("plot_sweep.py", s, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "passed over 1 torn line(s) in results.jsonl" in proc.stderr

    proc = hstu_exp("-m", *GRID, "resume=true", f"hydra.sweep.dir={s}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        len(re.findall(r"already ok in this sweep, skipped \(resume=true\)", proc.stdout)) == POINTS - 1
    )
    assert f"{POINTS} points: {POINTS} ok" in proc.stdout
    # the re-run record sits on a line of its own; the fragment is kept beside, not deleted
    (rec,) = lines_of(job)
    assert rec["status"] == "ok"
    assert (s / "3" / "results.jsonl.torn").read_text() == fragment + "\n"
    assert "1 torn fragment(s) from interrupted writes kept in results.jsonl.torn" in proc.stdout
    assert len(pd.read_csv(s / "results.csv")) == POINTS
    # a later resume finds every point ok
    proc = hstu_exp("-m", *GRID, "resume=true", f"hydra.sweep.dir={s}")
    assert proc.stdout.count("skipped (resume=true)") == POINTS, proc.stdout[-2000:]


def test_close_out_on_a_full_disk_fails_with_one_line_and_leaves_whole_files(sweep, tmp_path):
    with tmpfs(tmp_path / "tmpfs", "size=16m") as mnt:
        s = mnt / "sweep"
        shutil.copytree(sweep, s)
        before = {p.name: p.read_bytes() for p in (s / "figures").glob("*.png")}
        # fill the disk, leaving room for Hydra's own files but not for the close-out's
        st = os.statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * (free - 48 * 1024))
        proc = hstu_exp("-m", *GRID, "resume=true", f"hydra.sweep.dir={s}")
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        line = one_error_line(proc.stderr, "hstu-exp: error: close-out:")
        assert str(s) in line and "No space left on device" in line, line
        # no half file: nothing temporary is left, every file there is whole
        assert not [p for p in s.rglob(".*tmp*")]
        assert len(pd.read_csv(s / "results.csv")) == POINTS
        for name, data in before.items():
            png = s / "figures" / name
            assert png.read_bytes() == data or assert_real_png(png) is None


@pytest.mark.parametrize("where", ["figures", "results.jsonl"])
def test_something_standing_where_a_close_out_file_must_go_fails_it(sweep, tmp_path, where):
    s = copy_of(sweep, tmp_path / "s")
    target = s / where
    if where == "figures":  # a file where the figures dir must be
        shutil.rmtree(target)
        target.write_text("not a dir")
        cause = "File exists"
    else:  # a dir where the sweep-level records file must be
        target.unlink()
        target.mkdir()
        cause = "Is a directory"
    proc = hstu_exp("-m", *GRID, "resume=true", f"hydra.sweep.dir={s}")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = one_error_line(proc.stderr, "hstu-exp: error: close-out:")
    assert f"{target}: {cause}" in line, line
    # what could be written before was: the CSV (and, for figures/, the records with samples)
    assert len(pd.read_csv(s / "results.csv")) == POINTS
    if where == "figures":
        assert all("samples_ms" in r for r in lines_of(s / "results.jsonl") if r["status"] == "ok")
    assert not list(s.glob(".*tmp*"))


def test_a_record_that_cannot_be_written_stops_with_one_line_and_closes_out(sweep, tmp_path):
    s = copy_of(sweep, tmp_path / "s")
    job = s / "3" / "results.jsonl"
    job.unlink()
    job.mkdir()  # a directory stands where the record must go
    proc = hstu_exp("-m", *GRID, "resume=true", f"hydra.sweep.dir={s}")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write the record to {job}: Is a directory" in proc.stderr
    # the close-out covers the points that were recorded
    assert len(pd.read_csv(s / "results.csv")) == POINTS - 1


def test_sweep_level_results_jsonl_is_not_counted_twice(sweep):
    recs = lines_of(sweep / "results.jsonl")
    assert len(recs) == POINTS and all(len(r["samples_ms"]) >= 3 for r in recs)
    proc = script("plot_sweep.py", sweep / "results.jsonl", "--out", sweep / "redrawn")
    assert proc.returncode == 0, proc.stderr
    assert f"{POINTS} points: {POINTS} ok" in proc.stdout
    assert "[95% CI" in proc.stdout  # samples travel with the sweep-level file


@pytest.mark.parametrize("name", ["compare.py", "goals.py", "plot_sweep.py"])
def test_scripts_refuse_bad_input_with_one_line(name, sweep, tmp_path):
    prog = name if name != "compare.py" else "hstu-exp-compare"
    proc = script(name, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    no_cols = tmp_path / "results.csv"
    no_cols.write_text("a,b\n1,2\n")
    two = (sweep, sweep) if name == "compare.py" else (sweep,)
    cases = {
        (): "the following arguments are required",
        (tmp_path / "missing", *two[1:]): "no such sweep dir or file",
        (empty,) * len(two): "empty CSV",
        (no_cols,) * len(two): "missing column(s)",
    }
    for args, says in cases.items():
        proc = script(name, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert says in one_error_line(proc.stderr, f"{prog}: error:"), (args, proc.stderr)
    if name == "goals.py":  # a CPU-only sweep holds no goal numbers
        proc = script(name, sweep)
        assert proc.returncode == 2
        assert "no ok GPU records" in one_error_line(proc.stderr, "goals.py: error:")


def test_compare_two_sweeps_with_nothing_in_common(sweep, tmp_path):
    other = copy_of(sweep, tmp_path / "other")
    for f in other.rglob("results.jsonl"):
        recs = [{**r, "batch_size": r["batch_size"] + 10} for r in lines_of(f)]
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = script("compare.py", sweep, other, "--no-figure")
    assert proc.returncode == 2
    assert "no point of A matches a point of B" in one_error_line(
        proc.stderr, "hstu-exp-compare: error:"
    )


def test_writer_starts_each_record_on_a_fresh_line(tmp_path):
    """The writer itself (the CLI test above goes through it): a fragment is set aside, a whole
    record that lost only its newline is kept, and the reader counts what it passed over."""
    from hstu_exp.tracking.records import append_record, scan_records

    path = tmp_path / "results.jsonl"
    path.write_text('{"status": "skipped", "point": 0}\n{"status": "skipped", "poi')
    append_record(tmp_path, {"status": "skipped", "point": 1})
    assert [r["point"] for r in scan_records(tmp_path).records] == [0, 1]
    assert (tmp_path / "results.jsonl.torn").read_text() == '{"status": "skipped", "poi\n'
    path.write_text(path.read_text() + '{"status": "skipped", "point": 2}')  # no newline
    append_record(tmp_path, {"status": "skipped", "point": 3})
    scan = scan_records(tmp_path)
    assert [r["point"] for r in scan.records] == [0, 1, 2, 3] and scan.torn == 0
    assert scan.set_aside == 1
    # an older writer glued a record onto a fragment: the record is recovered, the line counted
    path.write_text(
        '{"status": "skipped", "point": 0}\n{"status": "o{"status": "skipped", "point": 1}\n{"stat\n'
    )
    scan = scan_records(tmp_path)
    assert [r["point"] for r in scan.records] == [0, 1] and scan.torn == 2
    assert "passed over 2 torn line(s)" in scan.torn_note()
