"""The kernels a layer calls, chosen by name: `reference` (PyTorch, the oracle and CPU path)
or `triton`. Both offer the signatures of `reference.attention_full/attention_paged` and of
`fused.append_kv/layernorm_mul_linear_add/layernorm`.

Triton options: autotune, attention tiles and key splits timed once per shape bucket (off: the
hand-tuned table and split rule); silu_on_load, the layer hands over the raw UVQK projection and
SiLU is applied where U, Q, K, V are read (`silu_qkv`: Q, K, V in place and the K/V append in one
kernel; LayerNorm*U for U), instead of a separate SiLU pass over the projection plus an append.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Kernels:
    attention_full: Callable
    attention_paged: Callable
    append_kv: Callable
    layernorm_mul_linear_add: Callable  # with silu_on_load: u is raw
    layernorm: Callable
    # silu_on_load: the layer skips the SiLU pass and the append; silu_qkv(q, k, v, batch, pool)
    # does both in one kernel, and layernorm_mul_linear_add applies SiLU to u as it reads it.
    silu_on_load: bool = False
    silu_qkv: Optional[Callable] = None
    # attention_splits(q, batch, paged) -> whether the attention will sum key splits into a
    # zeroed float32 buffer: then silu_qkv clears it and the attention skips its memset.
    attention_splits: Optional[Callable] = None
    # layernorm_mul_linear_add(..., in_place=True) may add into the residual x it is given (the
    # block asks for it past its first layer, where x is its own intermediate).
    residual_in_place: bool = False


@functools.lru_cache(maxsize=None)
def kernels(name: str, autotune: bool = True, silu_on_load: bool = True) -> Kernels:
    from hstu_exp.ops import fused

    if name == "reference":  # the design's semantics as written: the oracle
        from hstu_exp.ops import reference

        return Kernels(reference.attention_full, reference.attention_paged, fused.append_kv_torch,
                       fused.layernorm_mul_linear_add_torch, fused.layernorm_torch)
    if name != "triton":
        raise ValueError(f"unknown kernel {name!r} (reference | triton)")
    from hstu_exp.ops import triton_attention as tri

    # The attention may hand the next op its float32 split-K sums: LayerNorm reads float32 anyway.
    return Kernels(functools.partial(tri.attention_full, partial_fp32=True, autotune=autotune),
                   functools.partial(tri.attention_paged, partial_fp32=True, autotune=autotune),
                   fused.append_kv,
                   functools.partial(fused.layernorm_mul_linear_add, silu_u=silu_on_load),
                   fused.layernorm, silu_on_load, fused.silu_qkv,
                   functools.partial(tri.will_split, autotune=autotune), True)
