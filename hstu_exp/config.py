"""Config schemas and validation.

The dataclasses are registered in Hydra's ConfigStore as the base of every group option, so an
unknown key or a value of the wrong type fails at composition. `validate` adds the range checks
that a type cannot express; `point_problem` names what is wrong with a combination of keys (a sweep
records such a point as skipped, a single run stops with the message).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from hstu_exp.core.paging import pages_for
from hstu_exp.ops.policy import TUNE_TIMINGS


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit status 2, no traceback."""


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    name: str = MISSING
    num_layers: int = MISSING
    hidden: int = MISSING
    num_heads: int = MISSING
    head_dim: int = MISSING
    max_history: int = MISSING  # tokens of history per user (items and actions interleaved)
    max_candidates: int = MISSING
    max_batch: int = 16
    dtype: str = "bfloat16"
    # Fixed attention scaling length N (docs/design.md §2); None = max_history + max_candidates.
    scaling_length: Optional[int] = None
    # Ranking model around the block (workload=e2e).
    item_vocab: int = 10_000
    action_vocab: int = 128
    num_context: int = 0  # contextual prefix tokens per request
    context_vocab: int = 1000
    position_embedding: bool = True
    head_widths: List[int] = field(default_factory=lambda: [128, 10, 1])
    num_tasks: int = 3


@dataclass
class CacheConfig:
    mode: str = "paged"  # none | paged | paged_offload
    page_size: int = 32
    # GPU pool size in pages; None sizes it for max_batch users of max_history tokens.
    num_pages: Optional[int] = None
    host_pages: Optional[int] = None  # host tier (paged_offload); None = 4x the GPU pool


@dataclass
class KernelConfig:
    name: str = "reference"  # reference | triton
    # kernel=triton only; each is a field of ops.policy.KernelPolicy, which says what it does.
    autotune: bool = True  # attention tiles and splits timed once per shape bucket
    split_k: Optional[int] = None  # null: tuned or by rule; 1: never split; n: about n splits
    tma: bool = True
    hopper: bool = True
    hopper_group: int = 8
    fast_silu: bool = True
    tune_timing: str = "graph"  # graph | events
    silu_on_load: bool = True


@dataclass
class GraphConfig:
    mode: str = "none"  # none | cudagraph
    batch_buckets: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    token_buckets: List[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048, 4352])
    fit_rows: bool = False  # a batch's rows padded to a power of two, not to batch x tokens
    max_graphs: int = 64  # captured graphs kept (least recently replayed dropped past it)


@dataclass
class WorkloadConfig:
    """Keys every workload has; each workload's own schema adds its keys (an e2e key on a block
    run is an unknown key at composition)."""
    name: str = MISSING  # block | attention | e2e | serve
    batch_size: int = 1
    num_candidates: int = 256
    warmup: int = 10
    min_time_s: float = 1.0
    iters: int = 10  # at least this many timed iterations, however long min_time_s takes
    # Validity: past min_time_s, timing goes on while the CV of the samples is above cv_max
    # (or fewer than min_samples were taken), up to max_time_s; a point that still misses
    # either is recorded ok with valid=false and the reason.
    max_time_s: Optional[float] = None  # None: MAX_TIME_FACTOR x min_time_s
    cv_max: Optional[float] = None  # None: the device's default (CV_MAX_DEFAULT)
    min_samples: int = 10
    # Independent repeats of the point, one after another in this process, each on a fresh
    # server (model, KV cache and CUDA graphs built anew); the record keeps every repeat.
    repeats: int = 1


@dataclass
class BlockWorkload(WorkloadConfig):
    total_history: int = 128  # T: history tokens per user after this request
    new_history: int = 128  # n: uncached history tokens computed by this request (n <= T)
    input_sets: int = 2  # rotated input sets, so repeated runs do not measure a warm cache


@dataclass
class AttentionWorkload(BlockWorkload):
    """The block's keys: T and n shape the attention call (n < T: paged mode)."""


