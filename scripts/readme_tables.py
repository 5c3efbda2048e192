#!/usr/bin/env python3
"""The number tables of README.md and docs/serving.md, generated from outputs/published/.

    scripts/readme_tables.py            # rewrite every table between its markers
    scripts/readme_tables.py --check    # exit 1 when a table differs from what the records say

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; the text around the
markers is prose and stays as written. tests/test_readme_tables.py runs `--check`, so CI fails
when a document and the records disagree. A sweep listed below (or with --serve-real /
--sim-check) must be published: a missing one is bad input. Exit status 0, 1 (--check: a table
differs), 2 (bad input: one line).
"""

import argparse
import ast
import difflib
import re
import sys
from functools import partial
from pathlib import Path

import _venv  # noqa: F401,E402  (source tree on the path; re-run under .venv if needed)
import pandas as pd  # noqa: E402
from goals import ATTENTION, BLOCK, E2E_MS, SERVE_GOAL  # noqa: E402
from serve_sim_check import compare  # noqa: E402

from hstu_exp.report.aggregate import SweepError, load_sweep, ok  # noqa: E402
from hstu_exp.tracking.records import is_missing, read_records  # noqa: E402

PROG = "readme_tables.py"
ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "outputs" / "published"
# Which published sweeps each table reads.
GOAL_SWEEPS = [
    "goal_cases_triton_graph_h200_hopper",
    "seed_attention_h200_hopper",
    "seed_e2e_h200_hopper",
]
E2E_SWEEPS = ["seed_e2e_h200", "seed_e2e_h200_second", "seed_e2e_h100_repeats", "seed_e2e_h100_second"]
SERVE_SWEEP = "serve_slo_h200"
# The real-clock serving sweeps (scripts/gpu_serve.sh): max-QPS searches and the fixed-rate runs
# beside them (a `_final` part: the found rate with LoadGen seeds 1-3).
SERVE_REAL_SWEEPS: list = [
    "serve_goal_fifo_h100",
    "serve_goal_la_h100",
    "serve_goal_fifo_gc_h100",
    "serve_goal_fifo_gc_final_h100",
    "serve_gc_ab_h100",
    "serve_goal_fifo_host_h100",
]
# Sweeps that ran one configuration on both clocks (gpu_serve.sh sim_check), for docs/serving.md.
SIM_CHECK_SWEEPS: list = []
E2E_LABELS = {
    "baseline_graph": "baseline + CUDA graph",
    "cache": "KV cache (eager)",
    "cache_graph": "KV cache + CUDA graph",
}


def _load(root: Path, name: str) -> pd.DataFrame:
    return ok(load_sweep(root / name))


def _validity(r) -> str:
    v = str(r.get("valid")).lower()
    if v == "true":
        return "yes"
    if v == "false":
        return f"no ({r.get('invalid_reason')})"
    return "not judged"


def goals_table(root: Path) -> list:
    """Each goal case of docs/design.md §6 at the README's configuration (Triton, CUDA graph):
    its median (or TFLOP/s), validity with the reason, and the goal."""
    block, att, e2e = (_load(root, name) for name in GOAL_SWEEPS)
    rows = ["| case | median | valid | goal |", "|---|---|---|---|"]
    block = block[
        (block["kernel"] == "triton")
        & (block["graph"] == "cudagraph")
        & (block["total_history"] == 4096)
    ]
    for name, b, n, goal in BLOCK:
        case = block[
            (block["batch_size"] == b)
            & (block["new_history"] == n)
            & (block["cache"] == ("none" if n == 4096 else "paged"))
        ]
        for _, r in case.iterrows():
            rows.append(
                f"| block, {name} ({4096 - n} of 4096 cached) | {r['median_ms']:.3f} ms "
                f"| {_validity(r)} | <= {goal} ms |"
            )
    for (b, cache, n), goal in ATTENTION.items():
        hit = att[
            (att["batch_size"] == b)
            & (att["cache"] == cache)
            & (att["new_history"] == n)
            & (att["total_history"] == 4096)
            & (att["kernel"] == "triton")
        ]
        for _, r in hit.iterrows():
            rows.append(
                f"| attention, batch {b}, {'full' if cache == 'none' else 'paged'} "
                f"| {r['tflops']:.0f} TFLOP/s | {_validity(r)} | >= {goal} TFLOP/s |"
            )
    for b, goal in E2E_MS.items():
        hit = e2e[(e2e["mode"] == "cache_graph") & (e2e["batch_size"] == b)]
        for _, r in hit.iterrows():
            rows.append(
                f"| e2e cache + graph, batch {b} | {r['median_ms']:.2f} ms a batch "
                f"| {_validity(r)} | <= {goal} ms |"
            )
    return rows


