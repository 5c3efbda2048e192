"""Config schemas and validation.

The dataclasses are registered in Hydra's ConfigStore as the base of every group option, so an
unknown key or a value of the wrong type fails at composition. Each field carries the checks a
type cannot express beside it (`knob`: range, choice, power of two; every float finite), which
`validate` applies, with the few rules that tie keys together; `point_problem` names what is
wrong with a combination of keys (a sweep records such a point as skipped, a single run stops
with the message).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from hstu_exp.core.buckets import all_buckets
from hstu_exp.core.paging import pages_for
from hstu_exp.ops.policy import GEMM_DTYPES, TUNE_TIMINGS


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit status 2, no traceback."""


DTYPES = ("float32", "bfloat16", "float16")
# cache.dtype: bf16 (K/V in the model dtype) | fp8 (e4m3 with a float32 scale a token-head).
CACHE_DTYPES = ("bf16", "fp8")
SERVE_CLOCKS = ("real", "simulated")
SERVE_MODES = ("online", "offline")
SERVE_SEARCHES = ("none", "max_qps")
SERVE_POLICIES = ("fifo", "length_aware")
ROUTING_POLICIES = ("hash", "least_loaded")  # serving.routing.POLICIES
# e2e mode -> (uses the KV cache, runs as CUDA graphs). The mode decides both: the cache group
# only says which cache a caching mode uses, and graph=cudagraph must agree with the mode.
E2E_MODES = {
    "baseline": (False, False),
    "baseline_graph": (False, True),
    "cache": (True, False),
    "cache_graph": (True, True),
}
# What a reduced-precision point (kernel.gemm_dtype=fp8, cache.dtype=fp8) must meet, or it is
# recorded failed and its timing dropped: candidate outputs within max_rel_error of a float32
# full recompute (worst request, norm-wise), and (e2e) the top-k of each ranking shared with the
# bf16 path.
ACCURACY_GATE = {"max_rel_error": 2e-2, "topk": 10, "topk_agreement": 0.99}
# What a serve point may ask for: past these a point runs for hours or draws gigabytes before it
# says anything (the caps name the cost in the message).
SERVE_MAX_REQUESTS = 200_000
SERVE_MAX_QUERIES = 2_000_000  # clock=real: LoadGen's queries in a run (~8 min at 4,000 qps)
SERVE_MAX_USERS = 10_000_000
_BYTES_PER_USER = 24  # the popularity weights, their cumulative sum and a first history length


