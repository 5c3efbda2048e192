#!/usr/bin/env python3
"""The performance-goal table (DESIGN §6) from sweep dirs or results.csv files.
    scripts/goals.py SWEEP [SWEEP ...]
"""
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hstu_exp.report.aggregate import speedups  # noqa: E402

BLOCK = [("batch 1, cached", 1, 128, 0.35), ("batch 8, cached", 8, 128, 1.4),
         ("batch 1, full recompute", 1, 4096, 1.5), ("batch 8, full recompute", 8, 4096, 9.5)]


def load(paths):
    frames = []
    for p in map(Path, paths):
        csv = p if p.suffix == ".csv" else p / "results.csv"
        frames.append(pd.read_csv(csv))
    df = pd.concat(frames, ignore_index=True)
    return df[df["status"] == "ok"]


def kernel_label(r) -> str:
    """triton, or triton/rule: the kernel options that differ from the default."""
    label = r.kernel
    if r.get("autotune") is False or str(r.get("autotune")) == "False":
        label += "/rule"
    return label


def main(paths):
    df = load(paths)
    block = df[(df.workload == "block") & (df.total_history == 4096) & (df.num_candidates == 256)]
    print("| block case | cache | kernel | graph | median ms | floor ms | goal ms |")
    print("|---|---|---|---|---|---|---|")
    for name, b, n, goal in BLOCK:
        rows = block[(block.batch_size == b) & (block.new_history == n)]
        for _, r in rows.sort_values(["kernel", "graph", "cache"]).iterrows():
            print(f"| {name} | {r.cache} | {kernel_label(r)} | {r.graph} | {r.median_ms:.3f} | "
                  f"{r.floor_ms:.3f} | {goal} |")
    att = df[df.workload == "attention"]
    if len(att):
        print("\n| attention | kernel | B | T | n | median ms | TFLOP/s | rel err |")
        print("|---|---|---|---|---|---|---|---|")
        for _, r in att.sort_values(["kernel", "batch_size", "total_history", "new_history"]).iterrows():
            print(f"| {r.cache} | {r.kernel} | {r.batch_size} | {r.total_history} | "
                  f"{r.new_history} | {r.median_ms:.3f} | {r.tflops:.0f} | {r.max_rel_error:.1e} |")
    e2e = df[df.workload == "e2e"]
    if len(e2e):
        sp = speedups(e2e, key="mode", baseline="baseline", ignore=("cache", "graph", "page_size"))
        print("\n| e2e mode | B | median ms/batch | baseline ms | speedup | candidates/s |")
        print("|---|---|---|---|---|---|")
        for _, r in sp.sort_values(["mode", "batch_size"]).iterrows():
            print(f"| {r['mode']} | {r.batch_size} | {r.median_ms:.2f} | "
                  f"{r.baseline_median_ms:.2f} | {r.speedup:.2f}x | {r.throughput_cps:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
