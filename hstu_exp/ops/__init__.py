"""The kernels a layer calls, chosen by name: `reference` (PyTorch, the oracle and CPU path)
or `triton`. Both offer the signatures of `reference.attention_full/attention_paged` and of
`fused.append_kv/layernorm_mul_linear_add/layernorm`.

Triton options come in a `KernelPolicy` (ops/policy.py): autotune, attention tiles and key splits
timed once per shape bucket (off: the hand-tuned table and split rule); silu_on_load, the layer
hands over the raw UVQK projection and SiLU is applied where U, Q, K, V are read (`silu_qkv`: Q, K,
V in place and the K/V append in one kernel; LayerNorm*U for U), instead of a separate SiLU pass
over the projection plus an append; forced splits, TMA, the Hopper kernel, fast SiLU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

from hstu_exp.ops.policy import KernelPolicy


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
    # attention_splits(q, batch, paged, pool_layer=None) -> whether the attention will sum key
    # splits into a zeroed float32 buffer: then silu_qkv clears it and the attention skips its
    # memset.
    attention_splits: Optional[Callable] = None
    # layernorm_mul_linear_add(..., in_place=True) may add into the residual x it is given (the
    # block asks for it past its first layer, where x is its own intermediate).
    residual_in_place: bool = False
    # The Triton attention behind the ops (triton_attention.Attention: its tuned table and last
    # launch), None for the reference.
    attention: Optional[object] = None
    # policy.gemm_dtype=fp8: layernorm(..., fp8=True) returns e4m3 rows and row scales, and
    # layernorm_mul_linear_add takes an `fp8.Fp8Weight` (UVQK and W_o in e4m3, ops/fp8.py).
    gemm_fp8: bool = False


@functools.lru_cache(maxsize=None)
def kernels(name: str, policy: KernelPolicy = KernelPolicy()) -> Kernels:
    """The ops of kernel `name` under `policy`. One Kernels per (name, policy) for the process:
    the Triton attention's tuned table is kept there, so the points of a sweep that share a
    policy tune each shape bucket once (tuning takes seconds a bucket on a GPU), and points with
    another policy get their own table."""
    from hstu_exp.ops import fused

    fp8 = policy.gemm_dtype == "fp8"
    if name == "reference":  # the design's semantics as written: the oracle
        from hstu_exp.ops import reference

        return Kernels(
            reference.attention_full,
            reference.attention_paged,
            fused.append_kv_torch,
            fused.layernorm_mul_linear_add_torch,
            fused.layernorm_torch,
            gemm_fp8=fp8,
        )
    if name != "triton":
        raise ValueError(f"unknown kernel {name!r} (reference | triton)")
    from hstu_exp.ops.triton_attention import Attention

    attention = Attention(policy)
    # The attention may hand the next op its float32 split-K sums: LayerNorm reads float32 anyway.
    return Kernels(
        functools.partial(attention.full, partial_fp32=True),
        functools.partial(attention.paged, partial_fp32=True),
        fused.append_kv,
        functools.partial(fused.layernorm_mul_linear_add, silu_u=policy.silu_on_load),
        fused.layernorm,
        policy.silu_on_load,
        fused.silu_qkv,
        attention.will_split,
        True,
        attention,
        fp8,
    )
