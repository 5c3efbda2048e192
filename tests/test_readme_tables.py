"""The README's number tables are what scripts/readme_tables.py makes of outputs/published/:
CI fails when a table and the records disagree, and the check does see a changed number."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, hstu_exp

SCRIPT = ROOT / "scripts" / "readme_tables.py"


def check(readme):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_readme_tables_match_the_published_records(tmp_path):
    proc = check(ROOT / "README.md")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (ROOT / "README.md").read_text()
    for name in ("goals", "e2e", "serve_max_qps", "serve_real"):
        start = text.index(f"<!-- table:{name} -->")
        assert text.index(f"<!-- /table:{name} -->") - start > 200  # a table, not empty
    assert "<!-- table:serve_sim_check -->" in (ROOT / "docs" / "serving.md").read_text()
    assert "no repeats" in text and "within 1 %" not in text
    # one number changed by hand: the check fails and shows the line
    edited = tmp_path / "README.md"
    edited.write_text(text.replace("| none | 700 / 700 qps |", "| none | 710 / 700 qps |"))
    proc = check(edited)
    assert proc.returncode == 1 and "+| none | 700 / 700 qps |" in proc.stderr
    # markers gone: one line, exit 2
    edited.write_text(text.replace("<!-- table:e2e -->", ""))
    proc = check(edited)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "table:e2e" in proc.stderr


# -- the real-clock serving tables, from real CPU sweeps ------------------------------------------

PUBLISHED = ROOT / "outputs" / "published"
# What every CPU sweep here shares: the tiny model, serve_smoke's p90 <= 250 ms (on a shared CPU
# a tighter bound fails every rate), LoadGen runs of at least RUN_S and serve_smoke's 50 queries
# (what LoadGen's early stopping needs at p90: 2.5 s at 20 qps, RUN_S at the faster rates; the
# tables are checked against the records, whatever the rates).
RUN_S = 0.5
SMOKE = ["experiment=serve_smoke", "cache=paged", "verify=false", f"workload.min_duration_s={RUN_S}"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def records(sweep):
    """The records of a sweep, from its close-out file."""
    return [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published dir as scripts/gpu_serve.sh leaves it, from real runs on this CPU (LoadGen
    driving the real server, the tiny model): a max-QPS search with one final seed (goal_fifo),
    its rate re-run with LoadGen seeds 1-3 (goal_fifo_final), an Offline run, and a sim check
    (2 rates x both clocks); beside them links to the sweeps the other tables read."""
    root = tmp_path_factory.mktemp("published")
    for sweep in PUBLISHED.iterdir():
        (root / sweep.name).symlink_to(sweep)
    runs = {
        "goal_fifo": [
            "workload.search=max_qps",
            "workload.qps=20",
            "workload.search_steps=1",
            "workload.final_seeds=1",
            f"workload.search_duration_s={RUN_S}",
        ],
        "goal_fifo_final": None,  # the rate goal_fifo found, seeds 1-3
        "offline": ["workload.mode=offline"],
        "serve_sim_check": ["workload.clock=real,simulated", "workload.qps=20,30"],
    }
    for name, args in runs.items():
        if args is None:
            (search,) = records(root / "goal_fifo")
            assert search.get("max_qps"), search["search_verdicts"]  # 20 qps passes on a CPU
            args = [
                "workload.search=none",
                f"workload.qps={search['max_qps']}",
                "workload.loadgen_seed=1,2,3",
            ]
        out = hstu_exp(
            "-m", *SMOKE, *args, f"hydra.sweep.dir={root / name}", env=ONE_THREAD, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
    return root


def generate(root, tmp_path, *args):
    """Copies of README.md and docs/serving.md with their tables generated from `root`."""
    readme, serving = tmp_path / "README.md", tmp_path / "serving.md"
    if not readme.exists():
        readme.write_text((ROOT / "README.md").read_text())
        serving.write_text((ROOT / "docs" / "serving.md").read_text())
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--readme", str(readme), "--serving", str(serving)]
        + ["--published", str(root), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, readme, serving


def table(path, name):
    """The rows (lists of cells) of a generated table, the header first, the rule left out."""
    text = path.read_text()
    body = text[text.index(f"<!-- table:{name} -->") : text.index(f"<!-- /table:{name} -->")]
    rows = [line.strip("|").split(" | ") for line in body.splitlines()[1:]]
    return [[c.strip() for c in row] for row in rows if not row[0].startswith("---")]


REAL = ["--serve-real", "goal_fifo,goal_fifo_final,offline", "--sim-check", "serve_sim_check"]


def test_the_real_serving_table_gives_bracket_seeds_and_where_the_time_goes(published, tmp_path):
    proc, readme, _ = generate(published, tmp_path, *REAL)
    assert proc.returncode == 0, proc.stderr
    header, *rows = table(readme, "serve_real")
    assert "real (LoadGen)" in header[0]
    assert "clock: simulated" in table(readme, "serve_max_qps")[0][0]  # the simulated one stays
    (search,) = records(published / "goal_fifo")
    finals = sorted(records(published / "goal_fifo_final"), key=lambda r: r["loadgen_seed"])
    (offline,) = records(published / "offline")
    assert len(rows) == 2
    row = dict(zip(header, rows[0]))
    # the interpreter settings the server ran with are part of the configuration
    collector = "frozen" if search["gc_freeze"] else "on"
    policy = f"fifo (collector {collector}, switch {search['switch_interval_ms']:g} ms)"
    assert rows[0][:4] == ["tiny", "paged", "none", policy]
    best, failed = search["max_qps"], search["min_failing_qps"]
    bracket = (
        f"{best:.0f} [{best:.0f}-{failed:.0f}]" if failed else f"{best:.0f} [{best:.0f} - none failed]"
    )
    assert rows[0][4] == f"{bracket}, {len(search['search_qps'])} trials"
    # the final rate's seeds are the re-run's, not the search's own final run
    valid = sum(r["verdict"] == "VALID" for r in finals)
    assert [r["target_qps"] for r in finals] == [best] * 3
    assert rows[0][5] == f"1, 2, 3 x {RUN_S:g} s: {valid} of 3 VALID"
    worst = max(finals, key=lambda r: r["p99_ms"])
    assert row["SLO"] == "p90 <= 250 ms" and row["p99 (worst seed)"] == f"{worst['p99_ms']:.1f} ms"
    assert row["LoadGen verdict (worst seed)"].startswith(worst["verdict"])
    assert (row["busy fraction"], row["host ms / batch"], row["device ms / batch"]) == (
        f"{worst['busy_fraction']:.2f}",
        f"{worst['host_ms_per_batch']:.2f}",
        f"{worst['device_ms_per_batch']:.2f}",
    )
    pool = f"pool {worst['kv_pool_users']} of {worst['num_users']} users"
    assert row["KV cache misses (pool at the longest history)"] == (
        f"{100 * worst['miss_rate']:.1f} % ({pool})"
    )
    assert row["card, commit"] == f"CPU, {worst['git_sha'][:7]}"
    assert rows[1][4] == f"Offline: {offline['completed_qps']:.0f} qps completed"
    assert rows[1][6].startswith("- (Offline") and rows[1][8].startswith(offline["verdict"])
    # the search alone: its own final run stands for the final rate
    proc, readme, _ = generate(published, tmp_path, "--serve-real", "goal_fifo")
    assert proc.returncode == 0, proc.stderr
    (only,) = table(readme, "serve_real")[1:]
    passed = search["final_passed"]
    assert (
        only[5] == f"1 x {RUN_S:g} s: {sum(passed)} of 1 VALID"
        and only[7] == f"{search['p99_ms']:.1f} ms"
    )


def test_the_simulator_table_in_docs_flags_errors_over_25_percent(published, tmp_path):
    proc, _, serving = generate(published, tmp_path, *REAL)
    assert proc.returncode == 0, proc.stderr
    header, *rows = table(serving, "serve_sim_check")
    assert header[3] == "p50 real (LoadGen)" and header[5] == "p99 simulated"
    both = {}
    for r in records(published / "serve_sim_check"):
        both.setdefault(r["qps"], {})[r["clock"]] = r
    assert [float(r[1]) for r in rows] == sorted(both) == [20.0, 30.0]
    for row, qps in zip(rows, sorted(both)):
        sim, real = both[qps]["simulated"], both[qps]["real"]
        for p, cells in (("p50", row[2:5]), ("p99", row[5:8])):
            gap = (sim[f"{p}_ms"] - real[f"{p}_ms"]) / real[f"{p}_ms"]
            assert cells[:2] == [f"{sim[f'{p}_ms']:.2f} ms", f"{real[f'{p}_ms']:.2f} ms"]
            assert f"{gap:+.0%}".replace("%", " %") in cells[2]
            assert ("(over 25 %)" in cells[2]) == (abs(gap) > 0.25)


def test_a_listed_sweep_missing_is_bad_input_and_the_check_sees_a_changed_cell(published, tmp_path):
    proc, readme, serving = generate(published, tmp_path, *REAL)
    assert proc.returncode == 0, proc.stderr
    assert generate(published, tmp_path, "--check", *REAL)[0].returncode == 0
    before = readme.read_text(), serving.read_text()
    for args in (
        ["--serve-real", "goal_fifo,goal_la_final"],
        ["--sim-check", "serve_sim_check,nothing"],
    ):
        proc = generate(published, tmp_path, *args)[0]
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert (
            proc.stderr.startswith("readme_tables.py: error: ") and args[1].split(",")[1] in proc.stderr
        )
        assert (readme.read_text(), serving.read_text()) == before  # nothing written
    row = next(line for line in before[0].splitlines() if line.startswith("| tiny | paged"))
    readme.write_text(before[0].replace(row, row.replace(" trials", " tries")))
    proc = generate(published, tmp_path, "--check", *REAL)[0]
    assert proc.returncode == 1 and f"+{row}" in proc.stderr


def test_the_serving_goals_are_judged_on_the_records(published):
    """The goal rows say met or not, and why not, from the records: here the CPU sweep stands
    for the goal configuration (tiny, paged, eager, p90 <= 250 ms, its own max QPS as the bar)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_tables
    from goals import SERVE_GOAL

    (search,) = records(published / "goal_fifo")
    finals = records(published / "goal_fifo_final")
    sims = records(published / "serve_sim_check")
    best = search["max_qps"]
    card = search["device_name"]  # this machine stands for the card the goal is for
    goal = {
        **SERVE_GOAL,
        **dict(
            model="tiny", graph="none", percentile=90.0, slo_ms=250.0, min_duration_s=RUN_S, qps=best
        ),
        "card": card,
    }
    sweeps = ["goal_fifo", "goal_fifo_final"]
    header, _, qps_row, busy_row, sim_row = readme_tables.serve_goals_table(
        published, sweeps, ["serve_sim_check"], goal
    )
    assert (
        "clock: real (LoadGen)" in header
        and "(tiny, paged, none, fifo (collector frozen, switch 5 ms))" in qps_row
    )
    valid = sum(r["verdict"] == "VALID" for r in finals)
    assert f"{best:.0f} qps; final rate: {valid} of 3 seeds VALID x {RUN_S:g} s" in qps_row
    assert qps_row.endswith("| yes |") == (valid == 3)
    assert (f"{3 - valid} of 3 final seeds not VALID" in qps_row) == (valid < 3)
    worst = max(finals, key=lambda r: r["p99_ms"])
    assert f"| {worst['busy_fraction']:.2f} (worst seed) |" in busy_row
    assert busy_row.endswith("| yes |") == (worst["busy_fraction"] >= 0.8)
    gaps = [
        abs(sim["p99_ms"] - real["p99_ms"]) / real["p99_ms"]
        for sim in sims
        for real in sims
        if sim["clock"] == "simulated" and real["clock"] == "real" and sim["qps"] == real["qps"]
        if real["qps"] < 0.8 * best
    ]
    if gaps:
        assert f"worst {max(gaps):.0%} over {len(gaps)} rates below {0.8 * best:g} qps" in sim_row
        assert sim_row.endswith("| yes |") == (max(gaps) <= 0.25)
    else:
        assert sim_row.endswith("| not judged |")
    # the goal as stated for the GPU: every reason it is not met is named
    strict = {**goal, "qps": 2 * best, "percentile": 99.0, "min_duration_s": 60.0, "card": "H200"}
    _, _, row, busy_row = readme_tables.serve_goals_table(published, sweeps, [], strict)[:4]
    assert f"ran on {card}, the goal is for an H200" in row and busy_row.endswith("| no |")
    assert "SLO p90 <= 250 ms, not the goal's" in row and f"under {2 * best:,.0f} qps" in row
    assert f"final runs {RUN_S:g} s, under 60 s" in row and row.endswith("|") and "| yes |" not in row
    # no search of the goal's configuration: not judged
    assert readme_tables.serve_goals_table(published, sweeps, [])[2].endswith("| not judged |")
