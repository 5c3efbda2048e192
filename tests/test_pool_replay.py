"""scripts/pool_replay.py: a run's requests replayed through the paged cache's page bookkeeping
give the misses an LRU pool of that size makes, and the run's own pool gives what the run
recorded."""

import importlib.util

import pandas as pd
from helpers import ROOT, hstu_exp

SCRIPT = ROOT / "scripts" / "pool_replay.py"
spec = importlib.util.spec_from_file_location("pool_replay", SCRIPT)
pool_replay = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pool_replay)


def test_an_lru_pool_of_four_pages_and_one_of_six():
    """Users of 64 tokens (2 pages of 32), one a batch: 1, 2, 1, 3, 2, 3. Four pages hold two
    users: 3 evicts 2 (1 was used later), then 2 evicts 1, so 2 misses again. Six pages hold
    all three: only first visits miss."""
    users = [1, 2, 1, 3, 2, 3]
    requests = pd.DataFrame(
        dict(user=users, history=64, candidates=4, batch=range(6), start_s=[0.1 * i for i in range(6)])
    )
    four = pool_replay.replay_misses(requests, pages=4, page_size=32)
    assert four.tolist() == [True, True, False, True, True, False]
    six = pool_replay.replay_misses(requests, pages=6, page_size=32)
    assert six.tolist() == [True, True, False, True, False, False]


def test_each_replica_replays_its_own_pool():
    """The same user on two replicas: each replica's pool misses it once."""
    requests = pd.DataFrame(
        dict(user=[7, 7, 7, 7], history=[32, 32, 64, 64], candidates=1, batch=[0, 0, 1, 1],
             replica=[0, 1, 0, 1], start_s=[0.0, 0.0, 1.0, 1.0])
    )  # fmt: skip
    missed = pool_replay.replay_misses(requests, pages=4, page_size=32)
    assert missed.tolist() == [True, True, False, False]


def test_a_real_runs_own_pool_replays_to_what_it_recorded(tmp_path, capsys):
    """A real-clock serving run on this CPU (LoadGen, the real server, a 16-page pool the
    population overflows): replayed with its own pool, its second half misses exactly what it
    recorded; a pool of 4096 pages misses less; --pages 1 cannot hold a batch and says so."""
    proc = hstu_exp(
        "-m", "experiment=serve_smoke", "cache=paged", "verify=false", "workload.qps=60",
        "workload.min_duration_s=1", f"hydra.sweep.dir={tmp_path}",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pool_replay.main([str(tmp_path), "--pages", "4096,1", "--fp8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    recorded = next(ln for ln in lines if ln.startswith("  recorded:"))
    own = next(ln for ln in lines if "the run's pool (16 pages)" in ln)
    rate = lambda line: float(line.split("missed the GPU pool ")[1].split("%")[0])  # noqa: E731
    assert rate(own) == rate(recorded) > 0, lines
    big = next(ln for ln in lines if "4096 pages" in ln)
    assert rate(big) < rate(own)
    assert any("1 pages: a batch needs more pages than that" in ln for ln in lines)
    assert not any("fp8 in the same bytes" in ln for ln in lines)  # a float32 pool: no e4m3 twin
    assert all("simulated" in ln for ln in lines if "replayed" in ln)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """A pool size that is not a whole number, one of no pages, and a dir with no serve point:
    one line naming the value or the dir, exit 2, no traceback."""
    cases = [
        (["--pages", "64k"], "'64k': expected whole numbers"),
        (["--pages", "0"], "'0': a pool holds at least one page"),
        ([], "no ok serve point with a paged pool and requests.csv in"),
    ]
    for args, message in cases:
        try:
            code = pool_replay.main([str(tmp_path), *args])
        except SystemExit as stop:  # argparse's errors end the process
            code = stop.code
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (args, err)
        assert err.count("\n") == 1 and message in err, (args, err)
