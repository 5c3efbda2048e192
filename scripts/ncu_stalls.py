#!/usr/bin/env python3
"""Where a kernel's warps wait, from an Nsight Compute source-page export (runs anywhere).

    # on the GPU machine (ncu there; --clock-control none leaves the clocks alone)
    ncu --clock-control none --set full --import-source yes -k regex:_hstu_fwd -c 1 -o rep \
        python3 scripts/gpu_attention_check.py --one pagedB=1
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep_sass.csv
    # anywhere
    python3 scripts/ncu_stalls.py rep_sass.csv

Prints the stall reasons over all warp samples, the code regions (runs of SASS executed equally
often: the prologue once a program, a loop body once an iteration, ...) with their share of the
samples, and the opcodes that collect the most samples with their top reasons. A loop body's
share against the prologue's and epilogue's says whether a program's fixed cost or its inner
loop is the time; a loop stalled on long_sb right after DEPBAR waits for its tiles.
"""

import argparse
import collections
import csv
import re
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next((i for i, r in enumerate(rows) if SAMPLES in r), None)
    if head is None:
        sys.exit(
            f"ncu_stalls.py: error: {path}: no '{SAMPLES}' column (export with --page source "
            "--csv --print-source sass)"
        )
    names = rows[head]
    return [dict(zip(names, r)) for r in rows[head + 1 :] if len(r) >= len(names)]


def opcode(source: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", source.strip()).split(" ")[0]


def num(text) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def summary(path, top: int = 12, min_share: float = 0.01) -> None:
    data = read(path)
    reasons = [k for k in data[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(num(r[SAMPLES]) for r in data) or 1.0
    print(f"== {path}: {total:.0f} samples, {len(data)} instructions")
    by_reason = collections.Counter({k[6:]: sum(num(r[k]) for r in data) for k in reasons})
    print("stall reasons: " + ", ".join(f"{k} {v / total:.1%}" for k, v in by_reason.most_common(8)))
    regions = []  # [executions, first, last, samples]
    for i, r in enumerate(data):
        runs = r.get("Instructions Executed", "")
        if regions and regions[-1][0] == runs:
            regions[-1][2], regions[-1][3] = i, regions[-1][3] + num(r[SAMPLES])
        else:
            regions.append([runs, i, i, num(r[SAMPLES])])
    print("| SASS lines | executed (warp-level) | share | main opcodes |\n|---|---|---|---|")
    for runs, a, b, s in regions:
        if s / total >= min_share:
            ops = collections.Counter(opcode(data[j]["Source"]) for j in range(a, b + 1))
            print(
                f"| {a}-{b} | {runs} | {s / total:.1%} | "
                f"{', '.join(f'{o} x{n}' for o, n in ops.most_common(4))} |"
            )
    by_op, op_reasons = collections.Counter(), collections.defaultdict(collections.Counter)
    for r in data:
        op = opcode(r["Source"])
        by_op[op] += num(r[SAMPLES])
        for k in reasons:
            op_reasons[op][k[6:]] += num(r[k])
    print("| opcode | share | top reasons |\n|---|---|---|")
    for op, s in by_op.most_common(top):
        why = ", ".join(f"{k} {v / total:.1%}" for k, v in op_reasons[op].most_common(2))
        print(f"| {op} | {s / total:.1%} | {why} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ncu_stalls.py", description=__doc__.split("\n")[0])
    ap.add_argument("exports", nargs="+", help="ncu --page source --csv --print-source sass files")
    ap.add_argument("--top", type=int, default=12, help="opcodes to list")
    args = ap.parse_args(argv)
    for path in args.exports:
        summary(path, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