def _speedup_cell(r) -> str:
    cell = f"{r['speedup']:.2f}x [{r['ci_low']:.2f}-{r['ci_high']:.2f}]"
    if not pd.isna(r.get("repeats")) and int(r["repeats"]) > 1:
        cell += f", {int(r['repeats'])} repeats {r['spread_low']:.2f}-{r['spread_high']:.2f}x"
        if str(r.get("repeats_agree")).lower() == "false":  # numpy bool in a frame
            cell += " DISAGREE"
    invalid = [
        s
        for s, k in (("", "valid"), ("baseline ", "baseline_valid"))
        if str(r.get(k)).lower() == "false"
    ]
    return cell + (" (invalid)" if invalid else "")


def e2e_table(root: Path) -> list:
    """Speedup over the eager baseline (ratio of pass totals, 95 % interval of the pass-by-pass
    bootstrap) of every published seed_e2e run side by side, one row per mode and batch."""
    from hstu_exp.report.aggregate import e2e_speedups

    runs = {name: e2e_speedups(_load(root, name)) for name in E2E_SWEEPS}
    batches = sorted({int(b) for sp in runs.values() for b in sp["batch_size"]})
    rows = [
        "| mode | batch | " + " | ".join(f"`{n}/`" for n in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for mode, label in E2E_LABELS.items():
        for b in batches:
            cells = []
            for sp in runs.values():
                hit = sp[(sp["mode"] == mode) & (sp["batch_size"] == b)]
                cells.append(_speedup_cell(hit.iloc[0]) if len(hit) else "-")
            rows.append(f"| {label} | {b} | " + " | ".join(cells) + " |")
    return rows


def serve_table(root: Path) -> list:
    """max QPS within the SLO per cache x graph, FIFO / length-aware batching, and the clock
    that produced it: the record's `clock`; records older than that field came from the only
    serve path there was, queueing simulated on measured service times (clock=simulated)."""
    df = _load(root, SERVE_SWEEP)
    df = df[df["max_qps"].notna()] if "max_qps" in df else df.head(0)
    clock = "/".join(
        sorted(
            {
                str(c) if isinstance(c, str) else "simulated"
                for c in df.get("clock", pd.Series([None] * len(df)))
            }
        )
    )
    graphs = sorted(df["graph"].unique(), key=lambda g: g != "none")
    rows = [
        f"| cache (clock: {clock}) | "
        + " | ".join("eager" if g == "none" else "CUDA graphs" for g in graphs)
        + " |",
        "|---|" + "---|" * len(graphs),
    ]
    for cache in ("none", "paged", "paged_offload"):
        cells = []
        for g in graphs:
            part = df[(df["cache"] == cache) & (df["graph"] == g)]
            qps = [
                part[part["mode"].astype(str).str.endswith(p)]["max_qps"]
                for p in ("fifo", "length_aware")
            ]
            cells.append(" / ".join(f"{q.iloc[0]:.0f}" if len(q) else "-" for q in qps) + " qps")
        if len(part) or any(c != "- / - qps" for c in cells):
            rows.append(f"| {cache} | " + " | ".join(cells) + " |")
    return rows


# A configuration of the real-clock table (the model cell names replicas beyond one); its rows
# are sorted by it.
SERVE_CONFIG = ("model", "cache", "graph", "policy")


def _serve_config(r) -> tuple:
    cells = [str(r.get(k)) for k in SERVE_CONFIG]
    replicas = r.get("replicas")
    if not is_missing(replicas) and int(replicas) > 1:
        cells[0] += f" x {int(replicas)} replicas"
    cells[-1] += _interpreter(r)
    return tuple(cells)


def _interpreter(r) -> str:
    """The server's interpreter settings where the record has them (records from before those
    knobs ran with the collector on and Python's 5 ms switch interval, and say nothing)."""
    freeze, switch = r.get("gc_freeze"), r.get("switch_interval_ms")
    if is_missing(freeze) and is_missing(switch):
        return ""
    parts = []
    if not is_missing(freeze):
        frozen = str(freeze).lower() == "true"
        parts.append("collector frozen" if frozen else "collector on")
    if not is_missing(switch):
        parts.append(f"switch {float(switch):g} ms")
    return f" ({', '.join(parts)})"


def _listed(v) -> list:
    """A record's list field (results.csv keeps lists as their repr); [] where missing."""
    if isinstance(v, str):
        v = ast.literal_eval(v)
    return list(v) if isinstance(v, (list, tuple)) else []


def _num(v, fmt: str) -> str:
    return "-" if is_missing(v) else format(v, fmt)


def _reason(r) -> str:
    """LoadGen's verdict with the constraints that failed, without its advice and counts."""
    verdict = str(r.get("verdict"))
    if verdict == "VALID" or is_missing(r.get("verdict_reason")):
        return verdict
    parts = str(r["verdict_reason"]).split(" * ")[0].split(";")
    advice = ("Reduce", "Increase")  # LoadGen's suggestions, not constraints
    why = "; ".join(p.strip().rstrip(".") for p in parts if not p.strip().startswith(advice))
    return f"{verdict} ({why})"


def _bracket(r) -> str:
    """max QPS [highest passing - lowest failing rate] and how many trials found them."""
    tried = _listed(r.get("search_qps"))
    trials = f"{len(tried)} trials"
    best, failed = r.get("max_qps"), r.get("min_failing_qps")
    if is_missing(best):
        return f"- (none passed; lowest tried {min(tried):.0f} failed), {trials}"
    if is_missing(failed):
        return f"{best:.0f} [{best:.0f} - none failed], {trials}"
    return f"{best:.0f} [{best:.0f}-{failed:.0f}], {trials}"


def _real_row(config, rate_cell: str, worst: dict, seeds: list, passed: list) -> str:
    """One configuration: its rate, the seeds behind it and how many passed, and the worst
    seed's tail, verdict and where its time went (busy fraction, host / device ms a batch, KV
    cache misses)."""
    duration = worst.get("min_duration_s")
    seed_cell = ", ".join(str(s) for s in seeds) if seeds else "-"
    if seeds and not is_missing(duration):
        seed_cell += f" x {duration:g} s"
    if passed:
        seed_cell += f": {sum(passed)} of {len(passed)} VALID"
    slo = f"p{worst['slo_percentile']:g} <= {worst['slo_ms']:g} ms"
    if worst.get("scenario") == "offline":
        slo = "- (Offline: no bound)"
    return (
        "| "
        + " | ".join(str(v) for v in config)
        + f" | {rate_cell} | {seed_cell} | {slo} | {_num(worst.get('p99_ms'), '.1f')} ms "
        f"| {_reason(worst)} | {_num(worst.get('busy_fraction'), '.2f')} "
        f"| {_num(worst.get('host_ms_per_batch'), '.2f')} "
        f"| {_num(worst.get('device_ms_per_batch'), '.2f')} | {_misses(worst)} | {_card(worst)} |"
    )


def _misses(r) -> str:
    """How many requests missed the KV cache (each a full recompute of its history), and how
    many of the population's users the pool holds at the longest history: a pool smaller than
    the population makes misses, whatever the rate."""
    rate = r.get("miss_rate")
    if is_missing(rate):
        return "-"
    cell = f"{100 * rate:.1f} %"
    pool, users = r.get("kv_pool_users"), r.get("num_users")
    if not is_missing(pool) and not is_missing(users):
        cell += f" (pool {pool:.0f} of {users:.0f} users)"
    return cell


def _card(r) -> str:
    """Where a run ran: the GPU's name (a CPU run says CPU) and the commit."""
    card = "CPU" if r.get("device") == "cpu" else str(r.get("device_name"))
    return f"{card}, {str(r.get('git_sha'))[:7]}"


def _seed(r):
    return r["seed"] if is_missing(r.get("loadgen_seed")) else int(r["loadgen_seed"])


def real_results(root: Path, sweeps: list) -> list:
    """What the real-clock sweeps found, one dict per configuration: `config`, `search` (the
    max-QPS search record, or None), `runs` (the records at its final rate: the fixed-rate runs
    at that rate where a sweep re-ran it, else the search record with its own final runs), their
    `seeds` and `passed` (LoadGen VALID), and `worst` (the run with the worst p99). Fixed-rate
    runs no search found, and Offline runs, are configurations of their own (search None)."""
    frames = [_load(root, name) for name in sweeps]
    recs = [r for df in frames for r in df.to_dict("records") if r.get("clock") == "real"]
    searches = sorted((r for r in recs if _listed(r.get("search_qps"))), key=_serve_config)
    fixed: dict = {}
    for r in recs:
        if not _listed(r.get("search_qps")):
            fixed.setdefault((_serve_config(r), r.get("scenario"), r.get("target_qps")), []).append(r)
    found = []
    for s in searches:
        runs = sorted(fixed.pop((_serve_config(s), "server", s.get("max_qps")), []), key=_seed)
        if runs:
            seeds, passed = [_seed(r) for r in runs], [r.get("verdict") == "VALID" for r in runs]
        else:
            runs = [s]
            seeds = _listed(s.get("final_seeds"))
            passed = [bool(p) for p in _listed(s.get("final_passed"))]
        found.append(dict(config=_serve_config(s), search=s, runs=runs, seeds=seeds, passed=passed))
    for (key, _, _), runs in sorted(fixed.items(), key=lambda kv: str(kv[0])):
        runs.sort(key=_seed)
        found.append(
            dict(
                config=key,
                search=None,
                runs=runs,
                seeds=[_seed(r) for r in runs],
                passed=[r.get("verdict") == "VALID" for r in runs],
            )
        )
    for f in found:
        f["worst"] = max(f["runs"], key=lambda r: -1.0 if is_missing(r.get("p99_ms")) else r["p99_ms"])
    return found


def serve_real_table(root: Path, sweeps: list) -> list:
    """max QPS at the SLO per configuration on the real clock (LoadGen driving the real server):
    the search's bracket and trials; the final rate's seeds and how many LoadGen passed; at
    that rate the worst seed's p99, verdict, busy fraction, host / device ms a batch and KV
    cache misses. Fixed-rate runs no search found, and Offline runs (their throughput), get
    rows of their own."""
    rows = [
        "| model (clock: real (LoadGen)) | cache | graph | policy "
        "| max QPS [highest passing-lowest failing], search trials | final rate: LoadGen seeds "
        "| SLO | p99 (worst seed) | LoadGen verdict (worst seed) | busy fraction "
        "| host ms / batch | device ms / batch | KV cache misses (pool at the longest history) "
        "| card, commit |",
        "|---" * 14 + "|",
    ]
    found = real_results(root, sweeps)
    if not found:
        return rows + ["| no real-clock sweep published yet |" + " - |" * 13]
    for f in found:
        worst = f["worst"]
        if f["search"] is not None:
            cell = _bracket(f["search"])
        elif worst.get("scenario") == "offline":
            cell = f"Offline: {max(r['completed_qps'] for r in f['runs']):.0f} qps completed"
        else:
            cell = f"- (fixed rate {worst['target_qps']:g} qps, no search)"
        rows.append(_real_row(f["config"], cell, worst, f["seeds"], f["passed"]))
    return rows


def _gap_cell(gap) -> str:
    if gap is None:
        return "-"
    cell = f"{gap:+.0%}".replace("%", " %")
    return f"**{cell} (over 25 %)**" if abs(gap) > 0.25 else cell


def sim_check_table(root: Path, sweeps: list) -> list:
    """The simulator against the real server (scripts/serve_sim_check.py): per configuration and
    rate, the simulated (predicted) and real (LoadGen, measured) p50 / p99 and the simulator's
    error relative to the real one, flagged beyond 25 %."""
    rows = [
        "| configuration | offered qps | p50 simulated | p50 real (LoadGen) | p50 error "
        "| p99 simulated | p99 real (LoadGen) | p99 error |",
        "|---" * 8 + "|",
    ]
    if not sweeps:
        return rows + ["| not measured yet (scripts/gpu_serve.sh OUT sim_check) |" + " - |" * 7]
    for name in sweeps:
        path = root / name
        found = compare(read_records(path)) if path.is_dir() else None
        if found is None:
            raise SweepError(f"{path}: no such sweep dir")
        if not found:
            raise SweepError(f"{path}: no serve point ran on both clocks at one rate")
        for r in found:
            rows.append(
                f"| {r['configuration']} | {r['qps']:g} | {r['p50_sim']:.2f} ms "
                f"| {r['p50_real']:.2f} ms | {_gap_cell(r['p50_gap'])} | {r['p99_sim']:.2f} ms "
                f"| {r['p99_real']:.2f} ms | {_gap_cell(r['p99_gap'])} |"
            )
    return rows


def _max_qps_goal(f: dict, goal: dict) -> list:
    """The max-QPS and busy-fraction goal rows of one goal configuration's search."""
    s, worst, passed = f["search"], f["worst"], f["passed"]
    best, duration = s.get("max_qps"), worst.get("min_duration_s")
    where = f"{', '.join(f['config'][:3])}, {f['config'][3]}"
    why = []
    card = str(worst.get("device_name"))
    if goal["card"] not in card:
        why.append(f"ran on {card}, the goal is for an {goal['card']}")
    if (s.get("slo_percentile"), s.get("slo_ms")) != (goal["percentile"], goal["slo_ms"]):
        why.append(f"SLO p{s.get('slo_percentile'):g} <= {s.get('slo_ms'):g} ms, not the goal's")
    if is_missing(best) or best < goal["qps"]:
        why.append(f"under {goal['qps']:,.0f} qps")
    if not passed or not all(passed):
        why.append(f"{len(passed) - sum(passed)} of {len(passed)} final seeds not VALID")
    if is_missing(duration) or duration < goal["min_duration_s"]:
        why.append(f"final runs {_num(duration, 'g')} s, under {goal['min_duration_s']:g} s")
    qps_cell = "none passed" if is_missing(best) else f"{best:.0f} qps"
    busy = worst.get("busy_fraction")
    busy_met = not is_missing(busy) and busy >= goal["busy"]
    return [
        f"| max QPS >= {goal['qps']:,.0f} at p{goal['percentile']:g} <= {goal['slo_ms']:g} ms, "
        f"VALID ({where}) | {qps_cell}; final rate: {sum(passed)} of {len(passed)} seeds VALID "
        f"x {_num(duration, 'g')} s | {'no: ' + '; '.join(why) if why else 'yes'} |",
        f"| device busy fraction >= {goal['busy']:g} at that rate ({where}) "
        f"| {_num(busy, '.2f')} (worst seed) "
        f"| {'yes' if busy_met and goal['card'] in card else 'no'} |",
    ]


def serve_goals_table(root: Path, sweeps: list, sim_sweeps: list, goal: dict = SERVE_GOAL) -> list:
    """docs/design.md §6.1 judged on the records: per policy of the goal configuration its max
    QPS (at the SLO, every final seed VALID, long enough) and busy fraction against the goals;
    the simulator's worst p99 error at rates below sim_below x the FIFO max QPS."""
    rows = ["| goal (docs/design.md §6.1; clock: real (LoadGen)) | measured | met |", "|---|---|---|"]
    config = (goal["model"], goal["cache"], goal["graph"])
    mine = [
        f for f in real_results(root, sweeps) if f["search"] is not None and f["config"][:3] == config
    ]
    for f in mine:
        rows += _max_qps_goal(f, goal)
    if not mine:
        rows.append(
            f"| max QPS and busy fraction ({', '.join(config)}) "
            "| no max-QPS search of it published | not judged |"
        )
    found = [f["search"].get("max_qps") for f in mine if f["search"].get("policy") == "fifo"]
    fifo = max((q for q in found if not is_missing(q)), default=None)  # the best FIFO search
    sim = (
        f"| simulator within {goal['sim_error']:.0%} of the real p99 below "
        f"{goal['sim_below']:.0%} of the FIFO max QPS "
    )
    if is_missing(fifo) or not sim_sweeps:
        return rows + [sim + "| no FIFO max QPS or sim-check sweep | not judged |"]
    below = fifo * goal["sim_below"]
    pairs = [
        r
        for name in sim_sweeps
        for r in compare(read_records(root / name))
        if r["configuration"].startswith(f"{goal['cache']}-{goal['graph']}-")
        and r["qps"] < below
        and r["p99_gap"] is not None
    ]
    if not pairs:
        return rows + [sim + f"| no rate of that configuration below {below:g} qps | not judged |"]
    worst = max(abs(r["p99_gap"]) for r in pairs)
    return rows + [
        sim + f"| worst {worst:.0%} over {len(pairs)} rates below {below:g} qps "
        f"| {'yes' if worst <= goal['sim_error'] else 'no'} |"
    ]


def documents(root: Path, serve_real: list, sim_check: list) -> dict:
    """Which tables each document holds: {document option: {table name: make()}}."""
    return {
        "readme": {
            "goals": partial(goals_table, root),
            "e2e": partial(e2e_table, root),
            "serve_max_qps": partial(serve_table, root),
            "serve_real": partial(serve_real_table, root, serve_real),
            "serve_goals": partial(serve_goals_table, root, serve_real, sim_check),
        },
        "serving": {"serve_sim_check": partial(sim_check_table, root, sim_check)},
    }


def render(text: str, tables: dict) -> str:
    """The text with every one of `tables` regenerated between its markers."""
    for name, make in tables.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no <!-- table:{name} --> ... <!-- /table:{name} --> markers")
        body = "\n".join(make()) + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def _names(text: str) -> list:
    return [n for n in text.split(",") if n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--serving", type=Path, default=ROOT / "docs" / "serving.md")
    p.add_argument("--published", type=Path, default=PUBLISHED, help="where the sweeps are")
    p.add_argument(
        "--serve-real",
        type=_names,
        default=SERVE_REAL_SWEEPS,
        metavar="NAME,...",
        help="the real-clock serving sweeps (default: SERVE_REAL_SWEEPS)",
    )
    p.add_argument(
        "--sim-check",
        type=_names,
        default=SIM_CHECK_SWEEPS,
        metavar="NAME,...",
        help="the sweeps run on both clocks (default: SIM_CHECK_SWEEPS)",
    )
    args = p.parse_args(argv)
    docs = documents(args.published, args.serve_real, args.sim_check)
    texts = {}
    for key, tables in docs.items():  # every document rendered before any is written
        path = getattr(args, key)
        try:
            text = path.read_text()
            texts[path] = (text, render(text, tables))
        except (OSError, ValueError) as exc:
            print(f"{PROG}: error: {path}: {exc}", file=sys.stderr)
            return 2
    differ = [path for path, (text, new) in texts.items() if new != text]
    if args.check:
        for path in differ:
            text, new = texts[path]
            diff = difflib.unified_diff(
                text.splitlines(), new.splitlines(), path.name, "from the records", lineterm="", n=0
            )
            print("\n".join(diff), file=sys.stderr)
            print(
                f"{PROG}: the tables of {path} differ from {args.published}: run "
                f"scripts/readme_tables.py",
                file=sys.stderr,
            )
        return 1 if differ else 0
    for path in differ:
        path.write_text(texts[path][1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