@dataclass
class E2EWorkload(WorkloadConfig):
    mode: str = "cache"  # baseline | baseline_graph | cache | cache_graph (E2E_MODES)
    history_start: int = 256
    history_step: int = 256
    num_batches: int = 16
    num_users: Optional[int] = None  # distinct users in the stream; None = batch_size


@dataclass
class ServeWorkload(WorkloadConfig):
    """An open-loop request stream in front of the serving layer (bench/serve.py). The base keys
    warmup, iters, min_time_s, max_time_s, cv_max and min_samples are not used: the run lasts
    warmup_s + duration_s of simulated time and needs min_requests."""
    mode: str = "online"  # online (arrivals over time) | offline (all available at once)
    search: str = "none"  # none | max_qps (the highest qps meeting the SLO, by bisection)
    qps: float = 20.0  # Poisson arrival rate (offered load)
    trace: Optional[str] = None  # CSV time,user,new_items,candidates instead of Poisson arrivals
    num_users: int = 64  # the returning population
    user_skew: float = 1.0  # Zipf exponent of user popularity (0: uniform)
    items_per_return: int = 8  # history items (item + action tokens) each return adds
    new_user_rate: float = 0.0  # fraction of arrivals from users never seen before
    candidates_max: Optional[int] = None  # candidates uniform in num_candidates..this; None: fixed
    max_batch: int = 8  # at most this many requests a batch
    max_wait_ms: float = 5.0  # the oldest waiting request waits at most this for a fuller batch
    policy: str = "fifo"  # fifo | length_aware (SERVE_POLICIES)
    warmup_s: float = 0.5  # served, not counted
    duration_s: float = 2.0  # arrivals counted after warmup_s
    min_requests: int = 20  # fewer counted requests: the point's percentiles mean nothing
    slo_ms: float = 80.0  # the SLO: latency at slo_percentile <= slo_ms (MLPerf DLRMv3: p99 80)
    slo_percentile: float = 99.0
    search_steps: int = 6  # max_qps: bisection steps after the bracket is found
    # Stop a run once the SLO is surely missed (search trials always do): bounds the time an
    # overloaded point takes; its percentiles then cover the finished requests only (valid=false).
    stop_on_miss: bool = False
    verify_requests: int = 16  # verify=true: requests sampled and checked vs a full recompute


SERVE_MODES = ("online", "offline")
SERVE_SEARCHES = ("none", "max_qps")
SERVE_POLICIES = ("fifo", "length_aware")

# e2e mode -> (uses the KV cache, runs as CUDA graphs). The mode decides both: the cache group
# only says which cache a caching mode uses, and graph=cudagraph must agree with the mode.
E2E_MODES = {"baseline": (False, False), "baseline_graph": (False, True),
             "cache": (True, False), "cache_graph": (True, True)}
# Default CV ceiling per device type: a GPU times steadily; a shared CPU does not.
CV_MAX_DEFAULT = {"cuda": 0.03, "cpu": 0.25}
MAX_TIME_FACTOR = 5
WORKLOAD_SCHEMAS = {"block": BlockWorkload, "attention": AttentionWorkload, "e2e": E2EWorkload,
                    "serve": ServeWorkload}


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "hstu-exp"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE, when set, wins)
    tags: List[str] = field(default_factory=list)
    # Seconds W&B may take to start (and to finish uploading) a run online; an online run is
    # killed after 2 * timeout_s + 10 s in all, and W&B is then off for the rest of the sweep.
    timeout_s: float = 30.0


