#!/usr/bin/env python3
"""The performance-goal tables (docs/design.md §6, "Goals") from GPU sweeps.

    scripts/goals.py SWEEP [SWEEP ...]

SWEEP is a sweep dir, a results.csv or a results.jsonl (as for hstu-exp-compare). The goals are
stated for a GPU: the ok records with device=cuda are used, and a sweep without any is refused.
Prints markdown tables: the block goal cases, the attention points, the e2e latency and speedups
over baseline with their 95 % bootstrap intervals, each against its goal where one is stated
("met" needs the point to be valid too; an e2e speedup goal needs the interval's lower end above
it). Exit status 0, or 2 on bad input (one line).
"""

import argparse
import sys
from pathlib import Path

import _venv  # noqa: F401,E402  (source tree on the path; re-run under .venv if needed)
import pandas as pd  # noqa: E402

from hstu_exp.report.compare import OneLineParser  # noqa: E402

PROG = "goals.py"
# (case, batch, new tokens of 4096, goal ms): docs/design.md §6
BLOCK = [
    ("batch 1, cached", 1, 128, 0.25),
    ("batch 8, cached", 8, 128, 1.25),
    ("batch 1, full recompute", 1, 4096, 1.25),
    ("batch 8, full recompute", 8, 4096, 8.5),
]
# (batch, cache, new tokens of 4096) -> goal TFLOP/s
ATTENTION = {(8, "none", 4096): 620, (1, "paged", 128): 350, (8, "paged", 128): 520}
E2E_MS = {1: 0.45, 8: 1.5}  # cache_graph, ms a batch
E2E_SPEEDUP = 3.0  # cache_graph over baseline, with the interval's lower end above it
# docs/design.md §6.1, serving on the real clock: the configuration, its max QPS at the SLO
# (VALID, final runs at least min_duration_s), the busy fraction at that rate, and the
# simulator's p99 error at rates below sim_below x that max QPS.
SERVE_GOAL = dict(
    model="seed",
    cache="paged",
    graph="cudagraph",
    qps=4000.0,
    percentile=99.0,
    slo_ms=80.0,
    min_duration_s=60.0,
    busy=0.8,
    sim_error=0.25,
    sim_below=0.8,
    card="H200",  # the card the goal is stated for; a run on another card is not judged met
)
BLOCK_COLUMNS = [
    "workload",
    "cache",
    "kernel",
    "graph",
    "batch_size",
    "total_history",
    "new_history",
    "num_candidates",
    "median_ms",
    "floor_ms",
]


def load(paths) -> "pd.DataFrame":
    """The ok GPU records of every sweep given."""
    from hstu_exp.report.aggregate import load_sweep, ok, require

    frames = []
    for p in paths:
        df = load_sweep(p)
        if df.attrs.get("torn_note"):
            print(f"{PROG}: {p}: {df.attrs['torn_note']}", file=sys.stderr)
        require(df, ["workload", "device", "median_ms"], p, "the goal table needs them")
        gpu = ok(df)[ok(df)["device"] == "cuda"]
        if gpu.empty:
            from hstu_exp.report.aggregate import SweepError

            raise SweepError(f"{p}: no ok GPU records (device=cuda): the goals are GPU numbers")
        frames.append(gpu)
    return pd.concat(frames, ignore_index=True)


def _judged_invalid(v) -> bool:
    if v is None or pd.isna(v):
        return False  # not judged (older records)
    return str(v).strip().lower() == "false"


def _valid(r) -> str:
    v = r.get("valid")
    return "-" if v is None or pd.isna(v) else ("NO" if _judged_invalid(v) else "yes")


def _met(ok: bool, *validity) -> str:
    """'yes' only when the goal is met by points none of which was judged invalid."""
    if not ok:
        return "no"
    return "no (invalid point)" if any(map(_judged_invalid, validity)) else "yes"


def kernel_label(r) -> str:
    """triton, or triton/rule: the kernel options that differ from the default."""
    label = r.kernel
    if r.get("autotune") is False or str(r.get("autotune")) == "False":
        label += "/rule"
    return label