def knob(default: Any = MISSING, **rules) -> Any:
    """A schema field with its constraints, checked by `validate` (every float must also be
    finite): positive, nonneg (bool); at_least=(n, why); within=(lo, hi) inclusive, with
    open_low=True for (lo, hi] and `what` naming the range; one_of=(...); pow2 (bool).
    name (bool: a path component). A list field's rules apply to each element."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class ModelConfig:
    name: str = MISSING
    num_layers: int = knob(positive=True)
    hidden: int = knob(positive=True)
    num_heads: int = knob(positive=True)
    head_dim: int = knob(positive=True)
    max_history: int = knob(positive=True)  # tokens of history per user (items and actions)
    max_candidates: int = knob(positive=True)
    max_batch: int = knob(16, positive=True)
    dtype: str = knob("bfloat16", one_of=DTYPES)
    # Fixed attention scaling length N (docs/design.md §2); None = max_history + max_candidates.
    scaling_length: Optional[int] = knob(None, positive=True)
    # Ranking model around the block (workload=e2e).
    item_vocab: int = knob(10_000, positive=True)
    action_vocab: int = knob(128, positive=True)
    num_context: int = knob(0, nonneg=True)  # contextual prefix tokens per request
    context_vocab: int = knob(1000, positive=True)
    position_embedding: bool = True
    head_widths: List[int] = knob([128, 10, 1], positive=True)
    num_tasks: int = knob(3, positive=True)


@dataclass
class CacheConfig:
    mode: str = knob("paged", one_of=("none", "paged", "paged_offload"))
    page_size: int = knob(32, positive=True, pow2=True)
    # GPU pool size in pages; None sizes it for max_batch users of max_history tokens, or for
    # workload=serve with cache=paged on a GPU, to gpu_fraction of the memory free once the
    # model is built (the record says how many users of max_history it holds).
    num_pages: Optional[int] = knob(None, positive=True)
    gpu_fraction: float = knob(
        0.5,
        within=(0, 0.95),
        open_low=True,
        what="a fraction of the free GPU memory; the step needs the rest",
    )
    # host tier (paged_offload); None = 4x the GPU pool
    host_pages: Optional[int] = knob(None, positive=True)
    # K/V in the pool, the host tier and their copies: bf16 (the model dtype) | fp8 (e4m3, a
    # float32 scale per token per head; ops/fp8.py). Like kernel.gemm_dtype=fp8 it passes the
    # accuracy gate (ACCURACY_GATE) or the point is recorded failed.
    dtype: str = knob("bf16", one_of=CACHE_DTYPES)


@dataclass
class KernelConfig:
    name: str = knob("reference", one_of=("reference", "triton"))
    # kernel=triton only; each is a field of ops.policy.KernelPolicy, which says what it does.
    autotune: bool = True  # attention tiles and splits timed once per shape bucket
    # null: tuned or by rule; 1: never split; n: about n splits
    split_k: Optional[int] = knob(None, positive=True)
    tma: bool = True
    hopper: bool = True
    hopper_group: int = knob(8, positive=True)
    fast_silu: bool = True
    tune_timing: str = knob("graph", one_of=TUNE_TIMINGS)  # graph | events
    silu_on_load: bool = True
    # UVQK and W_o GEMMs (both kernels): bf16 (the model dtype) | fp8 (e4m3, row-wise scales;
    # ops/fp8.py). A reduced-precision point passes its accuracy gate (ACCURACY_GATE) or is
    # recorded failed.
    gemm_dtype: str = knob("bf16", one_of=GEMM_DTYPES)


@dataclass
class GraphConfig:
    mode: str = knob("none", one_of=("none", "cudagraph"))
    batch_buckets: List[int] = knob([1, 2, 4, 8, 16], positive=True)
    token_buckets: List[int] = knob([128, 256, 512, 1024, 2048, 4352], positive=True)
    fit_rows: bool = False  # a batch's rows padded to a power of two, not to batch x tokens
    # captured graphs kept (least recently replayed dropped past it)
    max_graphs: int = knob(64, positive=True)


@dataclass
class WorkloadConfig:
    """Keys every workload has; each workload's own schema adds its keys (an e2e key on a block
    run is an unknown key at composition)."""

    name: str = MISSING  # block | attention | e2e | serve (WORKLOAD_SCHEMAS)
    batch_size: int = knob(1, positive=True)
    num_candidates: int = knob(256, nonneg=True)
    warmup: int = knob(10, nonneg=True)
    min_time_s: float = knob(1.0, positive=True)
    # at least this many timed iterations, however long min_time_s takes
    iters: int = knob(10, positive=True)
    # Validity: past min_time_s, timing goes on while the CV of the samples is above cv_max
    # (or fewer than min_samples were taken), up to max_time_s; a point that still misses
    # either is recorded ok with valid=false and the reason.
    max_time_s: Optional[float] = knob(None, positive=True)  # None: MAX_TIME_FACTOR x min_time_s
    cv_max: Optional[float] = knob(None, positive=True)  # None: the device's CV_MAX_DEFAULT
    min_samples: int = knob(10, at_least=(2, "a CV needs two samples"))
    # Independent repeats of the point, one after another in this process, each on a fresh
    # server (model, KV cache and CUDA graphs built anew); the record keeps every repeat.
    repeats: int = knob(1, positive=True)


@dataclass
class BlockWorkload(WorkloadConfig):
    total_history: int = knob(128, positive=True)  # T: history tokens per user after this request
    new_history: int = knob(128, positive=True)  # n: uncached tokens this request computes (n <= T)
    # rotated input sets, so repeated runs do not measure a warm cache
    input_sets: int = knob(2, at_least=(2, "rotated, so no run measures a warm cache"))


@dataclass
class AttentionWorkload(BlockWorkload):
    """The block's keys: T and n shape the attention call (n < T: paged mode)."""


@dataclass
class E2EWorkload(WorkloadConfig):
    mode: str = knob("cache", one_of=tuple(E2E_MODES))
    history_start: int = knob(256, positive=True)
    history_step: int = knob(256, positive=True)
    num_batches: int = knob(16, positive=True)
    num_users: Optional[int] = knob(None, positive=True)  # users in the stream; None = batch_size