@dataclass
class Config:
    model: ModelConfig = MISSING
    cache: CacheConfig = MISSING
    kernel: KernelConfig = MISSING
    graph: GraphConfig = MISSING
    workload: WorkloadConfig = MISSING
    logger: LoggerConfig = MISSING
    name: str = "default"  # names the sweep: W&B group and sweep-dir prefix
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    verify: bool = False
    resume: bool = False
    calibrate: bool = True  # measure peak FLOP/s and bandwidth once per device for the roofline
    profile: bool = False  # after timing, profile a few iterations kernel by kernel


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [("model", ModelConfig), ("cache", CacheConfig), ("kernel", KernelConfig),
                        ("graph", GraphConfig), ("workload", WorkloadConfig),
                        ("logger", LoggerConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    # Each conf/workload/*.yaml names its own schema: `<name>_schema`.
    for name, node in WORKLOAD_SCHEMAS.items():
        cs.store(group="workload", name=f"{name}_schema", node=node)


def _choice(key: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value}: must be one of {', '.join(map(str, options))}")


def _positive(cfg, *keys: str) -> None:
    for key in keys:
        group, name = key.split(".")
        if name not in cfg[group]:  # a key of another workload's schema
            continue
        value = cfg[group][name]
        if value is not None and value <= 0:
            shown = f"{value:g}" if isinstance(value, float) else value  # -1, not -1.0
            raise ConfigError(f"{key}={shown}: must be positive")


def _power_of_two(key: str, value: int) -> None:
    if value & (value - 1):
        raise ConfigError(f"{key}={value}: must be a power of two")


def validate(cfg) -> None:
    """Checks of one key at a time (and of keys that are wrong together whatever the point),
    valid whatever the other keys say."""
    import torch

    w = cfg.workload
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA GPU is available on this machine")
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("cache.mode", cfg.cache.mode, ("none", "paged", "paged_offload"))
    _choice("kernel.name", cfg.kernel.name, ("reference", "triton"))
    _choice("kernel.tune_timing", cfg.kernel.tune_timing, TUNE_TIMINGS)
    _positive(cfg, "kernel.split_k", "kernel.hopper_group")
    _choice("graph.mode", cfg.graph.mode, ("none", "cudagraph"))
    _choice("workload.name", w.name, tuple(WORKLOAD_SCHEMAS))
    if w.name == "e2e":
        _choice("workload.mode", w.mode, tuple(E2E_MODES))
    if w.name == "serve":
        _validate_serve(w)
    _choice("logger.name", cfg.logger.name, ("wandb", "none"))
    _choice("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    _positive(cfg, "logger.timeout_s")
    _positive(cfg, "model.num_layers", "model.hidden", "model.num_heads", "model.head_dim",
              "model.max_history", "model.max_candidates", "model.max_batch",
              "model.scaling_length", "model.item_vocab", "model.action_vocab", "model.num_tasks",
              "cache.page_size", "cache.num_pages", "cache.host_pages",
              "workload.batch_size", "workload.total_history", "workload.new_history",
              "workload.min_time_s", "workload.max_time_s", "workload.iters",
              "workload.input_sets", "workload.history_start", "workload.history_step",
              "workload.num_batches", "workload.num_users", "workload.cv_max",
              "workload.qps", "workload.items_per_return", "workload.max_batch",
              "workload.duration_s", "workload.min_requests", "workload.slo_ms",
              "workload.search_steps", "workload.verify_requests", "workload.repeats",
              "graph.max_graphs")
    for key in ("workload.num_candidates", "workload.warmup", "model.num_context"):
        group, name = key.split(".")
        if cfg[group][name] < 0:
            raise ConfigError(f"{key}={cfg[group][name]}: must not be negative")
    _power_of_two("cache.page_size", cfg.cache.page_size)
    if "input_sets" in w and w.input_sets < 2:
        raise ConfigError(f"workload.input_sets={w.input_sets}: must be at least 2")
    if w.max_time_s is not None and w.max_time_s < w.min_time_s:
        raise ConfigError(f"workload.max_time_s={w.max_time_s:g}: below "
                          f"workload.min_time_s={w.min_time_s:g}")
    if w.min_samples < 2:
        raise ConfigError(f"workload.min_samples={w.min_samples}: must be at least 2 "
                          "(a CV needs two samples)")
    if w.name == "serve" and w.repeats != 1:
        raise ConfigError(f"workload.repeats={w.repeats}: serve points repeat through "
                          "search=max_qps's final seeds, not workload.repeats")


def _validate_serve(w) -> None:
    _choice("workload.mode", w.mode, SERVE_MODES)
    _choice("workload.search", w.search, SERVE_SEARCHES)
    _choice("workload.policy", w.policy, SERVE_POLICIES)
    for key in ("warmup_s", "max_wait_ms", "user_skew"):
        if w[key] < 0:
            raise ConfigError(f"workload.{key}={w[key]:g}: must not be negative")
    if not 0 <= w.new_user_rate <= 1:
        raise ConfigError(f"workload.new_user_rate={w.new_user_rate:g}: must be a fraction of "
                          "arrivals, in [0, 1]")
    if not 0 < w.slo_percentile <= 100:
        raise ConfigError(f"workload.slo_percentile={w.slo_percentile:g}: must be in (0, 100]")
    if w.batch_size != w.max_batch:
        raise ConfigError(f"workload.batch_size={w.batch_size}: workload=serve forms batches of "
                          f"up to workload.max_batch={w.max_batch} (set that instead)")
    if w.candidates_max is not None and w.candidates_max < w.num_candidates:
        raise ConfigError(f"workload.candidates_max={w.candidates_max}: below "
                          f"workload.num_candidates={w.num_candidates} (the range's low end)")
    if w.trace is not None:
        if w.search != "none":
            raise ConfigError(f"workload.search={w.search}: searches the Poisson rate; a trace "
                              "(workload.trace) fixes its own arrival times")
        from hstu_exp.data.arrivals import TraceError, read_trace

        try:
            read_trace(w.trace)
        except TraceError as exc:
            raise ConfigError(f"workload.trace={w.trace}: {exc}") from None


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


def capacity_problem(*, seq_tokens: int, batch_size: int, page_size: int, num_pages: int,
                     host_pages: Optional[int]) -> Optional[str]:
    """Why a pool (and host tier) cannot serve batches of requests of up to `seq_tokens` cached
    tokens (context + history), or None."""
    one = pages_for(seq_tokens, page_size)
    if num_pages < batch_size * one:
        return (f"cache.num_pages={num_pages}: the KV pool holds fewer pages than one batch needs "
                f"({batch_size} requests x {one} pages of {page_size} tokens for {seq_tokens} "
                f"tokens)")
    if host_pages is not None and host_pages < one:
        return (f"cache.host_pages={host_pages}: the host tier holds fewer pages than one request "
                f"needs ({one} pages of {page_size} tokens for {seq_tokens} tokens)")
    return None


def e2e_ran(cfg) -> dict:
    """What an e2e point runs, from workload.mode: the cache ("none" without one) and graph."""
    cached, graphed = E2E_MODES[cfg.workload.mode]
    return {"cache": cfg.cache.mode if cached else "none",
            "graph": "cudagraph" if graphed else "none"}


def _e2e_problem(cfg) -> Optional[str]:
    m, w, c = cfg.model, cfg.workload, cfg.cache
    if w.num_candidates == 0:
        return "workload.num_candidates=0: a ranking request needs at least one candidate"
    if w.num_users is not None and w.num_users < w.batch_size:
        return (f"workload.num_users={w.num_users}: fewer users than "
                f"workload.batch_size={w.batch_size}")
    cached, graphed = E2E_MODES[w.mode]
    if cfg.graph.mode == "cudagraph" and not graphed:
        return (f"graph=cudagraph contradicts workload.mode={w.mode}: with workload=e2e the mode "
                "decides (baseline_graph or cache_graph run as CUDA graphs)")
    if not cached:
        return None
    if c.mode == "none":
        return (f"workload.mode={w.mode} needs cache=paged or cache=paged_offload "
                "(cache=none is workload.mode=baseline or baseline_graph)")
    from hstu_exp.data.synthetic import stream_for

    longest = stream_for(m, w, seed=cfg.seed).max_history
    return capacity_problem(seq_tokens=m.num_context + longest, batch_size=w.batch_size,
                            page_size=c.page_size, num_pages=pool_pages(m, c),
                            host_pages=host_pages(m, c))


def serve_window_requests(w) -> float:
    """Requests a serve point expects to count (arrivals in [warmup_s, warmup_s + duration_s)):
    qps x duration_s, or the trace's rows in that window."""
    if w.trace is None:
        return w.qps * w.duration_s
    from hstu_exp.data.arrivals import read_trace

    end = w.warmup_s + w.duration_s
    return sum(w.warmup_s <= a.time_s < end for a in read_trace(w.trace))


def _serve_problem(cfg) -> Optional[str]:
    m, w, c, g = cfg.model, cfg.workload, cfg.cache, cfg.graph
    most = w.candidates_max if w.candidates_max is not None else w.num_candidates
    if w.num_candidates == 0:
        return "workload.num_candidates=0: a ranking request needs at least one candidate"
    if most > m.max_candidates:
        return (f"workload.candidates_max={most}: more than the model's "
                f"max_candidates={m.max_candidates}")
    if w.max_batch > m.max_batch:
        return f"workload.max_batch={w.max_batch}: more than the model's max_batch={m.max_batch}"
    if g.mode == "cudagraph" and w.max_batch > max(g.batch_buckets):
        return (f"workload.max_batch={w.max_batch}: more than the largest graph bucket "
                f"(graph.batch_buckets={list(g.batch_buckets)})")
    rows = m.num_context + m.max_history + most  # a miss computes the whole sequence
    if g.mode == "cudagraph" and rows > max(g.token_buckets):
        return (f"graph.token_buckets={list(g.token_buckets)}: none holds a request's "
                f"{rows} rows (context + model.max_history + candidates)")
    expected = serve_window_requests(w)
    if expected < w.min_requests:
        return (f"workload.duration_s={w.duration_s:g}: about {expected:g} requests arrive in it, "
                f"fewer than workload.min_requests={w.min_requests} (raise duration_s or qps)")
    if c.mode == "none":
        return None
    return capacity_problem(seq_tokens=m.num_context + m.max_history, batch_size=w.max_batch,
                            page_size=c.page_size, num_pages=pool_pages(m, c),
                            host_pages=host_pages(m, c))


def point_problem(cfg) -> Optional[str]:
    """What makes this combination of keys impossible, or None. Message names the keys."""
    m, w, c = cfg.model, cfg.workload, cfg.cache
    if w.num_candidates > m.max_candidates:
        return (f"workload.num_candidates={w.num_candidates}: more than the model's "
                f"max_candidates={m.max_candidates}")
    if w.name == "serve":
        return _serve_problem(cfg)
    if w.batch_size > m.max_batch:
        return f"workload.batch_size={w.batch_size}: more than the model's max_batch={m.max_batch}"
    if w.name == "e2e":
        return _e2e_problem(cfg)
    if w.total_history > m.max_history:
        return (f"workload.total_history={w.total_history}: longer than the model's "
                f"max_history={m.max_history}")
    if w.new_history > w.total_history:
        return (f"workload.new_history={w.new_history}: more than "
                f"workload.total_history={w.total_history}")
    if w.name == "block" and c.mode == "none" and w.new_history != w.total_history:
        return (f"cache=none recomputes the whole history: workload.new_history={w.new_history}"
                f" must equal workload.total_history={w.total_history}")
    if w.name == "block" and c.mode != "none":  # attention sizes its own pool for the batch
        return capacity_problem(seq_tokens=w.total_history, batch_size=w.batch_size,
                                page_size=c.page_size, num_pages=pool_pages(m, c),
                                host_pages=None)
    return None


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
