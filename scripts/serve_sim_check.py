"""The simulator against the real server: for every configuration and rate a sweep ran on both
clocks (workload.clock=real,simulated), the simulated (predicted) p50 / p99 beside LoadGen's
measured ones, and where the prediction is off by more than 25 %.

    hstu-exp -m experiment=serve_qps workload.clock=real,simulated     # on the GPU
    python scripts/serve_sim_check.py <sweep dir>

Prints one line per pair; exit 0. The simulator is a what-if tool: docs/serving.md gives the
errors this found on the GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hstu_exp.serving.stats import relative_gap  # noqa: E402
from hstu_exp.tracking.records import read_records  # noqa: E402

# What makes two points the same configuration at the same rate, besides the clock.
SAME = (
    "model",
    "cache",
    "kernel",
    "graph",
    "mode",
    "batch_size",
    "qps",
    "num_candidates",
    "max_wait_ms",
    "num_users",
    "user_skew",
    "items_per_return",
)
OFF = 0.25


def pairs(records):
    by_key = {}
    for r in records:
        if r.get("workload") != "serve" or r.get("status") != "ok" or r.get("qps") is None:
            continue
        by_key.setdefault(tuple(r.get(k) for k in SAME), {})[r.get("clock")] = r
    return [
        (key, both["simulated"], both["real"])
        for key, both in sorted(by_key.items(), key=lambda kv: [str(v) for v in kv[0]])
        if "simulated" in both and "real" in both
    ]


def compare(records) -> list:
    """One dict per configuration and rate that ran on both clocks: its name, the rate, the
    simulated (predicted) and real (measured) p50 / p99 and their relative gaps (None where a
    side lacks the percentile)."""
    rows = []
    for key, sim, real in pairs(records):
        row = {"configuration": "-".join(str(key[i]) for i in (1, 3, 4)) + f"-b{key[5]}", "qps": key[6]}
        for p in ("p50", "p99"):
            row[f"{p}_sim"] = sim.get(f"{p}_ms", float("nan"))
            row[f"{p}_real"] = real.get(f"{p}_ms", float("nan"))
            row[f"{p}_gap"] = relative_gap(sim.get(f"{p}_ms"), real.get(f"{p}_ms"))
        rows.append(row)
    return rows


def gap_note(gap) -> str:
    """'+12%', or '-40% OFF BY MORE THAN 25 %' beyond OFF; '' where unknown."""
    if gap is None:
        return ""
    return f"{gap:+.0%}" + (" OFF BY MORE THAN 25 %" if abs(gap) > OFF else "")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: serve_sim_check.py <sweep dir>", file=sys.stderr)
        return 2
    found = compare(read_records(Path(argv[0])))
    if not found:
        print(
            f"serve_sim_check: error: {argv[0]}: no serve point ran on both clocks at one rate",
            file=sys.stderr,
        )
        return 2
    print(
        f"{'configuration':<44} {'qps':>7} {'p50 sim':>8} {'p50 real':>8} {'p99 sim':>8} "
        f"{'p99 real':>8}  simulated vs real"
    )
    for r in found:
        notes = [f"{p} {gap_note(r[f'{p}_gap'])}" for p in ("p50", "p99") if r[f"{p}_gap"] is not None]
        print(
            f"{r['configuration']:<44} {r['qps']:>7g} {r['p50_sim']:>8.2f} {r['p50_real']:>8.2f} "
            f"{r['p99_sim']:>8.2f} {r['p99_real']:>8.2f}  {', '.join(notes)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
