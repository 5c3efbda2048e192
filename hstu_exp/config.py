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
    # Fixed attention scaling length N (DESIGN §2); None = max_history + max_candidates.
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
    autotune: bool = True  # triton: attention tiles and splits timed once per shape bucket


@dataclass
class GraphConfig:
    mode: str = "none"  # none | cudagraph
    batch_buckets: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    token_buckets: List[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048, 4352])


@dataclass
class WorkloadConfig:
    name: str = MISSING  # block | attention | e2e
    batch_size: int = 1
    total_history: int = 128  # T: history tokens per user after this request
    new_history: int = 128  # n: uncached history tokens computed by this request (n <= T)
    num_candidates: int = 256
    warmup: int = 10
    min_time_s: float = 1.0
    iters: int = 10  # at least this many timed iterations, however long min_time_s takes
    input_sets: int = 2  # rotated input sets, so repeated runs do not measure a warm cache
    # e2e request stream
    history_start: int = 256
    history_step: int = 256
    num_batches: int = 16
    num_users: Optional[int] = None  # distinct users in the stream; None = batch_size
    mode: str = "cache"  # e2e: baseline | cache | cache_graph


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "hstu-exp"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    tags: List[str] = field(default_factory=list)


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


def _choice(key: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value}: must be one of {', '.join(map(str, options))}")


def _positive(cfg, *keys: str) -> None:
    for key in keys:
        group, name = key.split(".")
        value = cfg[group][name]
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value}: must be positive")


def _power_of_two(key: str, value: int) -> None:
    if value & (value - 1):
        raise ConfigError(f"{key}={value}: must be a power of two")


def validate(cfg) -> None:
    """Checks of one key at a time, valid whatever the other keys say."""
    import torch

    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA GPU is available on this machine")
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("cache.mode", cfg.cache.mode, ("none", "paged", "paged_offload"))
    _choice("kernel.name", cfg.kernel.name, ("reference", "triton"))
    _choice("graph.mode", cfg.graph.mode, ("none", "cudagraph"))
    _choice("workload.name", cfg.workload.name, ("block", "attention", "e2e"))
    _choice("workload.mode", cfg.workload.mode, ("baseline", "cache", "cache_graph"))
    _choice("logger.name", cfg.logger.name, ("wandb", "none"))
    _choice("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    _positive(cfg, "model.num_layers", "model.hidden", "model.num_heads", "model.head_dim",
              "model.max_history", "model.max_candidates", "model.max_batch",
              "model.scaling_length", "model.item_vocab", "model.action_vocab", "model.num_tasks",
              "cache.page_size", "cache.num_pages", "cache.host_pages",
              "workload.batch_size", "workload.total_history", "workload.new_history",
              "workload.min_time_s", "workload.iters", "workload.input_sets",
              "workload.history_start", "workload.history_step", "workload.num_batches",
              "workload.num_users")
    for key in ("workload.num_candidates", "workload.warmup", "model.num_context"):
        group, name = key.split(".")
        if cfg[group][name] < 0:
            raise ConfigError(f"{key}={cfg[group][name]}: must not be negative")
    _power_of_two("cache.page_size", cfg.cache.page_size)
    if cfg.workload.input_sets < 2:
        raise ConfigError(f"workload.input_sets={cfg.workload.input_sets}: must be at least 2")


def point_problem(cfg) -> Optional[str]:
    """What makes this combination of keys impossible, or None. Message names the keys."""
    m, w, c = cfg.model, cfg.workload, cfg.cache
    if w.name in ("block", "attention"):
        if w.total_history > m.max_history:
            return (f"workload.total_history={w.total_history}: longer than the model's "
                    f"max_history={m.max_history}")
        if w.new_history > w.total_history:
            return (f"workload.new_history={w.new_history}: more than "
                    f"workload.total_history={w.total_history}")
        if w.name == "block" and c.mode == "none" and w.new_history != w.total_history:
            return (f"cache=none recomputes the whole history: workload.new_history={w.new_history}"
                    f" must equal workload.total_history={w.total_history}")
    if w.num_candidates > m.max_candidates:
        return (f"workload.num_candidates={w.num_candidates}: more than the model's "
                f"max_candidates={m.max_candidates}")
    if w.batch_size > m.max_batch:
        return f"workload.batch_size={w.batch_size}: more than the model's max_batch={m.max_batch}"
    if w.name == "e2e" and w.num_candidates == 0:
        return "workload.num_candidates=0: a ranking request needs at least one candidate"
    if w.name == "e2e" and w.mode != "baseline" and c.mode == "none":
        return (f"workload.mode={w.mode} needs cache=paged or cache=paged_offload "
                "(cache=none is workload.mode=baseline)")
    if c.mode != "none" and c.num_pages is not None:
        pages_per_user = -(-min(w.total_history, m.max_history) // c.page_size)
        if w.name == "e2e":
            pages_per_user = -(-m.max_history // c.page_size)
        need = w.batch_size * pages_per_user
        if c.num_pages < need:
            return (f"cache.num_pages={c.num_pages}: the pool holds fewer pages than one batch "
                    f"needs ({need} = batch_size {w.batch_size} x {pages_per_user} pages)")
    return None


def device_problem(cfg) -> Optional[str]:
    """What this point needs that a CPU device lacks, or None."""
    import os

    if cfg.graph.mode == "cudagraph":
        return "graph=cudagraph: CUDA graphs need a CUDA device"
    if cfg.workload.name == "e2e" and cfg.workload.mode == "cache_graph":
        return "workload.mode=cache_graph: CUDA graphs need a CUDA device"
    if cfg.kernel.name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return "kernel=triton: needs a CUDA device (or TRITON_INTERPRET=1, Triton's CPU interpreter)"
    return None
