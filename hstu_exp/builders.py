"""Config -> modules: every object a workload times is built here from config groups, and what
is built takes plain arguments (the hot path never sees a config object). Workloads read their
own sizes (batch, histories, timing) from the config; construction is this module's.

Modules are reused across the points of a sweep that share their config (one of each kind is
kept): a sweep over batch and history keeps its weights, its KV pool and its captured graphs.
"""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf

from hstu_exp import first_use
from hstu_exp.config import host_pages, pool_pages
from hstu_exp.core.paging import pages_for
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import HSTUBlock
from hstu_exp.ops import kernels
from hstu_exp.ops.policy import KernelPolicy


def scaling_length(model) -> int:
    return model.scaling_length or model.max_history + model.max_candidates


def kernel_policy(kernel) -> KernelPolicy:
    """The kernel group's knobs as the value the kernels take; their one-off work (tuning) is
    timed as first-use work, which workload=serve keeps off its service clock."""
    return KernelPolicy(
        autotune=bool(kernel.autotune),
        split_k=kernel.split_k,
        tma=bool(kernel.tma),
        hopper=bool(kernel.hopper),
        hopper_group=int(kernel.hopper_group),
        fast_silu=bool(kernel.fast_silu),
        tune_timing=str(kernel.tune_timing),
        silu_on_load=bool(kernel.silu_on_load),
        gemm_dtype=str(kernel.gemm_dtype),
        one_off=first_use.first_use,
    )


def kernel_args(kernel) -> dict:
    """The kernel group as the model constructors' plain keyword arguments."""
    return {"kernel": kernel.name, "policy": kernel_policy(kernel)}


def build_block(model, *, kernel: dict, device, dtype: torch.dtype) -> HSTUBlock:
    block = HSTUBlock(
        num_layers=model.num_layers,
        hidden=model.hidden,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        scaling_length=scaling_length(model),
        **kernel,
    )
    return block.to(device=device, dtype=dtype).eval()


def kernels_for(kernel):
    """The kernel group's attention/append ops (`ops.Kernels`), for workloads that call a
    kernel directly rather than through a block."""
    return kernels(kernel.name, kernel_policy(kernel))


def card_pages(model, cache, *, device, dtype: torch.dtype) -> int:
    """Pages of a pool that takes cache.gpu_fraction of the GPU memory free now (call it once
    the model is on the GPU)."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(cache.gpu_fraction * free // page_bytes(model, cache, dtype))


def page_bytes(model, cache, dtype: torch.dtype) -> int:
    """Bytes of one pool page over all layers: K and V, in e4m3 plus a float32 scale a
    token-head with cache.dtype=fp8."""
    if cache.dtype == "fp8":
        token_head = model.head_dim + 4
    else:
        token_head = model.head_dim * torch.empty((), dtype=dtype).element_size()
    return model.num_layers * 2 * cache.page_size * model.num_heads * token_head


def build_cache(model, cache, *, device, dtype: torch.dtype, num_pages=None):
    """num_pages: overrides the cache group's sizing (`card_pages`)."""
    if cache.mode == "none":
        return None
    kwargs = dict(
        num_layers=model.num_layers,
        num_pages=num_pages or pool_pages(model, cache),
        page_size=cache.page_size,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        dtype=dtype,
        device=device,
        fp8=cache.dtype == "fp8",
    )
    if cache.mode == "paged_offload":
        from hstu_exp.kvcache.offload import OffloadPagedKVCache

        return OffloadPagedKVCache(host_pages=host_pages(model, cache), **kwargs)
    return PagedKVCache(**kwargs)


def build_layer_cache(
    model, cache, *, batch_size: int, tokens: int, device, dtype: torch.dtype
) -> PagedKVCache:
    """One layer of K/V pages (workload=attention times one layer's kernel call), large enough
    for `batch_size` users of `tokens` tokens whatever cache.num_pages says."""
    num_pages = max(pool_pages(model, cache), batch_size * pages_for(tokens, cache.page_size))
    return PagedKVCache(
        num_layers=1,
        num_pages=num_pages,
        page_size=cache.page_size,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        dtype=dtype,
        device=device,
        fp8=cache.dtype == "fp8",
    )


def model_dtype(model) -> torch.dtype:
    """model.dtype (a name `config.DTYPES` allows) as the torch dtype."""
    return getattr(torch, model.dtype)


# kind -> (key, object): the last object of each kind, so the points of a sweep that share a
# config share its weights, pool and graphs. Process-wide because Hydra runs a sweep's points as
# calls of one task function in one process, and building (and capturing) again for every point
# would cost more than the points themselves.
_BUILT: dict = {}