@dataclass
class ServeWorkload(WorkloadConfig):
    """Ranking requests served under load (bench/serve.py, docs/serving.md). clock=real: LoadGen
    drives the real server on the wall clock (min_duration_s, min_query_count); clock=simulated:
    the discrete-event simulator over warmup_s + duration_s of simulated time. The base keys
    warmup, iters, min_time_s, max_time_s, cv_max and min_samples are not used."""

    # real (LoadGen on the wall clock) | simulated (the discrete-event what-if)
    clock: str = knob("real", one_of=SERVE_CLOCKS)
    # online (LoadGen Server: arrivals over time) | offline (LoadGen Offline: all at once)
    mode: str = knob("online", one_of=SERVE_MODES)
    # none | max_qps (the highest qps meeting the SLO, by bisection)
    search: str = knob("none", one_of=SERVE_SEARCHES)
    qps: float = knob(20.0, positive=True)  # Poisson arrival rate (offline: the expected rate)
    trace: Optional[str] = None  # clock=simulated: CSV time,user,new_items,candidates
    # the returning population; None: sized to the rate (qps x user_return_s)
    num_users: Optional[int] = knob(None, positive=True)
    user_return_s: float = knob(5.0, positive=True)  # num_users=None: mean time between returns
    user_skew: float = knob(0.0, nonneg=True)  # Zipf exponent of user popularity (0: uniform)
    items_per_return: int = knob(8, positive=True)  # history items each return adds
    # fraction of arrivals from users never seen before
    new_user_rate: float = knob(0.0, within=(0, 1), what="a fraction of arrivals")
    # candidates uniform in num_candidates..this; None: fixed
    candidates_max: Optional[int] = knob(None, positive=True)
    max_batch: int = knob(8, positive=True)  # at most this many requests a batch
    # the oldest waiting request waits at most this for a fuller batch
    max_wait_ms: float = knob(5.0, nonneg=True)
    policy: str = knob("fifo", one_of=SERVE_POLICIES)
    # requests of qps x warmup_s fill the cache before the timed part (simulated: not counted)
    warmup_s: float = knob(0.5, nonneg=True)
    duration_s: float = knob(2.0, positive=True)  # simulated: arrivals counted after warmup_s
    # simulated: fewer counted requests, the point's percentiles mean nothing
    min_requests: int = knob(20, positive=True)
    # the SLO: latency at slo_percentile <= slo_ms (MLPerf DLRMv3: p99 80)
    slo_ms: float = knob(80.0, positive=True)
    slo_percentile: float = knob(99.0, within=(0, 100), open_low=True)
    search_steps: int = knob(6, positive=True)  # max_qps: bisection steps after the bracket
    # Stop a run once the SLO is surely missed (search trials always do): bounds the time an
    # overloaded point takes (simulated: its percentiles cover the finished requests only).
    stop_on_miss: bool = False
    # verify=true: requests sampled and checked vs a full recompute
    verify_requests: int = knob(16, positive=True)
    # clock=real (LoadGen):
    min_duration_s: float = knob(60.0, positive=True)  # a run's minimum (MLPerf official: 600)
    min_query_count: int = knob(100, positive=True)  # a run's minimum query count
    search_duration_s: float = knob(10.0, positive=True)  # max_qps: each search trial's minimum
    final_seeds: int = knob(3, positive=True)  # max_qps: the final rate re-run with these seeds
    # LoadGen's schedule seed (and the population's) of a single run; None: the point's seed.
    # A sweep over it repeats a rate on the same model, graphs and tuning (gpu_serve.sh).
    loadgen_seed: Optional[int] = knob(None, nonneg=True)
    warm_rounds: int = knob(3, positive=True)  # start-up: quiet rounds of batches 1..max_batch
    warm_max_s: float = knob(600.0, positive=True)  # start-up warm-up stops after this long
    # Freeze what exists before a timed run out of Python's collector (serving/interpreter.py);
    # false: the collector walks everything, as a plain Python server's does (for an A/B).
    gc_freeze: bool = True
    # The interpreter's thread switch interval during a timed run (Python's default 5 ms): how
    # long the worker may wait for the GIL while another of the server's threads runs.
    switch_interval_ms: float = knob(5.0, positive=True)
    # clock=real: serving replicas behind the one LoadGen (each its own device, weights, pool)
    replicas: int = knob(1, positive=True)
    routing: str = knob("least_loaded", one_of=ROUTING_POLICIES)  # user -> replica
    # least_loaded: a pinned user moves once its replica's outstanding rows exceed the least
    # loaded one's by this fraction plus route_slack_rows (None: one full batch of the longest
    # requests)
    max_imbalance: float = knob(0.5, nonneg=True)
    route_slack_rows: Optional[int] = knob(None, nonneg=True)


