"""MLPerf LoadGen as the load generator of the real server (workload.clock=real).

LoadGen (`mlcommons-loadgen`, the harness of MLPerf Inference, DLRMv3 included) issues queries
on the wall clock: Poisson arrivals at `target_qps` in the Server scenario, or everything at once
in the Offline scenario. It measures each query from issue to `QuerySamplesComplete`, and judges
the run: the latency at the target percentile within the bound, the minimum duration and query
count, and its early-stopping rule (enough queries that the percentile bound holds with 99 %
confidence). Its summary and detail logs are kept; `read_detail` turns the detail log into the
record's verdict.

The SUT here only hands queries to the batcher and completes them with the ranking scores; who
each query is (user, history, candidates) comes from the population, in issue order.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

PACKAGE = "mlcommons-loadgen"
LOADGEN_MISSING = f"needs MLPerf LoadGen: pip install {PACKAGE}"


class LoadGenMissing(RuntimeError):
    """workload.clock=real without LoadGen installed."""


def loadgen():
    """The mlperf_loadgen module, or LoadGenMissing naming the package to install."""
    try:
        import mlperf_loadgen
    except ImportError:
        raise LoadGenMissing(f"workload.clock=real {LOADGEN_MISSING}") from None
    return mlperf_loadgen


@dataclass
class LoadGenTest:
    """One LoadGen run."""

    scenario: str  # server | offline
    target_qps: float  # server: the Poisson rate; offline: the expected rate (sizes the query)
    slo_ms: float
    slo_percentile: float
    min_duration_s: float
    min_query_count: int
    seed: int  # LoadGen's schedule (and sample) seed


class SUT:
    """The system under test as LoadGen sees it: `issue` on LoadGen's thread, `answer` on the
    worker's. `admit(samples)` registers the queries with the server (in issue order)."""

    def __init__(self, admit: Callable[[list], None]):
        self.lg = loadgen()
        self.admit = admit
        self.answered = 0

    def issue(self, samples) -> None:
        self.admit([(s.id, s.index) for s in samples])

    def flush(self) -> None:
        pass

    def answer(self, query_ids: List[int], scores: Optional[list]) -> None:
        """Completes queries: each with its candidates' scores (float32), or empty (scores None:
        a failed or interrupted run, so that LoadGen ends)."""
        lg = self.lg
        if scores is None:
            responses = [lg.QuerySampleResponse(qid, 0, 0) for qid in query_ids]
        else:
            # The tensors' own addresses (a numpy view's .ctypes costs more than the rest of
            # a response); `keep` holds them until LoadGen has copied them.
            keep = [s.contiguous() for s in scores]
            responses = [
                lg.QuerySampleResponse(qid, s.data_ptr(), s.numel() * s.element_size())
                for qid, s in zip(query_ids, keep)
            ]
        lg.QuerySamplesComplete(responses)
        self.answered += len(responses)


def run(test: LoadGenTest, sut: SUT, log_dir: Path, *, on_interrupt: Callable[[], None]) -> dict:
    """Runs LoadGen (on its own thread, so that Ctrl-C reaches this one) and returns the
    verdict read back from its detail log. On Ctrl-C, `on_interrupt()` must make the server
    answer what is left at once; LoadGen then ends and closes its logs, and KeyboardInterrupt
    goes on up."""
    lg = sut.lg
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = lg.TestSettings()
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_duration_ms = int(test.min_duration_s * 1e3)
    settings.min_query_count = int(test.min_query_count)
    settings.schedule_rng_seed = settings.sample_index_rng_seed = settings.qsl_rng_seed = test.seed
    if test.scenario == "server":
        settings.scenario = lg.TestScenario.Server
        settings.server_target_qps = float(test.target_qps)
        settings.server_target_latency_ns = int(test.slo_ms * 1e6)
        settings.server_target_latency_percentile = test.slo_percentile / 100
    else:
        settings.scenario = lg.TestScenario.Offline
        settings.offline_expected_qps = float(test.target_qps)
    logs = lg.LogSettings()
    logs.log_output.outdir = str(log_dir)
    logs.log_output.copy_summary_to_stdout = False
    # No trace log: it holds every query's events (~16 MB a minute at 700 qps), which
    # requests.csv already records; the summary and detail logs are kept.
    logs.enable_trace = False
    # Sample indices only name queries here (the population says who each one is): a small
    # query library is enough.
    samples = 1024
    qsl = lg.ConstructQSL(samples, samples, lambda idx: None, lambda idx: None)
    handle = lg.ConstructSUT(sut.issue, sut.flush)
    failed: list = []
    # An Event, not Thread.join: a join interrupted by Ctrl-C may take a live thread for
    # finished, and LoadGen's objects must outlive its run.
    done = threading.Event()

    def start():
        try:
            lg.StartTestWithLogSettings(handle, qsl, settings, logs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=start, name="loadgen", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        on_interrupt()
        while not done.wait(0.1):  # LoadGen ends at its schedule's end (a second Ctrl-C: now)
            pass
        raise
    finally:
        if done.is_set():
            lg.DestroySUT(handle)
            lg.DestroyQSL(qsl)
    if failed:
        raise failed[0]
    return read_detail(log_dir / "mlperf_log_detail.txt", test)


def read_detail(path: Path, test: LoadGenTest) -> dict:
    """The record's LoadGen keys, from its detail log (`:::MLLOG {json}` lines)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith(":::MLLOG "):
            entry = json.loads(line[len(":::MLLOG ") :])
            values[entry["key"]] = entry["value"]

    def ms(p: str):
        v = values.get(f"result_{p}_percentile_latency_ns")
        return None if v is None else v / 1e6

    server = test.scenario == "server"
    checks = [
        ("result_perf_constraints_met", f"p{test.slo_percentile:g} latency over {test.slo_ms:g} ms"),
        ("result_min_duration_met", f"shorter than min_duration {test.min_duration_s:g} s"),
        ("result_min_queries_met", f"fewer than min_query_count {test.min_query_count}"),
        ("early_stopping_met", "early stopping not satisfied"),
    ]
    failed = [why for key, why in checks if values.get(key) is False]
    reason = values.get("result_invalid_reason") or ""
    if values.get("early_stopping_met") is False and values.get("early_stopping_result"):
        reason = (reason + " " + " ".join(values["early_stopping_result"].split())).strip()
    verdict = values.get("result_validity")
    completed = values.get("result_completed_samples_per_sec" if server else "result_samples_per_second")
    return {
        "verdict": verdict,
        "verdict_reason": "; ".join(failed + ([reason] if reason else [])) or None,
        "early_stopping_met": values.get("early_stopping_met"),
        "slo_met": values.get("result_perf_constraints_met", None) if server else None,
        "scheduled_qps": values.get("result_scheduled_samples_per_sec"),
        "completed_qps": completed,
        "loadgen_queries": values.get("result_query_count"),
        "overlatency_queries": values.get("result_overlatency_query_count"),
        "p50_ms": ms("50.00"),
        "p90_ms": ms("90.00"),
        "p99_ms": ms("99.00"),
        "p999_ms": ms("99.90"),
        "loadgen_version": values.get("loadgen_version"),
    }
