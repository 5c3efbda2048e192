"""One JSON object per sweep point in `<job dir>/results.jsonl`, on disk before anything else.

A record is flat: status (ok | skipped | failed), reason / error, the swept keys (SWEPT_KEYS),
latency stats (median_ms, p10_ms, p90_ms, mean_ms, min_ms, max_ms, iterations, samples_ms),
roofline (flops, min_bytes, floor_ms, floor_fraction, floor_bound, peak_tflops, peak_gbps),
memory (mem_allocated_bytes, mem_reserved_bytes, kv_pool_bytes), graph bucket (bucket,
padded_tokens), max_rel_error when verify=true, workload extras, and the environment (ENV_KEYS).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

RESULTS_FILE = "results.jsonl"

# Keys that identify a point: records of two sweeps are joined on these, and a speedup pairs
# two records that agree on all of them but the compared one.
SWEPT_KEYS = ["workload", "model", "dtype", "cache", "page_size", "kernel", "graph", "mode",
              "batch_size", "total_history", "new_history", "num_candidates", "device"]
ENV_KEYS = ["device_name", "driver", "cuda", "torch", "triton", "torchrec", "fbgemm", "git_sha",
            "hostname"]
STATS_KEYS = ["median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "iterations"]


def append_record(job_dir: Path, record: dict) -> Path:
    path = Path(job_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_records(root: Path) -> Iterator[dict]:
    """Every record under `root` (a job dir or a whole sweep dir), in path order.
    A torn last line (a point killed mid-write) is passed over."""
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        for line in path.read_text().splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
