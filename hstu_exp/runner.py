"""One sweep point: validated config -> workload -> record on disk -> W&B -> console line."""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import logging
import os
import time
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from hstu_exp.bench.measure import combine_repeats, finish, resampling_units
from hstu_exp.config import (
    cv_max,
    device_problem,
    e2e_ran,
    max_time_s,
    memory_problem,
    point_problem,
    serve_candidates,
)
from hstu_exp.data.synthetic import stream_for
from hstu_exp.env import environment, memory_bytes, resolve_device
from hstu_exp.tracking import identity
from hstu_exp.tracking.records import RESULTS_FILE, append_record, read_records

log = logging.getLogger(__name__)  # Hydra's job logging: the console and the job's .log file
SCHEMA_VERSION = 3  # 2: statistics, validity, provenance, model dims, timing, overrides; 3: config
# Signals received (cli.main's handler): the point in progress stops there. Module state because
# a signal handler can reach nothing else.
STOP: list = []


def point_config(cfg) -> dict:
    """What the point measures: its resolved config less logger and output keys (identity)."""
    return identity.point_config(OmegaConf.to_container(cfg, resolve=True))


def config_key(cfg) -> str:
    return identity.config_key(point_config(cfg))


def swept_values(cfg, device: torch.device) -> dict:
    """The identity keys (tracking.records.SWEPT_KEYS) as the point runs them, whatever was
    asked: an e2e mode decides its cache and graph, attention runs paged only when n < T."""
    m, c, w = cfg.model, cfg.cache, cfg.workload
    cache, graph = c.mode, cfg.graph.mode
    total, new, mode, qps = w.get("total_history"), w.get("new_history"), None, None
    batch, candidates = w.batch_size, w.num_candidates
    if w.name == "serve":
        mode, batch, qps = serve_mode(w), w.max_batch, serve_qps(w)
        candidates = serve_candidates(w)[0]  # a trace's own, not the config's
    elif w.name == "e2e":
        mode = w.mode
        cache, graph = e2e_ran(cfg).values()
        total = _e2e_longest_history(cfg)
    elif w.name == "attention":
        cache = "paged" if w.new_history < w.total_history else "none"
    return {
        "workload": w.name,
        "model": m.name,
        "dtype": m.dtype,
        "cache": cache,
        "page_size": c.page_size if cache != "none" else None,
        "kernel": cfg.kernel.name,
        "autotune": cfg.kernel.autotune if cfg.kernel.name == "triton" else None,
        "graph": graph,
        "mode": mode,
        "batch_size": batch,
        "total_history": total,
        "new_history": new,
        "num_candidates": candidates,
        "qps": qps,
        "device": device.type,
    }


def serve_mode(w) -> str:
    """A serve point's mode key: how requests arrive (online, offline, or the max_qps search)
    and the scheduler's policy, e.g. online-fifo, max_qps-length_aware."""
    how = "max_qps" if w.search == "max_qps" else w.mode
    return f"{how}-{w.policy}"


def serve_qps(w):
    """The offered Poisson rate a serve point runs (None: a trace, or a search finds it)."""
    return float(w.qps) if w.trace is None and w.search == "none" else None


def _e2e_longest_history(cfg):
    """The longest history the point's stream serves (None when the stream is impossible:
    point_problem says why)."""
    try:
        return stream_for(cfg.model, cfg.workload, seed=cfg.seed).max_history
    except ValueError:
        return None


def point_params(cfg, device: torch.device) -> dict:
    """What every record carries besides its identity: model dimensions and timing settings
    (cv_max and max_time_s: the values in force, defaults filled in)."""
    m, w = cfg.model, cfg.workload
    return {
        "num_layers": m.num_layers,
        "hidden": m.hidden,
        "num_heads": m.num_heads,
        "head_dim": m.head_dim,
        "max_history": m.max_history,
        "warmup": w.warmup,
        "iters": w.iters,
        "min_time_s": w.min_time_s,
        "max_time_s": max_time_s(w),
        "cv_max": cv_max(w, device.type),
        "min_samples": w.min_samples,
        "input_sets": w.get("input_sets"),
        "gemm_dtype": cfg.kernel.gemm_dtype,
        "cache_dtype": cfg.cache.dtype,
    }


