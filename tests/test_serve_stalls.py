"""scripts/serve_stalls.py: a slow request is blamed on what held the worker while it waited, on
a run's files written here with one stall of each kind at known times."""

import csv
import importlib.util

from helpers import ROOT

from hstu_exp.serving.outcome import BATCH_COLUMNS, COLLECTION_COLUMNS, REQUEST_COLUMNS
from hstu_exp.serving.worker import WORKER_PHASES

spec = importlib.util.spec_from_file_location("serve_stalls", ROOT / "scripts" / "serve_stalls.py")
serve_stalls = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_stalls)


def write(path, columns, rows):
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=columns, restval=0)
        out.writeheader()
        out.writerows(rows)


def batch(n, start, host_ms, device_ms, lag_ms, longest="launch"):
    launched = start + host_ms / 1e3
    end = launched + device_ms / 1e3
    phases = {f"host_{name}_ms": host_ms / 20 for name in WORKER_PHASES}
    phases[f"host_{longest}_ms"] = host_ms / 2
    return dict(
        **phases,
        batch=n,
        size=1,
        start_s=start,
        launched_s=launched,
        device_start_s=launched,
        device_end_s=end,
        finish_s=end + lag_ms / 1e3,
        host_ms=host_ms,
        device_ms=device_ms,
    )


def request(i, arrival, b):
    return dict(
        request=i,
        arrival_s=arrival,
        start_s=b["start_s"],
        finish_s=b["finish_s"],
        latency_ms=1e3 * (b["finish_s"] - arrival),
        batch=b["batch"],
        batch_size=1,
        service_ms=1e3 * (b["finish_s"] - b["start_s"]),
        tier="gpu",
    )


def test_each_slow_request_is_blamed_on_the_stall_it_waited_behind(tmp_path):
    batches = [
        batch(0, 0.000, 1.0, 1.0, 0.0),  # quick: its request is not slow
        batch(1, 1.000, 1.0, 1.0, 0.0),  # waits behind the 60 ms collection at 0.95 s
        batch(2, 2.000, 45.0, 1.0, 0.0, "plan"),  # its own host work stalled, in planning
        batch(3, 3.000, 1.0, 1.0, 30.0),  # the answer came 30 ms after the device was done
        batch(4, 4.000, 1.0, 50.0, 0.0),  # a long device span
        batch(5, 5.000, 1.0, 1.0, 0.0),  # arrived 60 ms before a quick batch: queueing alone
    ]
    arrivals = [0.0, 0.95, 2.0, 2.99, 4.0, 4.94]
    requests = [request(i, a, b) for i, (a, b) in enumerate(zip(arrivals, batches))]
    write(tmp_path / "batches.csv", BATCH_COLUMNS, batches)
    write(tmp_path / "requests.csv", REQUEST_COLUMNS, requests)
    write(
        tmp_path / "collections.csv",
        COLLECTION_COLUMNS,
        [dict(start_s=0.95, generation=2, pause_ms=60.0), dict(start_s=3.5, generation=0, pause_ms=0.2)],
    )
    text = "\n".join(serve_stalls.describe(tmp_path, slow_ms=20.0))
    assert "6 requests, 6 batches" in text
    assert "2 collections (1 full), pauses over 10 ms: 1, longest 60.0 ms" in text
    assert (
        "5 requests over 20 ms (83.33%): collector 1, host work 1, answer lag 1, device 1, queue 1"
        in text
    )
    assert "host_ms     p50    1.00" in text and "max   45.00" in text
    assert "host_ms/req p50    1.00" in text  # batches of one: the same as a batch
    assert "host phases, ms p50/p99: request 0.05/" in text and " launch 0.50/" in text
    assert "host work over 10 ms: 1 batches, by their longest phase: plan 1" in text
    assert "KV misses: none" in text


def test_the_batches_that_carry_a_cache_miss_and_their_device_time(tmp_path):
    """Two of four batches carry a miss (a full recompute, 9 ms of device time each against 1):
    90 % of the device time, 2 of 8 requests."""
    batches = [{**batch(n, float(n), 1.0, 9.0 if n % 2 else 1.0, 0.0), "size": 2} for n in range(4)]
    requests = [request(2 * n + i, float(n), b) for n, b in enumerate(batches) for i in range(2)]
    for q in requests:
        q["tier"] = "miss" if q["batch"] % 2 and q["request"] % 2 else "gpu"
    write(tmp_path / "batches.csv", BATCH_COLUMNS, batches)
    write(tmp_path / "requests.csv", REQUEST_COLUMNS, requests)
    write(tmp_path / "collections.csv", COLLECTION_COLUMNS, [])
    text = "\n".join(serve_stalls.describe(tmp_path, slow_ms=20.0))
    assert (
        "KV misses: 2 requests (25.00%) in 2 batches (50.0%), 90% of the device time; "
        "device ms p50 9.00 with a miss, 1.00 without" in text
    )


def test_host_work_a_request_divides_by_the_batch_size(tmp_path):
    batches = [{**batch(n, float(n), 2.0 * (n + 1), 1.0, 0.0), "size": 4} for n in range(3)]
    requests = [request(4 * n + i, float(n), b) for n, b in enumerate(batches) for i in range(4)]
    write(tmp_path / "batches.csv", BATCH_COLUMNS, batches)
    write(tmp_path / "requests.csv", REQUEST_COLUMNS, requests)
    write(tmp_path / "collections.csv", COLLECTION_COLUMNS, [])
    text = "\n".join(serve_stalls.describe(tmp_path, slow_ms=20.0))
    assert "12 requests, 3 batches (mean size 4.00)" in text
    assert "host_ms     p50    4.00" in text and "max    6.00" in text
    assert "host_ms/req p50    1.00" in text and "max    1.50" in text


def test_a_failed_point_with_its_files_is_described_and_one_without_is_named(tmp_path, capsys):
    """A point whose gate failed after its run still left where the time went: described,
    marked with its status and error; a point without files gets one line, not silence. Four
    batches 10 ms apart, each 5 ms on the device: busy 20 ms of a 36 ms span."""
    import json

    job = tmp_path / "0"
    job.mkdir()
    batches = [batch(n, 0.010 * n, 1.0, 5.0, 0.0) for n in range(4)]
    write(job / "batches.csv", BATCH_COLUMNS, batches)
    write(
        job / "requests.csv", REQUEST_COLUMNS, [request(n, 0.010 * n, b) for n, b in enumerate(batches)]
    )
    write(job / "collections.csv", COLLECTION_COLUMNS, [])
    error = "AccuracyGateError: accuracy gate of cache.dtype=fp8 failed: no verify result (not timed)"
    records = [  # point 0 failed before its resume too: its files are the newest run's
        {"status": "failed", "error": "an earlier run", "job_dir": "/elsewhere/0"},
        {"status": "failed", "error": error, "job_dir": "/elsewhere/0", "cache_dtype": "fp8"},
        {"status": "skipped", "reason": "needs a CUDA GPU", "job_dir": "/elsewhere/1"},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert serve_stalls.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0: cache=None, cache_dtype=fp8, graph=None" in out and f"status failed: {error}" in out
    assert (
        out.count("4 requests, 4 batches (mean size 1.00), device busy 0.56 of the batches' span") == 1
    )
    assert "an earlier run" not in out
    assert "1: status skipped, no batches.csv: nothing to describe" in out
