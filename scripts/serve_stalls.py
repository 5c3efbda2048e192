"""Where a real-clock serving run's time went: each point's batches (host work, device span, the
lag from the device's end to the answer) and the requests slower than a bound, lined up against
the batches ahead of them and Python's collector (`batches.csv`, `collections.csv`,
`requests.csv` beside each record).

    python scripts/serve_stalls.py <sweep dir> [--slow-ms 40]

One block per point that left its files, failed ones too (marked, with their error): host ms a
batch and a request, the device's busy share, device ms and answer lag a batch (p50, p99,
max); the host work's phases (p50/p99) and which phase was longest in each batch whose host work
stalled (runs whose batches.csv has them); the requests that missed the KV cache, the batches
that carried them and their share of the device time; the collector's pauses; the slow
requests and what held them. Exit 0. A slow request is blamed on what held the worker while it
waited: a collection that paused every thread, a batch whose host work or answer lag was long,
or the device; "queue" when none of those stands out (the rate alone).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hstu_exp.serving.worker import WORKER_PHASES  # noqa: E402
from hstu_exp.tracking.records import read_records  # noqa: E402

LONG_MS = 10.0  # a host phase, answer lag or pause this long is a stall, not ordinary work


def describe(job: Path, slow_ms: float) -> list[str]:
    b = pd.read_csv(job / "batches.csv")
    r = pd.read_csv(job / "requests.csv")
    c = pd.read_csv(job / "collections.csv")
    b["lag_ms"] = 1e3 * (b.finish_s - b[["device_end_s", "launched_s"]].max(axis=1))
    span = b.finish_s.max() - b.start_s.min()
    lines = [
        f"  {len(r)} requests, {len(b)} batches (mean size {b['size'].mean():.2f}), device busy "
        f"{b.device_ms.sum() / 1e3 / span if span > 0 else 0:.2f} of the batches' span"
    ]
    # Host work a request: at the max rate it, not the device, sets how many batches fit.
    b["host_ms/req"] = b.host_ms / b["size"]
    for name in ("host_ms", "host_ms/req", "device_ms", "lag_ms"):
        q = b[name].quantile([0.5, 0.99])
        lines.append(f"  {name:11s} p50 {q[0.5]:7.2f}  p99 {q[0.99]:7.2f}  max {b[name].max():7.2f}")
    # runs since the worker split its host work by phase (batches.csv's host_<phase>_ms)
    phases = {f"host_{name}_ms": name for name in WORKER_PHASES if f"host_{name}_ms" in b}
    if phases:
        parts = "  ".join(
            f"{name} {b[k].quantile(0.5):.2f}/{b[k].quantile(0.99):.2f}" for k, name in phases.items()
        )
        lines.append(f"  host phases, ms p50/p99: {parts}")
        stalls = b[b.host_ms > LONG_MS]
        if len(stalls):
            longest = stalls[list(phases)].idxmax(axis=1).map(phases).value_counts()
            lines.append(
                f"  host work over {LONG_MS:g} ms: {len(stalls)} batches, by their longest phase: "
                + ", ".join(f"{k} {v}" for k, v in longest.items())
            )
    lines += _misses(b, r)
    full = c[c.generation == 2]
    lines.append(
        f"  collector: {len(c)} collections ({len(full)} full), pauses over {LONG_MS:g} ms: "
        f"{int((c.pause_ms > LONG_MS).sum())}, longest {c.pause_ms.max() if len(c) else 0:.1f} ms"
    )
    slow = r[r.latency_ms > slow_ms]
    if slow.empty:
        return lines + [f"  no request over {slow_ms:g} ms"]
    pauses = c[c.pause_ms > LONG_MS]
    stalled = b[(b.host_ms > LONG_MS) | (b.lag_ms > LONG_MS)]
    blame = {"collector": 0, "host work": 0, "answer lag": 0, "device": 0, "queue": 0}
    for _, q in slow.iterrows():
        start, end = q.arrival_s, q.finish_s
        if ((pauses.start_s < end) & (pauses.start_s + pauses.pause_ms / 1e3 > start)).any():
            blame["collector"] += 1
            continue
        ahead = stalled[(stalled.start_s < end) & (stalled.finish_s > start)]
        if (ahead.host_ms > LONG_MS).any():
            blame["host work"] += 1
        elif len(ahead):
            blame["answer lag"] += 1
        elif q.service_ms > slow_ms / 2:
            blame["device"] += 1
        else:
            blame["queue"] += 1
    share = ", ".join(f"{k} {v}" for k, v in blame.items() if v)
    return lines + [f"  {len(slow)} requests over {slow_ms:g} ms ({len(slow) / len(r):.2%}): {share}"]


def _misses(b: pd.DataFrame, r: pd.DataFrame) -> list[str]:
    """A miss recomputes a user's whole history: a few such batches can hold most of the device
    time, whatever the rate (a pool smaller than the population misses at any load)."""
    missed = r.tier.eq("miss")
    if not missed.any():
        return ["  KV misses: none"]
    keys = ["replica", "batch"] if "replica" in r and "replica" in b else ["batch"]
    held = r.assign(miss=missed).groupby(keys).miss.any().rename("holds_miss").reset_index()
    b = b.merge(held, on=keys, how="left")
    carries = b.holds_miss.eq(True)  # a batch no request names carries no miss
    with_miss, rest = b[carries], b[~carries]
    share = with_miss.device_ms.sum() / b.device_ms.sum()
    return [
        f"  KV misses: {int(missed.sum())} requests ({missed.mean():.2%}) in {len(with_miss)} "
        f"batches ({len(with_miss) / len(b):.1%}), {share:.0%} of the device time; device ms "
        f"p50 {with_miss.device_ms.median():.2f} with a miss, {rest.device_ms.median():.2f} without"
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--slow-ms", type=float, default=40.0)
    args = ap.parse_args(argv)
    newest = {}  # a job dir's files are its last run's: described with its newest record
    for rec in read_records(args.sweep_dir):
        job = Path(rec.get("job_dir") or "")
        if not job.exists():  # a sweep copied off the machine that ran it: its own job dirs
            job = args.sweep_dir / job.name
        newest[job] = rec
    for job, rec in newest.items():
        if not (job / "batches.csv").exists():
            print(f"{job.name}: status {rec.get('status')}, no batches.csv: nothing to describe")
            continue
        knobs = ", ".join(
            f"{k}={rec.get(k)}"
            for k in ("cache", "cache_dtype", "graph", "policy", "gc_freeze", "switch_interval_ms")
        )
        if rec.get("status") == "ok":
            print(
                f"{job.name}: {knobs}, {rec.get('target_qps')} qps, p99 {rec.get('p99_ms'):.1f} ms, "
                f"{rec.get('verdict')}, busy {rec.get('busy_fraction') or 0:.2f}"
            )
        else:  # its run's files still say where the time went (e.g. a gate failed after it)
            print(f"{job.name}: {knobs}, status {rec.get('status')}: {rec.get('error')}")
        print("\n".join(describe(job, args.slow_ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