def reuse(kind: str, key, make):
    """The object built for `key` last time, or a new one (dropping the old one first)."""
    key = json.dumps(key, sort_keys=True, default=str)
    hit = _BUILT.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    _BUILT.pop(kind, None)
    if kind != "graphs":  # captured graphs point into the old modules' memory
        _BUILT.pop("graphs", None)
    obj = make()
    _BUILT[kind] = (key, obj)
    return obj


def _built_key(obj) -> str:
    """The kind and key `obj` was built under by `reuse`."""
    for kind, (key, built) in _BUILT.items():
        if built is obj:
            return f"{kind}:{key}"
    raise ValueError(f"{type(obj).__name__} was not built by hstu_exp.builders")


def kv_tokens(model) -> int:
    """The longest KV a user holds: the context prefix, then the history."""
    return model.num_context + model.max_history


def forget() -> None:
    """Drop every module built so far: the next point (or repeat) builds afresh."""
    _BUILT.clear()


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def shared_block(model, *, kernel: dict, device, dtype, seed: int):
    """kernel: `kernel_args(cfg.kernel)`."""

    def make():
        torch.manual_seed(seed)
        return build_block(model, kernel=kernel, device=device, dtype=dtype)

    return reuse("block", [_plain(model), kernel, str(device), str(dtype), seed], make)


def shared_ranker(model, *, kernel: dict, device, dtype, seed: int):
    """The ranking model of workload=e2e (embeddings, block, heads). kernel: `kernel_args`."""
    return reuse(
        "ranker",
        [_plain(model), kernel, str(device), str(dtype), seed],
        lambda: new_ranker(model, kernel=kernel, device=device, dtype=dtype, seed=seed),
    )


def new_ranker(model, *, kernel: dict, device, dtype, seed: int):
    """A ranking model of its own (not reused): `shared_ranker`'s, built afresh."""
    from hstu_exp.model.ranking import HSTURanker

    torch.manual_seed(seed)
    ranker = HSTURanker(
        num_layers=model.num_layers,
        hidden=model.hidden,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        scaling_length=scaling_length(model),
        **kernel,
        item_vocab=model.item_vocab,
        action_vocab=model.action_vocab,
        num_context=model.num_context,
        context_vocab=model.context_vocab,
        max_history=model.max_history,
        position_embedding=model.position_embedding,
        head_widths=list(model.head_widths),
        num_tasks=model.num_tasks,
    )
    return ranker.to(device=device, dtype=dtype).eval()


def shared_cache(model, cache, *, device, dtype, to_card: bool = False):
    """A cache with no users in it (a reused pool is reset). to_card: a paged pool on a GPU
    without cache.num_pages takes cache.gpu_fraction of the free memory (`card_pages`)."""
    if cache.mode == "none":
        return None
    num_pages = None
    if to_card and cache.mode == "paged" and not cache.num_pages and torch.device(device).type == "cuda":
        hit = _BUILT.get("cache")
        if hit is not None and hit[0] == json.dumps(
            ["card", _plain(model), _plain(cache), str(device), str(dtype)], sort_keys=True, default=str
        ):
            num_pages = hit[1].num_pages  # the card-sized pool already built: keep it
        else:
            _BUILT.pop("cache", None)  # free the old pool before measuring what is free
            _BUILT.pop("graphs", None)
            torch.cuda.empty_cache()
            num_pages = card_pages(model, cache, device=device, dtype=dtype)
    key = (
        [_plain(model), _plain(cache), str(device), str(dtype)]
        if num_pages is None
        else ["card", _plain(model), _plain(cache), str(device), str(dtype)]
    )
    built = reuse(
        "cache", key, lambda: build_cache(model, cache, device=device, dtype=dtype, num_pages=num_pages)
    )
    built.reset()
    return built


def shared_graphs(module, cache, model, graph, *, device, dtype, progress):
    """Graph runner of `module` over one `BucketGraphs` core: an HSTUBlock (GraphedBlock) or a
    whole HSTURanker (GraphedRanker: embeddings, block and heads in each graph)."""
    # Keyed by what the graphs capture: the config the module and the cache were built from.
    graphs = reuse(
        "graphs",
        [_plain(graph), _built_key(module), None if cache is None else _built_key(cache)],
        lambda: new_graphs(module, cache, model, graph, device=device, dtype=dtype, progress=progress),
    )
    graphs.core.progress = progress
    return graphs


def new_graphs(module, cache, model, graph, *, device, dtype, progress):
    """A graph runner of its own (not reused): `shared_graphs`'s, built afresh."""
    from hstu_exp.graphs import BucketGraphs, GraphedBlock, GraphedRanker

    core = BucketGraphs(
        device=device,
        batch_buckets=graph.batch_buckets,
        token_buckets=graph.token_buckets,
        fit_rows=graph.fit_rows,
        max_graphs=graph.max_graphs,
        progress=progress,
        **_bucket_shape(model, cache),
    )
    if isinstance(module, HSTUBlock):
        return GraphedBlock(module, core, hidden=model.hidden, dtype=dtype)
    return GraphedRanker(module, core)


