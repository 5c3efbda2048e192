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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: serve_sim_check.py <sweep dir>", file=sys.stderr)
        return 2
    found = pairs(read_records(Path(argv[0])))
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
    for key, sim, real in found:
        name = "-".join(str(key[i]) for i in (1, 3, 4)) + f"-b{key[5]}"
        gaps = {p: relative_gap(sim.get(f"{p}_ms"), real.get(f"{p}_ms")) for p in ("p50", "p99")}
        notes = [
            f"{p} {g:+.0%}" + (" OFF BY MORE THAN 25 %" if abs(g) > OFF else "")
            for p, g in gaps.items()
            if g is not None
        ]
        print(
            f"{name:<44} {key[6]:>7g} {sim.get('p50_ms', float('nan')):>8.2f} "
            f"{real.get('p50_ms', float('nan')):>8.2f} {sim.get('p99_ms', float('nan')):>8.2f} "
            f"{real.get('p99_ms', float('nan')):>8.2f}  {', '.join(notes)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