# Default CV ceiling per device type: a GPU times steadily; a shared CPU does not.
CV_MAX_DEFAULT = {"cuda": 0.03, "cpu": 0.25}
MAX_TIME_FACTOR = 5
WORKLOAD_SCHEMAS = {
    "block": BlockWorkload,
    "attention": AttentionWorkload,
    "e2e": E2EWorkload,
    "serve": ServeWorkload,
}


@dataclass
class LoggerConfig:
    name: str = knob("wandb", one_of=("wandb", "none"))
    project: str = "hstu-exp"
    entity: Optional[str] = None
    # offline | online | disabled (WANDB_MODE, when set, wins)
    mode: str = knob("offline", one_of=("offline", "online", "disabled"))
    tags: List[str] = field(default_factory=list)
    # Seconds W&B may take to start (and to finish uploading) a run online; an online run is
    # killed after 2 * timeout_s + 10 s in all, and W&B is then off for the rest of the sweep.
    timeout_s: float = knob(30.0, positive=True)


@dataclass
class Config:
    model: ModelConfig = MISSING
    cache: CacheConfig = MISSING
    kernel: KernelConfig = MISSING
    graph: GraphConfig = MISSING
    workload: WorkloadConfig = MISSING
    logger: LoggerConfig = MISSING
    # names the sweep: W&B group and the default sweep dir's suffix (so one path component)
    name: str = knob("default", name=True)
    device: str = knob("auto", one_of=("auto", "cpu", "cuda"))
    seed: int = knob(0, within=(0, 2**63 - 1))  # numpy and torch take 0 .. 2**63 - 1
    verify: bool = False
    resume: bool = False
    calibrate: bool = True  # measure peak FLOP/s and bandwidth once per device for the roofline
    profile: bool = False  # after timing, profile a few iterations kernel by kernel


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("cache", CacheConfig),
        ("kernel", KernelConfig),
        ("graph", GraphConfig),
        ("workload", WorkloadConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    # Each conf/workload/*.yaml names its own schema: `<name>_schema`.
    for name, node in WORKLOAD_SCHEMAS.items():
        cs.store(group="workload", name=f"{name}_schema", node=node)


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)  # -1, not -1.0


