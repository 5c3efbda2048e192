"""The kernels a layer calls, chosen by name: `reference` (PyTorch, the oracle and CPU path)
or `triton`. Both offer the signatures of `reference.attention_full/attention_paged` and of
`fused.append_kv/layernorm_mul_linear_add`.

Triton option autotune: attention tiles and key splits timed once per shape bucket (off: the
hand-tuned table and split rule).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kernels:
    attention_full: Callable
    attention_paged: Callable
    append_kv: Callable
    layernorm_mul_linear_add: Callable


@functools.lru_cache(maxsize=None)
def kernels(name: str, autotune: bool = True) -> Kernels:
    from hstu_exp.ops import fused

    if name == "reference":
        from hstu_exp.ops import reference

        return Kernels(reference.attention_full, reference.attention_paged, fused.append_kv_torch,
                       fused.layernorm_mul_linear_add_torch)
    if name != "triton":
        raise ValueError(f"unknown kernel {name!r} (reference | triton)")
    from hstu_exp.ops import triton_attention as tri

    # The attention may hand the next op its float32 split-K sums: LayerNorm reads float32 anyway.
    return Kernels(functools.partial(tri.attention_full, partial_fp32=True, autotune=autotune),
                   functools.partial(tri.attention_paged, partial_fp32=True, autotune=autotune),
                   fused.append_kv, fused.layernorm_mul_linear_add)
