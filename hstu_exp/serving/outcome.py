"""What a real-clock run measured, for the record and requests.csv: the server's side of each
query (arrival at the SUT, batch start, answer), its batches (host and device time), tiers and
bytes. LoadGen's own verdict and percentiles come from its log (`loadgen_sut.read_detail`)."""

from __future__ import annotations

import csv
from pathlib import Path
from statistics import median
from typing import List

from hstu_exp.serving.path import TIERS
from hstu_exp.serving.stats import percentile, user_shares
from hstu_exp.serving.worker import WORKER_PHASES, busy_fraction

REQUEST_COLUMNS = (
    "request",
    "user",
    "arrival_s",
    "start_s",
    "finish_s",
    "latency_ms",
    "queue_ms",
    "service_ms",
    "batch",
    "batch_size",
    "tier",
    "history",
    "candidates",
    "cached_tokens",
    "tokens_computed",
    "onloaded_bytes",
    "offloaded_bytes",
    "counted",
    "replica",
)


# batches.csv of a real run: each batch's timeline (seconds from the run's start): its host work
# from start_s to launched_s (host_ms, split by phase in host_<phase>_ms), its device work from
# device_start_s to device_end_s, answered at finish_s. With the collector's pauses
# (collections.csv) it shows where a slow request waited.
BATCHES_FILE = "batches.csv"
COLLECTIONS_FILE = "collections.csv"
BATCH_COLUMNS = (
    "replica",
    "batch",
    "size",
    "start_s",
    "launched_s",
    "device_start_s",
    "device_end_s",
    "finish_s",
    "host_ms",
    "device_ms",
    "first_use",
    *(f"host_{name}_ms" for name in WORKER_PHASES),
)
COLLECTION_COLUMNS = ("start_s", "generation", "pause_ms")


def latencies_ms(rows: List[dict]) -> List[float]:
    """The server's side of each query's latency (arrival at the SUT to the answer), in
    request order."""
    return [1e3 * (r["finish_s"] - r["arrival_s"]) for r in rows]


def run_stats(rows: List[dict], batches: List[dict], max_batch: int) -> dict:
    """Record keys of a real run from the worker's log (rows in request order)."""
    n = max(len(rows), 1)
    lat = latencies_ms(rows)
    first = min((r["arrival_s"] for r in rows), default=0.0)
    last = max((r["finish_s"] for r in rows), default=first)
    wall_ms = 1e3 * (last - first)
    hist = [0] * max_batch
    for b in batches:
        hist[b["size"] - 1] += 1
    tiers = {t: sum(r["tier"] == t for r in rows) for t in TIERS}
    spans = [(a - 1e3 * first, b - 1e3 * first) for a, b in (x["span_ms"] for x in batches)]
    return {
        "requests": len(rows),
        "requests_total": len(rows),
        "batches": len(batches),
        "batch_size_hist": hist,
        "mean_batch_size": sum(b["size"] for b in batches) / max(len(batches), 1),
        "server_p50_ms": percentile(sorted(lat), 50),
        "server_p99_ms": percentile(sorted(lat), 99),
        "queue_p50_ms": percentile(sorted(1e3 * (r["start_s"] - r["arrival_s"]) for r in rows), 50),
        "host_ms_per_batch": median(b["host_ms"] for b in batches) if batches else None,
        "device_ms_per_batch": median(b["device_ms"] for b in batches) if batches else None,
        "busy_fraction": busy_fraction(spans, wall_ms),
        **user_shares([r["user"] for r in rows], lat),
        **{f"{t}_requests": tiers[t] for t in TIERS},
        **{f"{t}_hit_rate" if t != "miss" else "miss_rate": tiers[t] / n for t in TIERS},
        "cached_tokens": sum(r["cached_tokens"] for r in rows),
        "computed_tokens": sum(r["tokens_computed"] for r in rows),
        "onloaded_bytes": sum(r["onloaded_bytes"] for r in rows),
        "offloaded_bytes": sum(r["offloaded_bytes"] for r in rows),
    }