def eager_shapes(model, cache, *, max_batch: int, device):
    """What an eager request path's kernels tune on, as a `BucketGraphs` that never captures:
    its buckets are every batch size 1..max_batch by rows and KV in powers of two (the attention
    tuner's key, `TUNE_FLOOR` and up) to the longest request, and its `synthetic` batches fill
    them (`RequestPath.tune_shapes`). `cache`: the path's KV cache or None."""
    from hstu_exp.graphs import BucketGraphs
    from hstu_exp.ops.triton_attention import TUNE_FLOOR

    longest = kv_tokens(model) + model.max_candidates
    classes = [TUNE_FLOOR]
    while classes[-1] < longest:
        classes.append(2 * classes[-1])
    return BucketGraphs(
        device=device,
        batch_buckets=range(1, max_batch + 1),
        token_buckets=classes,
        **_bucket_shape(model, cache),
    )


def _bucket_shape(model, cache) -> dict:
    """What a `BucketGraphs` takes from the model and the KV cache (None: no cache)."""
    return dict(
        pool=None if cache is None else cache.kv,
        page_size=0 if cache is None else cache.page_size,
        max_history=kv_tokens(model),
        scratch_page=0 if cache is None else cache.scratch_page,
        max_candidates=model.max_candidates,
        num_context=model.num_context,
    )


def shared_server(
    model,
    cache,
    graph,
    kernel,
    *,
    cached: bool,
    graphed: bool,
    device,
    dtype,
    seed: int,
    progress,
    pool_to_card: bool = False,
):
    """The request path of e2e and serve (`serving.path.RequestPath`): the ranking model, a KV-cache
    manager over the cache group's (emptied) cache when `cached`, and a graph runner of the
    whole step when `graphed` (its `used` buckets cleared). pool_to_card: see `shared_cache`."""
    from hstu_exp.kvcache.manager import KVCacheManager
    from hstu_exp.serving.path import RequestPath

    ranker = shared_ranker(model, kernel=kernel_args(kernel), device=device, dtype=dtype, seed=seed)
    manager = None
    if cached:
        manager = KVCacheManager(
            shared_cache(model, cache, device=device, dtype=dtype, to_card=pool_to_card), warn=progress
        )
    graphs = None
    if graphed:
        graphs = shared_graphs(
            ranker,
            manager.cache if manager else None,
            model,
            graph,
            device=device,
            dtype=dtype,
            progress=progress,
        )
        graphs.core.used.clear()
    return RequestPath(ranker, device=device, manager=manager, graphs=graphs)


def replica_servers(
    model,
    cache,
    graph,
    kernel,
    *,
    cached: bool,
    graphed: bool,
    devices,
    dtype,
    seed: int,
    progress,
    pool_to_card: bool = False,
) -> list:
    """One request path per serving replica (workload.replicas), each with its own weights,
    KV pool and graphs on its own device; built afresh, never reused (`reuse` keeps one object
    of a kind, and replicas sharing a pool would share their users' caches). The same seed:
    every replica ranks with the same weights. On a GPU each pool is sized to its own card."""

    from hstu_exp.serving.worker import on_device

    _BUILT.clear()  # free a reused model, pool and graphs before sizing the pools to the cards
    paths = []
    for device in devices:
        device = torch.device(device)
        with on_device(device):  # graphs capture (and streams start) on the current device
            paths.append(
                _replica_path(
                    model,
                    cache,
                    graph,
                    kernel,
                    cached=cached,
                    graphed=graphed,
                    device=device,
                    dtype=dtype,
                    seed=seed,
                    progress=progress,
                    pool_to_card=pool_to_card,
                )
            )
    return paths


def _replica_path(
    model, cache, graph, kernel, *, cached, graphed, device, dtype, seed, progress, pool_to_card
):
    from hstu_exp.kvcache.manager import KVCacheManager
    from hstu_exp.serving.path import RequestPath

    ranker = new_ranker(model, kernel=kernel_args(kernel), device=device, dtype=dtype, seed=seed)
    manager = None
    if cached:
        num_pages = None
        if pool_to_card and cache.mode == "paged" and not cache.num_pages and device.type == "cuda":
            num_pages = card_pages(model, cache, device=device, dtype=dtype)
        manager = KVCacheManager(
            build_cache(model, cache, device=device, dtype=dtype, num_pages=num_pages), warn=progress
        )
    graphs = None
    if graphed:
        graphs = new_graphs(
            ranker,
            manager.cache if manager else None,
            model,
            graph,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    return RequestPath(ranker, device=device, manager=manager, graphs=graphs)
