"""The kernels a layer calls, chosen by name: `reference` (PyTorch, the oracle and CPU path)
or `triton`. Both offer the signatures of `reference.attention_full/attention_paged` and of
`fused.append_kv/layernorm_mul`."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

ATTENTION = {"reference": "hstu_exp.ops.reference", "triton": "hstu_exp.ops.triton_attention"}


@dataclass(frozen=True)
class Kernels:
    attention_full: Callable
    attention_paged: Callable
    append_kv: Callable
    layernorm_mul: Callable


@functools.lru_cache(maxsize=None)
def kernels(name: str) -> Kernels:
    attention = import_module(ATTENTION[name])
    fused = import_module("hstu_exp.ops.fused")
    if name == "reference":
        return Kernels(attention.attention_full, attention.attention_paged,
                       fused.append_kv_torch, fused.layernorm_mul_torch)
    return Kernels(attention.attention_full, attention.attention_paged, fused.append_kv,
                   fused.layernorm_mul)