def replica_stats(rows: List[dict], batches: List[dict], replicas: int, routing: dict) -> dict:
    """Per-replica record keys (lists indexed by replica) of a run on `replicas` replicas:
    each one's device-busy share of the whole run's wall time (first arrival to last answer),
    its requests and hit rates per tier; with the router's counts (`Router.stats`). The
    record's `busy_fraction` stays the replicas' mean (`replica_busy_fraction` the spread)."""
    first = min((r["arrival_s"] for r in rows), default=0.0)
    wall_ms = 1e3 * (max((r["finish_s"] for r in rows), default=first) - first)
    out: dict = {
        "replicas": replicas,
        "replica_busy_fraction": [],
        "replica_requests": [],
        "replica_host_ms_per_batch": [],
    }
    out.update({f"replica_{t}_hit_rate" if t != "miss" else "replica_miss_rate": [] for t in TIERS})
    for k in range(replicas):
        mine = [r for r in rows if r.get("replica", 0) == k]
        spans = [
            (a - 1e3 * first, b - 1e3 * first)
            for a, b in (x["span_ms"] for x in batches if x.get("replica", 0) == k)
        ]
        out["replica_busy_fraction"].append(busy_fraction(spans, wall_ms))
        # host time a batch (median): grows with N where the replicas' threads wait on the GIL
        host = [x["host_ms"] for x in batches if x.get("replica", 0) == k]
        out["replica_host_ms_per_batch"].append(median(host) if host else None)
        out["replica_requests"].append(len(mine))
        for t in TIERS:
            share = sum(r["tier"] == t for r in mine) / len(mine) if mine else None
            out[f"replica_{t}_hit_rate" if t != "miss" else "replica_miss_rate"].append(share)
    out.update(routing)
    known = [b for b in out["replica_busy_fraction"] if b is not None]
    out["busy_fraction"] = sum(known) / len(known) if known else None
    return out


def write_requests(rows: List[dict], path: Path) -> None:
    """requests.csv of a real run: every query LoadGen issued, in issue order (all counted:
    LoadGen judges every query)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(REQUEST_COLUMNS)
        for i, r in enumerate(rows):
            out.writerow(
                [
                    i,
                    r["user"],
                    round(r["arrival_s"], 9),
                    round(r["start_s"], 9),
                    round(r["finish_s"], 9),
                    _ms(r, "finish_s", "arrival_s"),
                    _ms(r, "start_s", "arrival_s"),
                    _ms(r, "finish_s", "start_s"),
                    r["batch"],
                    r["batch_size"],
                    r["tier"],
                    r["history"],
                    r["candidates"],
                    r["cached_tokens"],
                    r["tokens_computed"],
                    r["onloaded_bytes"],
                    r["offloaded_bytes"],
                    1,
                    r.get("replica", 0),
                ]
            )


def _ms(row: dict, end: str, start: str) -> float:
    return round(1e3 * (row[end] - row[start]), 6)


def write_batches(batches: List[dict], path: Path) -> None:
    """batches.csv of a real run, in answer order per replica."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(BATCH_COLUMNS)
        for b in batches:
            device = [round(ms / 1e3, 9) for ms in b["span_ms"]]
            times = [round(b[k], 9) for k in ("start_s", "launched_s")]
            ms = [round(b[k], 6) for k in ("host_ms", "device_ms")]
            row = [b.get("replica", 0), b["batch"], b["size"], *times, *device, round(b["finish_s"], 9)]
            phases = [round(b["host_phases"][name], 6) for name in WORKER_PHASES]
            out.writerow(row + ms + [b["first_use"]] + phases)


def write_collections(collections: List[tuple], path: Path) -> None:
    """collections.csv: each collection of the collector during a real run."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLLECTION_COLUMNS)
        for gen, ms, start in collections:
            out.writerow([round(start, 9), gen, round(ms, 6)])
