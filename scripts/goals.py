#!/usr/bin/env python3
"""The performance-goal table (docs/design.md, performance goals) from GPU sweeps.

    scripts/goals.py SWEEP [SWEEP ...]

SWEEP is a sweep dir, a results.csv or a results.jsonl (as for hstu-exp-compare). The goals are
stated for a GPU: the ok records with device=cuda are used, and a sweep without any is refused.
Prints markdown tables: the block goal cases, the attention points, the e2e speedups over
baseline with their 95 % bootstrap intervals. Exit status 0, or 2 on bad input (one line).
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a source tree too
try:
    import pandas as pd
except ImportError:  # started as `scripts/goals.py` by a python without the project's packages
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists() and not os.environ.get("HSTU_EXP_REEXEC"):
        os.environ["HSTU_EXP_REEXEC"] = "1"
        os.execv(str(venv), [str(venv), *sys.argv])
    sys.exit("goals.py: error: pandas is missing: install the project (make setup) and run "
             "with .venv/bin/python")

PROG = "goals.py"
BLOCK = [("batch 1, cached", 1, 128, 0.35), ("batch 8, cached", 8, 128, 1.4),
         ("batch 1, full recompute", 1, 4096, 1.5), ("batch 8, full recompute", 8, 4096, 9.5)]
BLOCK_COLUMNS = ["workload", "cache", "kernel", "graph", "batch_size", "total_history",
                 "new_history", "num_candidates", "median_ms", "floor_ms"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


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
    lines = ["| block case | cache | kernel | graph | median ms | floor ms | goal ms |",
             "|---|---|---|---|---|---|---|"]
    for name, b, n, goal in BLOCK:
        rows = block[(block.batch_size == b) & (block.new_history == n)]
        for _, r in rows.sort_values(["kernel", "graph", "cache"]).iterrows():
            lines.append(f"| {name} | {r.cache} | {kernel_label(r)} | {r.graph} | "
                         f"{r.median_ms:.3f} | {r.floor_ms:.3f} | {goal} |")
    return lines if len(lines) > 2 else []


def attention_table(df) -> list:
    att = df[df.workload == "attention"]
    if att.empty or "tflops" not in att:
        return []
    lines = ["| attention | kernel | B | T | n | median ms | TFLOP/s | rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in att.sort_values(["kernel", "batch_size", "total_history",
                                 "new_history"]).iterrows():
        err = r.get("max_rel_error")
        lines.append(f"| {r.cache} | {r.kernel} | {r.batch_size} | {r.total_history} | "
                     f"{r.new_history} | {r.median_ms:.3f} | {r.tflops:.0f} | "
                     + ("-" if pd.isna(err) else f"{err:.1e}") + " |")
    return lines


def e2e_table(df) -> list:
    from hstu_exp.report.aggregate import e2e_speedups

    sp = e2e_speedups(df)
    if sp.empty:
        return []
    lines = ["| e2e mode | B | median ms/batch | baseline ms | speedup | 95% CI | candidates/s |",
             "|---|---|---|---|---|---|---|"]
    for _, r in sp.sort_values(["mode", "batch_size"]).iterrows():
        ci = "-" if pd.isna(r.ci_low) else f"{r.ci_low:.2f}-{r.ci_high:.2f}x"
        cps = r.get("throughput_cps")
        lines.append(f"| {r['mode']} | {r.batch_size} | {r.median_ms:.2f} | "
                     f"{r.baseline_median_ms:.2f} | {r.speedup:.2f}x | {ci} | "
                     + ("-" if pd.isna(cps) else f"{cps:.0f}") + " |")
    return lines


def main(argv=None) -> int:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("sweeps", nargs="+", type=Path, metavar="SWEEP",
                   help="sweep dir, results.csv or results.jsonl")
    args = p.parse_args(argv)
    from hstu_exp.report.aggregate import SweepError

    try:
        df = load(args.sweeps)
        tables = [t for t in (block_table(df), attention_table(df), e2e_table(df)) if t]
    except SweepError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not tables:
        print(f"{PROG}: error: no goal case in {', '.join(map(str, args.sweeps))} (block at "
              "T=4096 with 256 candidates, attention, or e2e with a baseline)", file=sys.stderr)
        return 2
    print("\n\n".join("\n".join(t) for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
