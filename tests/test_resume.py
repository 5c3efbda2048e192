"""resume=true: a sweep stopped after 3 of 6 points, run again into the same sweep dir, runs only
the points without an ok record (the one it was stopped in, marked 'interrupted', runs again);
the close-out covers all six."""

import re
import signal

import pandas as pd
from helpers import hstu_exp
from live_sweep import GRID, POINTS, LiveSweep
from test_sweep import records

OK_LINE = rf"^\[\d/{POINTS}\] .*: ok median"


def test_killed_sweep_resumes_only_the_missing_points(tmp_path):
    sweep = LiveSweep("-m", *GRID, f"hydra.sweep.dir={tmp_path}")
    sweep.wait_for(OK_LINE, count=3)
    sweep.signal(signal.SIGTERM)  # `kill PID`
    assert sweep.finish() == 128 + signal.SIGTERM
    first = records(tmp_path)
    done = {r["config_key"]: r for r in first if r["status"] == "ok"}
    assert 3 <= len(done) < POINTS
    # at most the point in progress is marked; nothing else is left behind
    assert all(r["error"] == "interrupted" for r in first if r["status"] != "ok")
    assert len(first) - len(done) <= 1

    proc = hstu_exp("-m", *GRID, "resume=true", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = re.findall(
        rf"^\[\d/{POINTS}\] (\S+): already ok in this sweep, skipped "
        r"\(resume=true\)$",
        proc.stdout,
        re.M,
    )
    ran = re.findall(rf"^\[\d/{POINTS}\] (\S+): running$", proc.stdout, re.M)
    assert sorted(skipped) == sorted(r["name"] for r in done.values())
    assert len(ran) == POINTS - len(done) and not set(ran) & set(skipped)

    recs = records(tmp_path)
    assert len(recs) == len(first) + len(ran)  # nothing ran twice
    for r in recs:  # the first run's ok records are untouched
        if r["config_key"] in done:
            assert r == done[r["config_key"]]
    df = pd.read_csv(tmp_path / "results.csv")  # a rerun point: its newest record wins
    assert len(df) == POINTS and set(df["status"]) == {"ok"}
    assert df["config_key"].nunique() == POINTS
    assert f"{POINTS} points: {POINTS} ok, 0 skipped, 0 failed" in proc.stdout
