"""Weights & Biases: one run per point, one summary run per sweep (docs/wandb.md).

Records are on disk before anything here runs; W&B is a view of them, never a place they live.
Every call is bounded: offline runs are local files; an online run is written by a child
process that is killed after `2 * logger.timeout_s + 10` seconds (wandb's own init timeout does
not cover every wait of wandb 0.27). The first failure or timeout turns W&B off for the rest of
the sweep with one warning line: an in-process flag, and a marker file in the sweep dir that
Slurm jobs and the close-out of the same sweep honour.

Each run is built in two steps: `point_spec` / `summary_spec` turn records into a plain,
JSON-able description of the run (no wandb import), and `write_run` turns that into a W&B run,
in this process or in the child.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from hstu_exp.tracking.identity import PLUMBING, POINT_KEY_OVERRIDES
from hstu_exp.tracking.records import ENV_KEYS, SWEPT_KEYS, is_missing, point_overrides

MARKER = ".wandb-disabled"
MODES = ("online", "offline", "disabled")
DEFAULT_TIMEOUT_S = 30.0
# Provenance keys that records may carry besides ENV_KEYS.
ENV_EXTRA = ["gpu_count"]
PARAM_KEYS = [
    "num_layers",
    "hidden",
    "num_heads",
    "head_dim",
    "max_history",
    "warmup",
    "iters",
    "min_time_s",
    "max_time_s",
    "cv_max",
    "min_samples",
    "input_sets",
    "seed",
    "verify",
    "schema_version",
    "headline",
    "flop_convention",
    "cv_basis",
]
# Summary namespaces: W&B shows a "/" in a key as a section of the run's summary.
NAMESPACES = {
    "latency": [
        "median_ms",
        "p10_ms",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "mean_ms",
        "min_ms",
        "max_ms",
        "cv",
        "iterations",
        "wall_s",
    ],
    "validity": ["valid", "invalid_reason"],
    "roofline": [
        "flops",
        "min_bytes",
        "tflops",
        "floor_ms",
        "floor_fraction",
        "floor_bound",
        "peak_tflops",
        "peak_gbps",
    ],
    "memory": ["mem_allocated_bytes", "mem_reserved_bytes", "kv_pool_bytes"],
    "verify": ["max_rel_error"],
}
# Not in a run's summary: identity and provenance are config, paths are host-specific.
NOT_SUMMARY = {
    "samples_ms",
    "traceback",
    "job_dir",
    "config_key",
    "sweep",
    "point",
    "name",
    "time",
    "overrides",
    "autotune",
}
RESULT_COLUMNS = [
    "label",
    "batch_size",
    "total_history",
    "new_history",
    "num_candidates",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "cv",
    "valid",
]

# Hydra's job logging sends these to the console and the job's .log; elsewhere (the importer)
# Python's last-resort handler prints warnings to stderr.
log = logging.getLogger(__name__)
_off: dict = {}  # where (sweep or job dir) -> why W&B is off there, for this process
_noticed: list = []  # the WANDB_MODE notice is printed once per process


# --------------------------------------------------------------------------- the public calls


def log_point(
    record: dict,
    *,
    logger: dict,
    job_dir: Path,
    group: str,
    cfg: dict,
    sweep_dir: Optional[Path] = None,
    id_group: Optional[str] = None,
) -> Optional[str]:
    """One point's run (none for a skipped point). Returns its run dir, or None. `id_group`
    (default `group`: the sweep dir's name) is what the run id follows; `group` may be a
    display name of the importer's --group."""
    if record.get("status") == "skipped":
        return None  # on disk, and listed in the summary run's `skipped` table
    where = Path(sweep_dir or job_dir)
    return _guarded(
        lambda: point_spec(
            record,
            logger=logger,
            job_dir=Path(job_dir),
            group=group,
            cfg=cfg,
            data_dir=where,
            id_group=id_group,
        ),
        logger=logger,
        where=where,
    )


def log_summary(
    df,
    *,
    logger: dict,
    sweep_dir: Path,
    group: str,
    images: dict,
    labels: Callable[[list], list],
    headline=None,
    csv: Optional[Path] = None,
    grid_dir: Optional[Path] = None,
    id_group: Optional[str] = None,
) -> Optional[str]:
    """The sweep's summary run: grid (from `grid_dir`, default the sweep dir), counts,
    headline speedups, native charts, figures and the results CSV as an artifact. Returns its
    run dir, or None. The report layer hands over what it presents: `labels` (serve records ->
    one label each, `report.labels.serve_labels`) and `headline` (the speedup table of
    `report.aggregate.headline`, or None)."""
    return _guarded(
        lambda: summary_spec(
            df,
            logger=logger,
            sweep_dir=Path(sweep_dir),
            group=group,
            images=images,
            labels=labels,
            headline=headline,
            csv=csv,
            grid_dir=grid_dir,
            id_group=id_group,
        ),
        logger=logger,
        where=Path(sweep_dir),
    )


# --------------------------------------------------------------------------- bounds and mode


def effective_mode(logger: dict) -> str:
    """WANDB_MODE in the environment wins over logger.mode (one notice when they disagree):
    it is how a job script, a Slurm node or CI switches W&B for every command at once."""
    configured = str(logger.get("mode") or "offline")
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    if env not in MODES:
        return configured
    if env != configured and not _noticed:
        _noticed.append(True)
        log.warning(
            f"[hstu-exp] W&B mode: WANDB_MODE={env} from the environment wins over "
            f"logger.mode={configured}"
        )
    return env


def timeout_of(logger: dict) -> float:
    value = logger.get("timeout_s")
    return float(value) if value else DEFAULT_TIMEOUT_S


def disabled_reason(where: Path) -> Optional[str]:
    """Why W&B is off for this sweep (or job) dir, or None. A marker left by another sweep
    invocation (another HSTU_EXP_STARTED) is not this sweep's: a resume tries W&B again."""
    where = Path(where)
    if str(where) in _off:
        return _off[str(where)]
    started = os.environ.get("HSTU_EXP_STARTED")
    try:
        marker = json.loads((where / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if started and marker.get("started") == started:
        return marker.get("reason") or "W&B failed earlier in this sweep"
    return None


def _disable(where: Path, reason: str) -> None:
    _off[str(where)] = reason
    log.warning(
        f"[hstu-exp] warning: W&B failed ({reason}); W&B is off for the rest of this "
        f"sweep. The records are on disk: `hstu-exp-wandb {shlex.quote(str(where))}` "
        "replays them later"
    )
    try:
        (where / MARKER).write_text(
            json.dumps({"started": os.environ.get("HSTU_EXP_STARTED"), "reason": reason})
        )
    except OSError:
        pass  # the in-process flag still holds; other processes try once more at worst


def _guarded(make_spec, *, logger: dict, where: Path) -> Optional[str]:
    mode = effective_mode(logger)
    if mode == "disabled" or disabled_reason(where):
        return None
    try:
        spec = make_spec()
        if spec is None:
            return None
        spec["init"]["mode"] = mode
        spec["timeout_s"] = timeout_of(logger)
        if mode == "online":
            return _write_in_child(spec)
        return write_run(spec)
    except KeyboardInterrupt:
        _disable(where, "interrupted")
        raise
    except Exception as exc:  # noqa: BLE001 - the record on disk is what matters
        _disable(where, f"{type(exc).__name__}: {_first_line(exc)}")
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _write_in_child(spec: dict) -> Optional[str]:
    """write_run in a child process with a hard deadline. The child has its own session, so a
    Ctrl-C reaches only this process, which then kills the child (subprocess.run does)."""
    deadline = 2 * spec["timeout_s"] + 10
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hstu_exp.tracking.wandb_sink"],
            input=json.dumps(spec, default=_plain),
            capture_output=True,
            text=True,
            timeout=deadline,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(
            f"no answer from W&B within {deadline:.0f} s (logger.timeout_s={spec['timeout_s']:g})"
        ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if proc.returncode != 0 or "error" in answer:
        detail = answer.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(detail)
    return answer.get("run_dir")


def _plain(value):
    """json.dumps fallback: numpy scalars and arrays, paths."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------- records -> specs


def run_id(group: str, key: str, where: str = "") -> str:
    """Stable across re-runs: a resume or a second close-out updates the run, never adds one.
    `where` (sweep_where) keeps runs of another commit or GPU apart under the same sweep name."""
    return hashlib.sha1(f"{group}/{key}{'@' + where if where else ''}".encode()).hexdigest()[:16]


def sweep_where(r: dict) -> str:
    """The commit and GPU a record ran on ('' for neither recorded): part of every run id."""
    parts = [str(r[k]) for k in ("git_sha", "gpu_uuid") if not is_missing(r.get(k))]
    return "/".join(parts)


def sync_command(root: Path, runs: str = "*/wandb/latest-run") -> str:
    """The upload line: each run's newest local copy only (latest-run), paths shell-quoted."""
    quoted = shlex.quote(str(root))
    return f"wandb sync {quoted}/{runs} {quoted}/wandb/latest-run"


def artifact_name(group: str) -> str:
    """W&B artifact names allow ASCII letters, digits, '-', '_' and '.': anything else (a space,
    an accent) becomes '-', so a sweep dir named 'my sweeps/été' still gets its summary run."""
    return "results-" + "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in group)


def _pick(record: dict, keys) -> dict:
    return {k: record[k] for k in keys if k in record and not is_missing(record[k])}


def run_name(r: dict) -> str:
    """What varies across a sweep first (B, T, n; then cache/kernel/graph), so a truncated name
    in the runs table still tells the points apart: 'B1 T256 n32 · paged/triton/cudagraph ·
    block tiny'."""
    where = [f"B{r.get('batch_size')}"]
    if r.get("workload") == "serve":  # offered load, not T and n, tells serve points apart
        qps = r.get("qps")
        where.append(
            f"qps{_int(qps)}"
            if not is_missing(qps)
            else "max_qps"
            if str(r.get("mode") or "").startswith("max_qps")
            else "trace"
        )
    elif r.get("workload") == "e2e":
        where.append(f"c{r.get('num_candidates')}")
    else:
        where += [f"T{r.get('total_history')}"] + (
            [] if is_missing(r.get("new_history")) else [f"n{_int(r['new_history'])}"]
        )
    how = "/".join(str(r[k]) for k in ("mode", "cache", "kernel", "graph") if not is_missing(r.get(k)))
    knobs = " ".join(f"{k}={v}" for k, v in other_overrides(r).items())
    return f"{' '.join(where)} · {how} · {r.get('workload')} {r.get('model')}" + (
        f" · {knobs}" if knobs else ""
    )


def other_overrides(r: dict) -> dict:
    """The point's own overrides that no point key shows ({'num_pages': '64'}): two points
    that differ only there (cache.num_pages=64 vs 128) get two names and two config values."""
    given = point_overrides(r.get("overrides")) or {}
    return {
        k.rsplit(".", 1)[-1]: v
        for k, v in sorted(given.items())
        if k not in POINT_KEY_OVERRIDES
        and k.split(".", 1)[0] not in PLUMBING
        and k.rsplit(".", 1)[-1] not in PARAM_KEYS
    }  # timing settings: config.params


def _int(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def point_tags(r: dict, user_tags=()) -> list:
    tags = [
        f"{k}:{r[k]}"
        for k in ("workload", "model", "cache", "kernel", "graph", "mode", "device")
        if not is_missing(r.get(k))
    ]
    return sorted(set(tags) | {str(t) for t in user_tags or ()})


# A serve or e2e point's input knobs: config (what was asked, to group and filter by), never
# summary (what was measured).
INPUT_KEYS = [
    "policy",
    "search",
    "trace",
    "max_wait_ms",
    "num_users",
    "user_skew",
    "items_per_return",
    "new_user_rate",
    "candidates_max",
    "slo_ms",
    "slo_percentile",
    "duration_s",
    "warmup_s",
    "min_requests",
    "search_steps",
    "verify_requests",
    "history_start",
    "history_step",
    "num_batches",
    "repeats",
    "target_qps",
]


def point_inputs(r: dict) -> dict:
    """The workload's input knobs of a record: its config's workload group where it has one,
    else the INPUT_KEYS it carries."""
    config = r.get("config")
    if isinstance(config, dict) and isinstance(config.get("workload"), dict):
        return {k: v for k, v in config["workload"].items() if not isinstance(v, (dict, list))}
    return _pick(r, INPUT_KEYS)


def point_summary(r: dict) -> dict:
    out = {"status": r.get("status")}
    for key in ("reason", "error"):
        if r.get(key):
            out[key] = str(r[key]).splitlines()[0][:500]
    placed = (
        set(out)
        | NOT_SUMMARY
        | set(SWEPT_KEYS)
        | set(ENV_KEYS)
        | set(ENV_EXTRA)
        | set(PARAM_KEYS)
        | set(INPUT_KEYS)
        | set(point_inputs(r))
    )
    for space, keys in NAMESPACES.items():
        for k in keys:
            if k in r and not is_missing(r[k]):
                out[f"{space}/{k}"] = r[k]
            placed.add(k)
    for k, v in r.items():  # the workload's own keys (e2e host time, cache hits, ...)
        if k not in placed and not is_missing(v) and isinstance(v, (int, float, str, bool)):
            out[f"workload/{k}"] = v
    return out


def _overrides(r: dict) -> list:
    if r.get("overrides"):
        return list(r["overrides"])
    try:  # older records: this process's point, when a Hydra app runs it
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return []


def point_spec(
    r: dict,
    *,
    logger: dict,
    job_dir: Path,
    group: str,
    cfg: Optional[dict],
    data_dir: Path,
    id_group: Optional[str] = None,
) -> Optional[dict]:
    samples = [float(s) for s in (r.get("samples_ms") or []) if not is_missing(s)]
    config = {
        "point": {**_pick(r, SWEPT_KEYS), **other_overrides(r)},
        "workload": point_inputs(r),
        "env": _pick(r, ENV_KEYS + ENV_EXTRA),
        "params": _pick(r, PARAM_KEYS),
        "config_key": r.get("config_key"),
        "overrides": _overrides(r),
    }
    if cfg or isinstance(r.get("config"), dict):
        config["cfg"] = cfg or r["config"]
    key = r.get("config_key") or hashlib.sha1(run_name(r).encode()).hexdigest()[:16]
    # the id follows the sweep dir (not a display --group), the commit and the GPU
    return {
        "init": {
            **_where(logger),
            "group": group,
            "job_type": str(r.get("workload")),
            "name": run_name(r),
            "id": run_id(id_group or group, key, sweep_where(r)),
            "dir": str(job_dir),
            "tags": point_tags(r, logger.get("tags")),
            "config": config,
        },
        "data_dir": str(Path(data_dir) / "wandb" / ".data"),
        "samples": samples,
        "summary": point_summary(r),
        "settings": _recorded_where(r) if logger.get("imported") else {},
        "exit_code": 1 if r.get("status") == "failed" else 0,
    }


def _recorded_where(r: dict) -> dict:
    """W&B settings of an imported run: the commit and host the record ran on, not the
    importer's, and no machine metadata of the importing machine."""
    out = {"x_disable_meta": True, "disable_git": True, "x_disable_machine_info": True}
    if not is_missing(r.get("git_sha")):
        out["git_commit"] = str(r["git_sha"])
    if not is_missing(r.get("hostname")):
        out["host"] = str(r["hostname"])
    return out


def _where(logger: dict) -> dict:
    return {"project": logger.get("project") or "hstu-exp", "entity": logger.get("entity")}


def sweep_grid(sweep_dir: Path) -> dict:
    """The sweep as asked, from `<sweep>/multirun.yaml`: the command's overrides, and each swept
    key with its values (the command's and an experiment's `hydra.sweeper.params`); {} when the
    sweep has none (a copied or published sweep)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return {}
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        hydra = OmegaConf.load(path).hydra
        task = [str(o) for o in hydra.overrides.task or []]
        params = hydra.sweeper.params
        params = OmegaConf.to_container(params) if params is not None else {}
        given = OverridesParser.create().parse_overrides(
            task + [f"{k}={v}" for k, v in params.items() if k not in {t.split("=")[0] for t in task}]
        )
        swept = {
            o.get_key_element(): list(o.sweep_string_iterator()) for o in given if o.is_sweep_override()
        }
    except Exception:  # noqa: BLE001 - a damaged file costs the grid, not the run
        return {}
    return {"swept": swept, "overrides": task}


def _label(r: dict) -> str:
    return "/".join(str(r[k]) for k in ("mode", "cache", "kernel", "graph") if not is_missing(r.get(k)))


def _table(rows: list, columns: list) -> dict:
    return {
        "columns": columns,
        "data": [[None if is_missing(row.get(c)) else row.get(c) for c in columns] for row in rows],
    }


def summary_spec(
    df,
    *,
    logger: dict,
    sweep_dir: Path,
    group: str,
    images: dict,
    labels: Callable[[list], list],
    headline=None,
    csv: Optional[Path] = None,
    grid_dir: Optional[Path] = None,
    id_group: Optional[str] = None,
) -> dict:
    """The summary run's spec (`log_summary`'s arguments)."""
    records = [
        {k: v for k, v in row.items() if k not in ("samples_ms", "traceback")}
        for row in df.to_dict("records")
    ]
    status = [r.get("status") for r in records]
    ok = [dict(r, label=_label(r)) for r in records if r.get("status") == "ok"]
    valid = [r for r in ok if r.get("valid") in (True, "True", "true")]
    invalid = [r for r in ok if r.get("valid") in (False, "False", "false")]
    first = ok[0] if ok else (records[0] if records else {})
    summary = {
        "points": len(records),
        "ok": len(ok),
        "valid": len(valid),
        "invalid": len(invalid),
        "failed": status.count("failed"),
        "skipped": status.count("skipped"),
    }
    spec = {
        "init": {
            **_where(logger),
            "group": group,
            "job_type": "summary",
            "name": f"{group} · summary",
            "id": run_id(id_group or group, "summary", sweep_where(first)),
            "dir": str(sweep_dir),
            "tags": sorted({"summary", *map(str, logger.get("tags") or ())}),
            "config": {
                "sweep": group,
                "grid": sweep_grid(grid_dir or sweep_dir),
                "env": _pick(
                    first, ENV_KEYS + ["git_dirty", "wandb", "python", "cpu_model", "gpu_count"]
                ),
                "model": _pick(
                    first,
                    ["model", "dtype", "num_layers", "hidden", "num_heads", "head_dim", "max_history"],
                ),
                "workloads": sorted({str(r.get("workload")) for r in records}),
            },
        },
        "data_dir": str(Path(sweep_dir) / "wandb" / ".data"),
        "settings": _recorded_where(first) if logger.get("imported") else {},
        "summary": summary,
        "tables": {},
        "lines": [],
        "bars": [],
        "images": {},
        "artifact": None,
        "exit_code": 0,
    }
    tables, lines = spec["tables"], spec["lines"]
    if ok:
        tables["results"] = _table(ok, [c for c in RESULT_COLUMNS if any(c in r for r in ok)])
        # e2e and serve points have no T axis (serve: histories come from the arrivals)
        timed = [r for r in ok if r.get("workload") not in ("e2e", "serve")]
        for b in sorted({r.get("batch_size") for r in timed}):
            rows = _most_cached([r for r in timed if r.get("batch_size") == b])
            tables[f"latency_B{b}"] = _table(
                rows, ["label", "total_history", "new_history", "median_ms", "valid"]
            )
            if len({r.get("total_history") for r in rows}) > 1:  # one T: no line to draw
                lines.append(
                    {
                        "key": f"charts/latency_vs_T_B{b}",
                        "table": f"latency_B{b}",
                        "x": "total_history",
                        "y": "median_ms",
                        "stroke": "label",
                        "title": f"median latency (ms) vs total history T, batch {b} "
                        "(each mode at its fewest new tokens n; validity in "
                        "the table)",
                    }
                )
        e2e = [r for r in ok if r.get("workload") == "e2e"]
        if e2e:
            tables["latency_e2e"] = _table(e2e, ["label", "batch_size", "median_ms"])
            lines.append(
                {
                    "key": "charts/latency_vs_batch_e2e",
                    "table": "latency_e2e",
                    "x": "batch_size",
                    "y": "median_ms",
                    "stroke": "label",
                    "title": "e2e median latency (ms) per batch vs batch size",
                }
            )
        _add_serve(spec, [r for r in ok if r.get("workload") == "serve"], labels)
    skipped = [r for r in records if r.get("status") == "skipped"]
    if skipped:
        tables["skipped"] = _table([dict(r, name=run_name(r)) for r in skipped], ["name", "reason"])
    _add_headline(spec, headline)
    caption = f"{group} · {first.get('device_name', '?')} · {first.get('git_sha', '?')}"
    spec["images"] = {
        f"figures/{k}": {"path": str(v), "caption": f"{k} · {caption}"}
        for k, v in sorted(images.items())
        if Path(v).is_file()
    }
    records_dir = Path(grid_dir or sweep_dir)  # an import writes its runs elsewhere
    files = [
        str(p)
        for p in (Path(csv) if csv else records_dir / "results.csv", records_dir / "results.jsonl")
        if p.is_file()
    ]
    if files:
        spec["artifact"] = {"name": artifact_name(group), "type": "benchmark-results", "files": files}
    return spec


def _most_cached(rows: list) -> list:
    """One record per (label, T): the one with the fewest new tokens (a full recompute has
    n = T), so a line over T holds one value per x, not every n of the sweep."""
    best: dict = {}
    for r in rows:
        key = (r["label"], r.get("total_history"))
        n = r.get("new_history")
        n = float("inf") if is_missing(n) else n
        if key not in best or n < best[key][0]:
            best[key] = (n, r)
    return [
        r for _, r in sorted(best.values(), key=lambda nr: (nr[1]["label"], nr[1].get("total_history")))
    ]


def _serve_labelled(rows: list, labels: Callable[[list], list]) -> list:
    """Each serve point with its label (as the figures label it), e.g. 'paged+max_qps-fifo'."""
    return [dict(r, label=label) for r, label in zip(rows, labels(rows))]


def _searched(r: dict) -> bool:
    return str(r.get("mode") or "").startswith("max_qps") or not is_missing(r.get("max_qps"))


def _some(rows: list, key: str, above=None) -> bool:
    """Any row has a value of `key` (above `above`): a records frame has every column."""
    return any(not is_missing(r.get(key)) and (above is None or r[key] > above) for r in rows)


def _add_serve(spec: dict, serve: list, labels: Callable[[list], list]) -> None:
    """Serve points: latency percentiles vs offered QPS (online points), max QPS within the SLO
    (search=max_qps points, also in the summary as serve/max_qps/<label>), and hit rates and
    bytes moved per request. Line charts only where the sweep has several rates."""
    if not serve:
        return
    tables, lines = spec["tables"], spec["lines"]
    serve = _serve_labelled(serve, labels)
    # every serve chart says its clock; records older than the field came from the simulator
    clock = "clock: " + " and ".join(sorted({str(r.get("clock") or "simulated") for r in serve}))
    search = sorted(
        (
            dict(r, max_qps=0.0 if is_missing(r.get("max_qps")) else r["max_qps"])
            for r in serve
            if _searched(r)
        ),
        key=lambda r: r["label"],
    )
    # offline mode makes every request available at t=0: its qps is no offered load
    online = sorted(
        (
            r
            for r in serve
            if not _searched(r)
            and not is_missing(r.get("qps"))
            and not str(r.get("mode") or "").startswith("offline")
        ),
        key=lambda r: (r["label"], r["qps"]),
    )
    if online:
        tables["serve_latency"] = _table(
            online,
            [
                c
                for c in (
                    "label",
                    "qps",
                    "achieved_qps",
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "p999_ms",
                    "slo_ms",
                    "slo_met",
                    "clock",
                    "verdict",
                    "valid",
                )
                if any(c in r for r in online)
            ],
        )
        for p, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
            # wandb.plot.line draws one y series: one chart per percentile
            if len({r["qps"] for r in online}) > 1 and _some(online, p):
                lines.append(
                    {
                        "key": f"charts/serve_{p[:-3]}_vs_qps",
                        "table": "serve_latency",
                        "x": "qps",
                        "y": p,
                        "stroke": "label",
                        "title": f"{name} latency (ms, queueing + service) vs offered QPS ({clock})",
                    }
                )
    if search:
        tables["serve_max_qps"] = _table(
            search,
            [
                c
                for c in (
                    "label",
                    "max_qps",
                    "min_failing_qps",
                    "slo_ms",
                    "slo_percentile",
                    "slo_latency_ms",
                    "clock",
                    "valid",
                )
                if c in ("label", "max_qps") or any(c in r for r in search)
            ],
        )
        slo = f"p{_int(search[0].get('slo_percentile'))} <= {_int(search[0].get('slo_ms'))} ms"
        spec["bars"].append(
            {
                "key": "charts/serve_max_qps",
                "table": "serve_max_qps",
                "label": "label",
                "value": "max_qps",
                "title": f"max QPS with {slo} ({clock}; 0: no rate met it)",
            }
        )
        spec["summary"].update({f"serve/max_qps/{r['label']}": r["max_qps"] for r in search})
    # hit rates and bytes at the rate the point's reported trial ran (a search's best; a trace's)
    rows = sorted(
        (
            dict(
                r,
                offered_qps=next(
                    (r[k] for k in ("offered_qps", "qps", "max_qps") if not is_missing(r.get(k))), None
                ),
                **{
                    f"{k}_per_request": r[k] / max(r.get("requests") or 0, 1)
                    for k in ("onloaded_bytes", "offloaded_bytes")
                    if not is_missing(r.get(k))
                },
            )
            for r in serve
        ),
        key=lambda r: (r["label"], r["offered_qps"] or 0),
    )
    columns = [
        c
        for c in (
            "label",
            "offered_qps",
            "requests",
            "gpu_hit_rate",
            "host_hit_rate",
            "miss_rate",
            "onloaded_bytes_per_request",
            "offloaded_bytes_per_request",
        )
        if any(c in r for r in rows)
    ]
    if "gpu_hit_rate" not in columns:
        return
    tables["serve_cache"] = _table(rows, columns)
    for k in ("gpu_hit_rate", "host_hit_rate"):  # not for a tier no point has (cache=none)
        if len({r["offered_qps"] for r in rows}) > 1 and _some(rows, k, above=0):
            lines.append(
                {
                    "key": f"charts/serve_{k}_vs_qps",
                    "table": "serve_cache",
                    "x": "offered_qps",
                    "y": k,
                    "stroke": "label",
                    "title": f"requests hitting the {k.split('_')[0]} tier vs QPS ({clock})",
                }
            )


def _add_headline(spec: dict, table) -> None:
    """Headline speedups with their 95 % intervals (a report.aggregate.headline table, or None)."""
    if table is None or not len(table):
        return
    rows = []
    for r in table.to_dict("records"):
        where = f"B{r['batch_size']}"
        if r.get("workload") != "e2e" and not is_missing(r.get("total_history")):
            where += f" T{_int(r['total_history'])}"
        label = f"{r['workload']} {r['comparison']} {where}"
        rows.append(dict(r, label=label))
        spec["summary"][f"speedup/{label}"] = {
            k: r[k] for k in ("speedup", "ci_low", "ci_high") if not is_missing(r.get(k))
        }
    spec["tables"]["headline"] = _table(
        rows,
        [
            "label",
            "workload",
            "comparison",
            "batch_size",
            "total_history",
            "speedup",
            "ci_low",
            "ci_high",
        ],
    )
    spec["bars"].append(
        {
            "key": "charts/speedup",
            "table": "headline",
            "label": "label",
            "value": "speedup",
            "title": "speedup (median ratio; intervals in the headline table)",
        }
    )
    # speedup vs batch size with its interval: three lines a comparison (speedup, 95 % low and
    # high), e2e and block at each comparison's largest T
    top = {}
    for r in rows:
        key = (r["workload"], r["comparison"], r["batch_size"])
        if key not in top or (r.get("total_history") or 0) > (top[key].get("total_history") or 0):
            top[key] = r
    series = [
        {
            "series": f"{r['workload']} {r['comparison']}{suffix}",
            "batch_size": r["batch_size"],
            "speedup": r[col],
        }
        for r in top.values()
        for col, suffix in (("speedup", ""), ("ci_low", " (95% low)"), ("ci_high", " (95% high)"))
        if not is_missing(r.get(col))
    ]
    if len({s_["batch_size"] for s_ in series}) > 1:
        spec["tables"]["speedup_vs_batch"] = _table(
            sorted(series, key=lambda s_: (s_["series"], s_["batch_size"])),
            ["series", "batch_size", "speedup"],
        )
        spec["lines"].append(
            {
                "key": "charts/speedup_vs_batch",
                "table": "speedup_vs_batch",
                "x": "batch_size",
                "y": "speedup",
                "stroke": "series",
                "title": "speedup vs batch size, with its 95 % interval within a "
                "run (block: the largest T)",
            }
        )


# --------------------------------------------------------------------------- spec -> W&B run


def _can_write(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def write_run(spec: dict) -> str:
    """Writes one run from its spec and returns the run dir. Raises on any W&B failure."""
    os.environ.setdefault("WANDB_SILENT", "true")
    # wandb-core keeps its debug log in $WANDB_CACHE_DIR/wandb/logs, else the user cache dir;
    # where that cannot be made (a read-only HOME) it prints two dozen Go log lines to stderr.
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    if not os.environ.get("WANDB_CACHE_DIR") and not _can_write(user_cache / "wandb"):
        os.environ["WANDB_CACHE_DIR"] = str(Path(spec["data_dir"]) / "cache")
    # Tables and artifacts are staged under the sweep (or job) dir, so `wandb sync` finds them
    # wherever the sweep dir is synced from (same path).
    os.environ["WANDB_DATA_DIR"] = spec["data_dir"]
    Path(spec["data_dir"]).mkdir(parents=True, exist_ok=True)
    import wandb

    t = spec["timeout_s"]
    settings = wandb.Settings(
        console="off",
        silent=True,
        init_timeout=t,
        finish_timeout=t,
        x_graphql_timeout_seconds=t,
        x_disable_stats=True,
        **spec.get("settings", {}),
    )
    init = spec["init"]
    Path(init["dir"]).mkdir(parents=True, exist_ok=True)
    run = wandb.init(**init, resume="allow", reinit="finish_previous", settings=settings)
    exit_code = 1
    try:
        samples = spec.get("samples") or []
        if samples:
            run.define_metric("iteration", hidden=True)
            run.define_metric("latency_ms", step_metric="iteration", summary="min,max,mean")
            for i, s in enumerate(samples):
                run.log({"iteration": i, "latency_ms": s})
            spec["summary"]["latency/hist_ms"] = wandb.Histogram(samples, num_bins=min(64, len(samples)))
        payload = {}
        tables = {
            k: wandb.Table(columns=v["columns"], data=v["data"])
            for k, v in (spec.get("tables") or {}).items()
        }
        charted = {p["table"] for p in (spec.get("lines") or []) + (spec.get("bars") or [])}
        payload.update({f"tables/{k}": t_ for k, t_ in tables.items() if k not in charted})
        for p in spec.get("lines") or []:
            payload[p["key"]] = wandb.plot.line(
                tables[p["table"]], p["x"], p["y"], stroke=p["stroke"], title=p["title"]
            )
        for p in spec.get("bars") or []:
            payload[p["key"]] = wandb.plot.bar(
                tables[p["table"]], p["label"], p["value"], title=p["title"]
            )
        for k, img in (spec.get("images") or {}).items():
            payload[k] = wandb.Image(img["path"], caption=img["caption"])
        if payload:
            run.log(payload)
        run.summary.update(spec["summary"])
        if spec.get("artifact"):
            art = wandb.Artifact(spec["artifact"]["name"], type=spec["artifact"]["type"])
            for f in spec["artifact"]["files"]:
                art.add_file(f)
            run.log_artifact(art)
        run_dir = str(Path(run.dir).parent)
        exit_code = spec.get("exit_code", 0)
    finally:
        run.finish(exit_code=exit_code)
    _drop_older_copies(Path(run_dir), init["id"])
    return run_dir


def _drop_older_copies(run_dir: Path, run_id_: str) -> None:
    """One local copy per run id: a resume or re-import writes the run again (same id) in a new
    offline-run dir, and `wandb sync` of both would upload whichever lands last. The older
    copies go (the records they were made from stay on disk)."""
    import shutil

    for old in run_dir.parent.glob(f"offline-run-*-{run_id_}"):
        if old.resolve() != run_dir.resolve():
            shutil.rmtree(old, ignore_errors=True)


def _child_main() -> None:
    """`python -m hstu_exp.tracking.wandb_sink`: a spec on stdin, one JSON line on stdout."""
    try:
        run_dir = write_run(json.loads(sys.stdin.read()))
        print(json.dumps({"run_dir": run_dir}), flush=True)
    except BaseException as exc:  # noqa: BLE001 - the parent prints the one warning line
        print(json.dumps({"error": f"{type(exc).__name__}: {_first_line(exc)}"}), flush=True)
        os._exit(1)
    os._exit(0)  # the exit hooks are wandb's, already run by finish(); skip its teardown waits


# --------------------------------------------------------------------------- reading runs back

_LOG_BLOCK, _LOG_HEADER = 32768, struct.Struct("<IHB")  # checksum, length, chunk type


def log_records(path: Path):
    """The records of a .wandb file, W&B's LevelDB-style log: a 7-byte file header (":W&B", magic,
    version), then 32 KiB blocks of chunks, each a 7-byte header (checksum, length, type: 1 a
    whole record, 2/3/4 its first/middle/last part) and its bytes; a block's tail too short for a
    header is padding. Read here because wandb >= 0.29 ships no Python reader of its own
    (wandb.sdk.internal.datastore is gone)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, parts = _LOG_HEADER.size, []
    while pos + _LOG_HEADER.size <= len(data):
        room = _LOG_BLOCK - pos % _LOG_BLOCK
        if room < _LOG_HEADER.size:
            pos += room
            continue
        _, length, kind = _LOG_HEADER.unpack_from(data, pos)
        chunk = data[pos + _LOG_HEADER.size : pos + _LOG_HEADER.size + length]
        pos += _LOG_HEADER.size + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            yield b"".join(parts + [chunk])
        else:  # zero fill past the last record
            return


def read_offline_run(run_dir: Path) -> dict:
    """Config, summary, group and tags of an offline run, read back from its .wandb file
    (tests/helpers.read_run reads everything else)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    out = {"config": {}, "summary": {}, "group": None, "tags": [], "job_type": None, "name": None}
    for data in log_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(
                group=rec.run.run_group,
                tags=list(rec.run.tags),
                job_type=rec.run.job_type,
                name=rec.run.display_name,
            )
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            out["summary"].update({u.key: json.loads(u.value_json) for u in rec.summary.update if u.key})
    return out


if __name__ == "__main__":
    _child_main()