def _overrides() -> list:
    """This point's own Hydra overrides (the sweep's values for it), [] outside a Hydra app."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def point_name(values: dict) -> str:
    parts = [values["workload"], values["model"], values["cache"], values["kernel"], values["graph"]] + (
        [values["mode"]] if values["mode"] else []
    )
    if values["workload"] == "serve":  # histories from the arrivals; batches up to max_batch
        qps = f"-q{values['qps']:g}" if values["qps"] is not None else ""
        return "-".join(parts) + f"-b{values['batch_size']}{qps}-c{values['num_candidates']}"
    if values["workload"] == "e2e":  # its histories come from the stream, not T and n
        return "-".join(parts) + f"-b{values['batch_size']}-c{values['num_candidates']}"
    return "-".join(parts) + (
        f"-b{values['batch_size']}-T{values['total_history']}"
        f"-n{values['new_history']}-c{values['num_candidates']}"
    )


def point_tags(values: dict) -> list:
    return [
        f"{k}:{values[k]}"
        for k in ("workload", "model", "cache", "kernel", "graph", "mode")
        if values[k] is not None
    ]


# workload name -> module with `run(cfg, device, progress) -> bench.measure.Measured`
WORKLOADS = {
    "block": "hstu_exp.bench.block",
    "attention": "hstu_exp.bench.attention",
    "e2e": "hstu_exp.bench.e2e",
    "serve": "hstu_exp.bench.serve",
}


def _run_workload(cfg, device, progress, job_dir) -> dict:
    """The point timed `workload.repeats` times, each repeat on a fresh server: the model, KV
    cache and CUDA graphs are built anew (builders.forget), so what one repeat left behind
    (cache contents, captured buckets, allocator state) cannot carry into the next. Profile and
    verify run once, after the last repeat."""
    from hstu_exp.builders import forget

    workload = importlib.import_module(WORKLOADS[cfg.workload.name])
    # serve also writes a per-request file beside the record
    extra = {"job_dir": job_dir} if "job_dir" in inspect.signature(workload.run).parameters else {}
    repeats = cfg.workload.get("repeats", 1)
    results, units = [], []
    for i in range(repeats):
        if repeats > 1:
            forget()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress(f"repeat {i + 1} of {repeats}")
        torch.manual_seed(cfg.seed)
        measured = workload.run(cfg, device, progress=progress, **extra)
        last = i == repeats - 1
        results.append(
            finish(
                measured, cfg, device, job_dir=job_dir if last else None, progress=progress, verify=last
            )
        )
        units.append(resampling_units(measured))
    return combine_repeats(results, units)


def find_record(sweep_dir: Path, key: str, status: str):
    return next(
        (r for r in read_records(sweep_dir) if r.get("config_key") == key and r.get("status") == status),
        None,
    )


def find_ok_record(sweep_dir: Path, key: str):
    return find_record(sweep_dir, key, "ok")


def run_point(
    cfg,
    *,
    job_dir: Path,
    group: str,
    point: int,
    total: int | None,
    sweep_dir: Path | None = None,
    started: float | None = None,
) -> dict:
    device = resolve_device(cfg.device)
    values = swept_values(cfg, device)
    name = point_name(values)
    key = config_key(cfg)
    label = f"[{point + 1}/{total}]" if total else f"[{point + 1}]"

    def progress(msg: str):
        log.info(f"{label} {msg}")

    problem = point_problem(cfg)
    if problem is None and device.type != "cuda":
        problem = device_problem(cfg)
    problem = problem or memory_problem(cfg, memory_bytes(device))
    if cfg.resume and sweep_dir is not None:
        done = find_ok_record(sweep_dir, key)
        if done is not None:
            progress(f"{name}: already ok in this sweep, skipped (resume=true)")
            return done
        earlier = find_record(sweep_dir, key, "skipped")
        if problem and earlier is not None and earlier.get("reason") == problem:
            progress(f"{name}: skipped again ({problem}); its record stands (resume=true)")
            return earlier

    record = {
        "status": "ok",
        "schema_version": SCHEMA_VERSION,
        "reason": None,
        "error": None,
        "sweep": group,
        "point": point,
        "name": name,
        "config_key": key,
        "verify": cfg.verify,
        "seed": cfg.seed,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **values,
        **point_params(cfg, device),
        "overrides": _overrides(),
        "config": point_config(cfg),
        "job_dir": str(job_dir),
    }
    if problem:
        record.update(status="skipped", reason=problem)
    else:
        t0 = time.perf_counter()
        try:  # from the "running" line on: a signal seen just after it still marks the point
            progress(f"{name}: running")
            record.update(_run_workload(cfg, device, progress, job_dir))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cli.main): mark this point, then stop
            record.update(status="failed", error="interrupted")
        except Exception as exc:  # noqa: BLE001 - a failing point is recorded; the sweep goes on
            if STOP:  # a library turned the interrupt into an exception of its own
                record.update(status="failed", error="interrupted")
            else:
                record.update(getattr(exc, "record_fields", {}))  # a missed gate's numbers
                record.update(
                    status="failed",
                    error=f"{type(exc).__name__}: {exc}".strip()[:2000],
                    traceback=traceback.format_exc(limit=8)[-4000:],
                )
            if device.type == "cuda":
                torch.cuda.empty_cache()
        record["wall_s"] = round(time.perf_counter() - t0, 3)
    record.update(environment(device.type))
    append_record(job_dir, record)  # on disk before W&B sees anything
    if record["error"] == "interrupted":
        progress(result_line(record))
        raise KeyboardInterrupt

    if cfg.logger.name == "wandb":
        from hstu_exp.tracking.wandb_sink import log_point

        log_point(
            record,
            logger=OmegaConf.to_container(cfg.logger, resolve=True),
            job_dir=job_dir,
            group=group,
            cfg=OmegaConf.to_container(cfg, resolve=True),
            sweep_dir=sweep_dir,
        )
    progress(result_line(record) + _eta(point, total, started))
    return record


def result_line(r: dict) -> str:
    head = f"{r['name']}: {r['status']}"
    if r["status"] == "skipped":
        return f"{head} ({r['reason']})"
    if r["status"] == "failed":
        return f"{head} ({r['error'].splitlines()[0] if r['error'] else ''})"
    line = f"{head} median {r['median_ms']:.3f} ms (p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f})"
    if r.get("slo_met") is not None:  # serve: the tail, the rate achieved, the SLO
        verdict = "met" if r["slo_met"] else "missed"
        line += (
            f", p99 {r['p99_ms']:.1f} ms, {r['achieved_qps']:.1f} qps, SLO "
            f"p{r['slo_percentile']:g}<={r['slo_ms']:g} ms {verdict}"
        )
        if r.get("max_qps") is not None:
            line += f", max {r['max_qps']:.1f} qps"
    if r.get("floor_fraction") is not None:
        line += f", {100 * r['floor_fraction']:.1f}% of floor"
    if r.get("max_rel_error") is not None:
        line += f", max rel err {r['max_rel_error']:.2e}"
    if r.get("valid") is False:
        line += f", INVALID: {r['invalid_reason']}"
    return line


# Times at which this process finished its points: the ETA's pace spans the points of one
# process, which Hydra runs as separate calls of the task function.
_DONE: list = []


def duration(seconds: float) -> str:
    """'45 s' up to 90 s, then h:mm ('0:07 h', '2:15 h')."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d} h"


def _eta(point: int, total, started) -> str:
    """The first point carries one-off costs (imports, roofline calibration, compilation), so the
    pace comes from the points after it: the median of their durations (one slow point does not
    swing it), shown once two are known."""
    if not total or started is None:
        return ""
    now = time.time()
    _DONE.append(now)
    line = f" | elapsed {duration(now - started)}"
    steps = sorted(b - a for a, b in zip(_DONE[1:], _DONE[2:]))
    if len(steps) >= 2 and point + 1 < total:
        line += f", ETA {duration(steps[len(steps) // 2] * (total - point - 1))}"
    return line


def sweep_started() -> float | None:
    value = os.environ.get("HSTU_EXP_STARTED")
    return float(value) if value else None


def sweep_total() -> int | None:
    value = os.environ.get("HSTU_EXP_POINTS")
    return int(value) if value else None


__all__ = ["run_point", "RESULTS_FILE"]