def block_table(df) -> list:
    from hstu_exp.report.aggregate import require

    block = df[df.workload == "block"]
    if block.empty:
        return []
    require(block, BLOCK_COLUMNS, "block records", "the block goal cases need them")
    block = block[(block.total_history == 4096) & (block.num_candidates == 256)]
    lines = [
        "| block case | cache | kernel | graph | median ms | floor ms | valid | goal ms | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b, n, goal in BLOCK:
        rows = block[(block.batch_size == b) & (block.new_history == n)]
        for _, r in rows.sort_values(["kernel", "graph", "cache"]).iterrows():
            lines.append(
                f"| {name} | {r.cache} | {kernel_label(r)} | {r.graph} | "
                f"{r.median_ms:.3f} | {r.floor_ms:.3f} | {_valid(r)} | <= {goal} | "
                f"{_met(r.median_ms <= goal, r.get('valid'))} |"
            )
    return lines if len(lines) > 2 else []


def attention_table(df) -> list:
    att = df[df.workload == "attention"]
    if att.empty or "tflops" not in att:
        return []
    lines = [
        "| attention | kernel | B | T | n | median ms | TFLOP/s | rel err | valid | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in att.sort_values(["kernel", "batch_size", "total_history", "new_history"]).iterrows():
        err = r.get("max_rel_error")
        goal = ATTENTION.get((r.batch_size, r.cache, r.new_history)) if r.total_history == 4096 else None
        lines.append(
            f"| {r.cache} | {r.kernel} | {r.batch_size} | {r.total_history} | "
            f"{r.new_history:.0f} | {r.median_ms:.3f} | {r.tflops:.0f} | "
            + ("-" if pd.isna(err) else f"{err:.1e}")
            + f" | {_valid(r)} | "
            + ("- | - |" if goal is None else f">= {goal} | {_met(r.tflops >= goal, r.get('valid'))} |")
        )
    return lines


def e2e_table(df) -> list:
    from hstu_exp.report.aggregate import e2e_speedups

    sp = e2e_speedups(df)
    if sp.empty:
        return []
    # the speedup is the ratio of pass totals (report.aggregate.e2e_speedups)
    lines = [
        "| e2e mode | B | median ms/batch | pass ms | baseline pass ms | speedup | 95% CI | "
        "candidates/s | valid | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in sp.sort_values(["mode", "batch_size"]).iterrows():
        ci = "-" if pd.isna(r.ci_low) else f"{r.ci_low:.2f}-{r.ci_high:.2f}x"
        cps = r.get("throughput_cps")
        goal, met = "-", "-"
        if r["mode"] == "cache_graph":
            goal = f">= {E2E_SPEEDUP:g}x, CI above" + (
                f"; <= {E2E_MS[r.batch_size]} ms" if r.batch_size in E2E_MS else ""
            )
            fast_enough = r.median_ms <= E2E_MS.get(r.batch_size, float("inf"))
            if fast_enough and pd.isna(r.ci_low):
                met = "unknown (no samples for the interval)"
            else:
                met = _met(
                    fast_enough and r.ci_low > E2E_SPEEDUP, r.get("valid"), r.get("baseline_valid")
                )
        lines.append(
            f"| {r['mode']} | {r.batch_size} | {r.median_ms:.2f} | {r.total_ms:.2f} | "
            f"{r.baseline_total_ms:.2f} | {r.speedup:.2f}x | {ci} | "
            + ("-" if pd.isna(cps) else f"{cps:.0f}")
            + f" | {_valid(r)} | {goal} | "
            f"{met} |"
        )
    return lines


def main(argv=None) -> int:
    p = OneLineParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "sweeps", nargs="+", type=Path, metavar="SWEEP", help="sweep dir, results.csv or results.jsonl"
    )
    args = p.parse_args(argv)
    from hstu_exp.report.aggregate import SweepError

    try:
        df = load(args.sweeps)
        tables = [t for t in (block_table(df), attention_table(df), e2e_table(df)) if t]
    except SweepError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not tables:
        print(
            f"{PROG}: error: no goal case in {', '.join(map(str, args.sweeps))} (block at "
            "T=4096 with 256 candidates, attention, or e2e with a baseline)",
            file=sys.stderr,
        )
        return 2
    print("\n\n".join("\n".join(t) for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