def _check_field(key: str, value, rules: dict) -> None:
    """The field's own constraints (knob's rules); ConfigError naming key=value."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        for item in value:
            _check_field(key, item, rules)
        return
    bad = f"{key}={_shown(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{bad}: must be a finite number")
    if "one_of" in rules and value not in rules["one_of"]:
        raise ConfigError(f"{bad}: must be one of {', '.join(map(str, rules['one_of']))}")
    if rules.get("positive") and value <= 0:
        raise ConfigError(f"{bad}: must be positive")
    if rules.get("nonneg") and value < 0:
        raise ConfigError(f"{bad}: must not be negative")
    if "at_least" in rules and value < rules["at_least"][0]:
        least, why = rules["at_least"]
        raise ConfigError(f"{bad}: must be at least {least} ({why})")
    if "within" in rules:
        lo, hi = rules["within"]
        if not ((lo < value if rules.get("open_low") else lo <= value) and value <= hi):
            what = f"{rules['what']}, " if "what" in rules else ""
            raise ConfigError(
                f"{bad}: must be {what}in {'(' if rules.get('open_low') else '['}{lo}, {hi}]"
            )
    if rules.get("pow2") and value & (value - 1):
        raise ConfigError(f"{bad}: must be a power of two")
    if rules.get("name") and (not value.strip() or "/" in value or value in (".", "..")):
        raise ConfigError(f"{bad}: names a dir: must be a non-empty name without '/'")


def _check_schema(prefix: str, node, schema) -> None:
    for f in fields(schema):
        if f.name in node:
            key = f"{prefix}.{f.name}" if prefix else f.name
            _check_field(key, node[f.name], f.metadata)


def validate(cfg) -> None:
    """Each key against the constraints beside it in its schema (knob), then the rules that
    tie keys together whatever the point (a combination that only some points cannot run is
    point_problem's)."""
    import torch

    _check_schema("", cfg, Config)
    for group, schema in (
        ("model", ModelConfig),
        ("cache", CacheConfig),
        ("kernel", KernelConfig),
        ("graph", GraphConfig),
        ("logger", LoggerConfig),
    ):
        _check_schema(group, cfg[group], schema)
    w = cfg.workload
    _check_field("workload.name", w.name, {"one_of": tuple(WORKLOAD_SCHEMAS)})
    _check_schema("workload", w, WORKLOAD_SCHEMAS[w.name])
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA GPU is available on this machine")
    if w.max_time_s is not None and w.max_time_s < w.min_time_s:
        raise ConfigError(
            f"workload.max_time_s={w.max_time_s:g}: below workload.min_time_s={w.min_time_s:g}"
        )
    if w.name == "serve" and w.repeats != 1:
        raise ConfigError(
            f"workload.repeats={w.repeats}: serve points repeat through "
            "search=max_qps's final seeds, not workload.repeats"
        )
    if w.name == "serve":
        _validate_serve(w)
        gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if gpu and w.replicas > torch.cuda.device_count():
            raise ConfigError(
                f"workload.replicas={w.replicas}: more than the "
                f"{torch.cuda.device_count()} visible GPU(s), one replica a GPU"
            )


def _validate_serve(w) -> None:
    if w.batch_size != w.max_batch:
        raise ConfigError(
            f"workload.batch_size={w.batch_size}: workload=serve forms batches of "
            f"up to workload.max_batch={w.max_batch} (set that instead)"
        )
    if w.candidates_max is not None and w.candidates_max < w.num_candidates:
        raise ConfigError(
            f"workload.candidates_max={w.candidates_max}: below "
            f"workload.num_candidates={w.num_candidates} (the range's low end)"
        )
    if w.clock == "real":
        _real_clock(w)
    elif w.replicas > 1:
        raise ConfigError(
            f"workload.replicas={w.replicas}: replicas serve on the real clock "
            "only (workload.clock=real); the simulator models one server"
        )
    if w.num_users is not None and w.num_users > SERVE_MAX_USERS:
        raise ConfigError(
            f"workload.num_users={w.num_users}: at most {SERVE_MAX_USERS} (the "
            f"population alone would take "
            f"{w.num_users * _BYTES_PER_USER / 1e9:.1f} GB)"
        )
    if w.trace is None and (w.search == "none" or w.clock == "real"):
        keys, cap = ("warmup_s", "duration_s"), SERVE_MAX_REQUESTS
        if w.clock == "real":
            keys, cap = ("warmup_s", "min_duration_s"), SERVE_MAX_QUERIES
        span = w[keys[0]] + w[keys[1]]
        requests = w.qps * span
        if requests > cap:
            raise ConfigError(
                f"workload.qps={w.qps:g}: {requests:.3g} requests in "
                f"{' + '.join(keys)} = {span:g} s, more than the {cap} a point "
                f"may serve (hours of serving): lower qps or {keys[1]}"
            )
    if w.trace is not None:
        if not str(w.trace).strip():
            raise ConfigError(
                "workload.trace='': empty: name a trace CSV, or leave the key out "
                "for Poisson arrivals at workload.qps"
            )
        if w.clock == "real":
            raise ConfigError(
                f"workload.trace={w.trace}: LoadGen draws its own arrival times; "
                "a trace drives workload.clock=simulated"
            )
        if w.search != "none":
            raise ConfigError(
                f"workload.search={w.search}: searches the Poisson rate; a trace "
                "(workload.trace) fixes its own arrival times"
            )
        from hstu_exp.data.arrivals import TraceError, read_trace

        try:
            read_trace(w.trace)
        except TraceError as exc:
            raise ConfigError(f"workload.trace={w.trace}: {exc}") from None


def reduced_precision(cfg) -> List[str]:
    """The keys of a point that trade accuracy for speed (its accuracy gate applies)."""
    kernel, cache = cfg.get("kernel") or {}, cfg.get("cache") or {}
    keys = ["kernel.gemm_dtype=fp8"] if kernel.get("gemm_dtype") == "fp8" else []
    return keys + (["cache.dtype=fp8"] if cache.get("dtype") == "fp8" else [])


def _real_clock(w) -> None:
    """What LoadGen needs (workload.clock=real)."""
    if not 0 < w.slo_percentile < 100:
        raise ConfigError(
            f"workload.slo_percentile={w.slo_percentile:g}: LoadGen's latency "
            "percentile must be in (0, 100)"
        )
    from hstu_exp.stats import early_stopping_queries

    if w.mode == "online":  # the early-stopping rule judges the Server scenario only
        need = early_stopping_queries(w.slo_percentile)
        durations = [("workload.min_duration_s", w.min_duration_s)]
        if w.search == "max_qps":
            durations.append(("workload.search_duration_s", w.search_duration_s))
        for key, seconds in durations:
            if max(w.qps * seconds, w.min_query_count) < need:
                raise ConfigError(
                    f"{key}={seconds:g}: about {w.qps * seconds:g} queries at {w.qps:g} qps, "
                    f"fewer than the {need} LoadGen's early stopping needs at "
                    f"p{w.slo_percentile:g} (raise it to {need / w.qps:.3g} s or more)"
                )
    try:
        import mlperf_loadgen  # noqa: F401 - present, and it loads
    except ImportError:
        raise ConfigError(
            "workload.clock=real: needs MLPerf LoadGen: pip install mlcommons-loadgen"
        ) from None


def cv_max(workload, device_type: str) -> float:
    """The CV ceiling of a point: workload.cv_max, or the device's default."""
    if workload.cv_max is not None:
        return float(workload.cv_max)
    return CV_MAX_DEFAULT.get(device_type, CV_MAX_DEFAULT["cpu"])


def max_time_s(workload) -> float:
    """How long timing may go on for validity: workload.max_time_s, or a multiple of
    min_time_s."""
    if workload.max_time_s is not None:
        return float(workload.max_time_s)
    return MAX_TIME_FACTOR * workload.min_time_s


def pool_pages(model, cache) -> int:
    """GPU pool size in pages: cache.num_pages, or max_batch users of max_history tokens."""
    return cache.num_pages or model.max_batch * pages_for(model.max_history, cache.page_size)


def host_pages(model, cache) -> Optional[int]:
    """Host tier size in pages (cache=paged_offload), else None."""
    if cache.mode != "paged_offload":
        return None
    return cache.host_pages or 4 * pool_pages(model, cache)


def capacity_problem(
    *, seq_tokens: int, batch_size: int, page_size: int, num_pages: int, host_pages: Optional[int]
) -> Optional[str]:
    """Why a pool (and host tier) cannot serve batches of requests of up to `seq_tokens` cached
    tokens (context + history), or None."""
    one = pages_for(seq_tokens, page_size)
    if num_pages < batch_size * one:
        return (
            f"cache.num_pages={num_pages}: the KV pool holds fewer pages than one batch needs "
            f"({batch_size} requests x {one} pages of {page_size} tokens for {seq_tokens} "
            f"tokens)"
        )
    if host_pages is not None and host_pages < one:
        return (
            f"cache.host_pages={host_pages}: the host tier holds fewer pages than one request "
            f"needs ({one} pages of {page_size} tokens for {seq_tokens} tokens)"
        )
    return None


def e2e_ran(cfg) -> dict:
    """What an e2e point runs, from workload.mode: the cache ("none" without one) and graph."""
    cached, graphed = E2E_MODES[cfg.workload.mode]
    return {"cache": cfg.cache.mode if cached else "none", "graph": "cudagraph" if graphed else "none"}


def _e2e_problem(cfg) -> Optional[str]:
    m, w, c = cfg.model, cfg.workload, cfg.cache
    if w.num_candidates == 0:
        return "workload.num_candidates=0: a ranking request needs at least one candidate"
    if w.num_users is not None and w.num_users < w.batch_size:
        return f"workload.num_users={w.num_users}: fewer users than workload.batch_size={w.batch_size}"
    cached, graphed = E2E_MODES[w.mode]
    if cfg.graph.mode == "cudagraph" and not graphed:
        return (
            f"graph=cudagraph contradicts workload.mode={w.mode}: with workload=e2e the mode "
            "decides (baseline_graph or cache_graph run as CUDA graphs)"
        )
    if not cached:
        return None
    if c.mode == "none":
        return (
            f"workload.mode={w.mode} needs cache=paged or cache=paged_offload "
            "(cache=none is workload.mode=baseline or baseline_graph)"
        )
    from hstu_exp.data.synthetic import stream_for

    longest = stream_for(m, w, seed=cfg.seed).max_history
    return capacity_problem(
        seq_tokens=m.num_context + longest,
        batch_size=w.batch_size,
        page_size=c.page_size,
        num_pages=pool_pages(m, c),
        host_pages=host_pages(m, c),
    )


def _trace_arrivals(w) -> Optional[list]:
    """The trace's arrivals, or None for Poisson arrivals."""
    if w.trace is None:
        return None
    from hstu_exp.data.arrivals import read_trace

    return read_trace(w.trace)


def serve_window_requests(w, arrivals: Optional[list]) -> float:
    """Requests a serve point expects to count (arrivals in [warmup_s, warmup_s + duration_s)):
    qps x duration_s, or the trace's rows in that window (arrivals: _trace_arrivals(w))."""
    if arrivals is None:
        return w.qps * w.duration_s
    end = w.warmup_s + w.duration_s
    return sum(w.warmup_s <= a.time_s < end for a in arrivals)


def serve_candidates(w, arrivals: Optional[list] = None) -> tuple:
    """(fewest, most) candidates of a serve point's requests: the trace's, or
    num_candidates..candidates_max. arrivals: the trace's when the caller has read it."""
    if w.trace is not None:
        counts = [a.candidates for a in (arrivals or _trace_arrivals(w))]
        return min(counts), max(counts)
    return w.num_candidates, (w.candidates_max if w.candidates_max is not None else w.num_candidates)


def _graphs_fit(cfg) -> Optional[str]:
    """The real server captures every graph bucket a batch can fall in before its timed run
    (serving/server.py): they must all stay captured, or a run would evict and recapture."""
    m, g, c = cfg.model, cfg.graph, cfg.cache
    count = len(
        all_buckets(
            batch_buckets=g.batch_buckets,
            token_buckets=g.token_buckets,
            page_size=0 if c.mode == "none" else c.page_size,
            max_history=m.num_context + m.max_history,
            fit=g.fit_rows,
            max_candidates=m.max_candidates,
            num_context=m.num_context,
        )
    )
    if count > g.max_graphs:
        return (
            f"graph.max_graphs={g.max_graphs}: fewer than the {count} graph buckets a run can "
            "meet (the start-up warm-up captures them all); raise it or use fewer graph buckets"
        )
    return None


def _serve_problem(cfg) -> Optional[str]:
    m, w, c, g = cfg.model, cfg.workload, cfg.cache, cfg.graph
    if w.num_candidates == 0 and w.trace is None:
        return "workload.num_candidates=0: a ranking request needs at least one candidate"
    arrivals = _trace_arrivals(w)  # read once for the candidate and window checks
    most = serve_candidates(w, arrivals)[1]
    if most > m.max_candidates:
        key = f"workload.trace={w.trace}" if w.trace is not None else "workload.candidates_max"
        return (
            f"{key}: a request of {most} candidates, more than the model's "
            f"max_candidates={m.max_candidates}"
        )
    if w.max_batch > m.max_batch:
        return f"workload.max_batch={w.max_batch}: more than the model's max_batch={m.max_batch}"
    if g.mode == "cudagraph" and w.max_batch > max(g.batch_buckets):
        return (
            f"workload.max_batch={w.max_batch}: more than the largest graph bucket "
            f"(graph.batch_buckets={list(g.batch_buckets)})"
        )
    rows = m.num_context + m.max_history + most  # a miss computes the whole sequence
    if g.mode == "cudagraph" and rows > max(g.token_buckets):
        return (
            f"graph.token_buckets={list(g.token_buckets)}: none holds a request's "
            f"{rows} rows (context + model.max_history + candidates)"
        )
    if g.mode == "cudagraph" and w.clock == "real":
        problem = _graphs_fit(cfg)
        if problem:
            return problem
    expected = serve_window_requests(w, arrivals) if w.clock == "simulated" else math.inf
    if expected < w.min_requests:
        return (
            f"workload.duration_s={w.duration_s:g}: about {expected:g} requests arrive in it, "
            f"fewer than workload.min_requests={w.min_requests} (raise duration_s or qps)"
        )
    if c.mode == "none":
        return None
    return capacity_problem(
        seq_tokens=m.num_context + m.max_history,
        batch_size=w.max_batch,
        page_size=c.page_size,
        num_pages=pool_pages(m, c),
        host_pages=host_pages(m, c),
    )


def point_problem(cfg) -> Optional[str]:
    """What makes this combination of keys impossible, or None. Message names the keys."""
    m, w, c = cfg.model, cfg.workload, cfg.cache
    if cfg.kernel.gemm_dtype == "fp8":
        if m.dtype != "bfloat16":  # row-wise scaled GEMMs write bf16 (torch._scaled_mm on CUDA)
            return f"kernel.gemm_dtype=fp8 needs model.dtype=bfloat16, not {m.dtype}"
        width = m.num_heads * m.head_dim
        if m.hidden % 16 or width % 16:
            return (
                f"kernel.gemm_dtype=fp8: e4m3 GEMMs need model.hidden ({m.hidden}) and "
                f"num_heads x head_dim ({width}) to be multiples of 16"
            )
    if c.dtype == "fp8":
        problem = _fp8_cache_problem(cfg)
        if problem:
            return problem
    if w.num_candidates > m.max_candidates and not (w.name == "serve" and w.trace is not None):
        return (
            f"workload.num_candidates={w.num_candidates}: more than the model's "
            f"max_candidates={m.max_candidates}"
        )
    if w.name == "serve":
        return _serve_problem(cfg)
    if w.batch_size > m.max_batch:
        return f"workload.batch_size={w.batch_size}: more than the model's max_batch={m.max_batch}"
    if w.name == "e2e":
        return _e2e_problem(cfg)
    if w.total_history > m.max_history:
        return (
            f"workload.total_history={w.total_history}: longer than the model's "
            f"max_history={m.max_history}"
        )
    if w.new_history > w.total_history:
        return (
            f"workload.new_history={w.new_history}: more than workload.total_history={w.total_history}"
        )
    if w.name == "block" and c.mode == "none" and w.new_history != w.total_history:
        return (
            f"cache=none recomputes the whole history: workload.new_history={w.new_history}"
            f" must equal workload.total_history={w.total_history}"
        )
    if w.name == "block" and c.mode != "none":  # attention sizes its own pool for the batch
        return capacity_problem(
            seq_tokens=w.total_history,
            batch_size=w.batch_size,
            page_size=c.page_size,
            num_pages=pool_pages(m, c),
            host_pages=None,
        )
    return None


def _fp8_cache_problem(cfg) -> Optional[str]:
    """Why this point cannot hold its K/V in e4m3 (cache.dtype=fp8), or None."""
    m, w, c = cfg.model, cfg.workload, cfg.cache
    if m.dtype == "float32":  # the gate compares with the bf16 path; fp32 K/V is no baseline
        return (
            "cache.dtype=fp8 needs a half-precision model (model.dtype=bfloat16 or float16), not float32"
        )
    if w.name == "attention":
        paged = w.new_history < w.total_history
        return None if paged else "cache.dtype=fp8: workload.new_history=total_history reads no cache"
    if c.mode == "none" or (w.name == "e2e" and not E2E_MODES[w.mode][0]):
        which = f"workload.mode={w.mode}" if c.mode != "none" else "cache=none"
        return f"cache.dtype=fp8: {which} keeps no KV cache to hold in e4m3"
    return None


def footprint_bytes(cfg) -> tuple:
    """(weights, KV pool) in bytes: the least memory a point's model takes on its device
    (activations and embeddings come on top)."""
    m, c = cfg.model, cfg.cache
    width = m.num_heads * m.head_dim
    weights = m.num_layers * 5 * m.hidden * width  # UVQK projection and the output projection
    item = 4 if m.dtype == "float32" else 2
    token_head = m.head_dim + 4 if c.dtype == "fp8" else item * m.head_dim  # e4m3 + its scale
    pool = (
        0
        if c.mode == "none"
        else pool_pages(m, c) * c.page_size * 2 * m.num_layers * m.num_heads * token_head
    )  # K and V of every slot
    return item * weights, pool


def memory_problem(cfg, device_bytes: int) -> Optional[str]:
    """Why the point cannot fit the device's memory (`device_bytes` in all), or None."""
    weights, pool = footprint_bytes(cfg)
    if weights + pool <= device_bytes:
        return None
    m, c = cfg.model, cfg.cache
    if pool > weights:
        what = (
            f"cache.num_pages={c.num_pages}"
            if c.num_pages
            else f"model.max_batch={m.max_batch} x model.max_history={m.max_history}"
        )
        part = f"{what}: the KV pool takes {pool / 1e9:.3g} GB"
    else:
        part = (
            f"model.hidden={m.hidden}, model.num_layers={m.num_layers}: the layers' weights "
            f"take {weights / 1e9:.3g} GB"
        )
    return f"{part}, more than the device's {device_bytes / 1e9:.3g} GB of memory"


def device_problem(cfg) -> Optional[str]:
    """What this point needs that a CPU device lacks, or None."""
    import os

    if cfg.graph.mode == "cudagraph":
        return "graph=cudagraph: CUDA graphs need a CUDA device"
    if cfg.workload.name == "e2e" and E2E_MODES[cfg.workload.mode][1]:
        return f"workload.mode={cfg.workload.mode}: CUDA graphs need a CUDA device"
    if cfg.kernel.name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return "kernel=triton: needs a CUDA device (or TRITON_INTERPRET=1, Triton's CPU interpreter)"
    return None
