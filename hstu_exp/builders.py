"""Config -> modules. The only place that reads config groups; what it builds takes plain args."""
from __future__ import annotations

import torch

from hstu_exp.env import DTYPES
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import HSTUBlock


def scaling_length(model) -> int:
    return model.scaling_length or model.max_history + model.max_candidates


def build_block(model, *, kernel: str, device, dtype: torch.dtype) -> HSTUBlock:
    block = HSTUBlock(num_layers=model.num_layers, hidden=model.hidden, num_heads=model.num_heads,
                      head_dim=model.head_dim, scaling_length=scaling_length(model), kernel=kernel)
    return block.to(device=device, dtype=dtype).eval()


def pool_pages(model, cache) -> int:
    return cache.num_pages or model.max_batch * -(-model.max_history // cache.page_size)


def build_cache(model, cache, *, device, dtype: torch.dtype):
    if cache.mode == "none":
        return None
    kwargs = dict(num_layers=model.num_layers, num_pages=pool_pages(model, cache),
                  page_size=cache.page_size, num_heads=model.num_heads, head_dim=model.head_dim,
                  dtype=dtype, device=device)
    if cache.mode == "paged_offload":
        from hstu_exp.kvcache.offload import OffloadPagedKVCache

        host = cache.host_pages or 4 * kwargs["num_pages"]
        return OffloadPagedKVCache(host_pages=host, **kwargs)
    return PagedKVCache(**kwargs)


def model_dtype(model) -> torch.dtype:
    return DTYPES[model.dtype]
