"""The HSTU block (docs/design.md §2):
LayerNorm -> SiLU(UVQK) -> pointwise attention -> U * LN(A) -> W_o.

Hot path takes plain arguments: the jagged batch, and the pool when keys come from the cache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hstu_exp.core.jagged import Batch
from hstu_exp.ops import kernels
from hstu_exp.ops.fp8 import fp8_weight, scaled_linear
from hstu_exp.ops.fused import append_kv_torch
from hstu_exp.ops.policy import KernelPolicy


def append_kv(pool_layer: torch.Tensor, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
    """Scatter the new history rows' K/V into their (page, slot): index ops, no host sync."""
    pt = batch.pages
    append_kv_torch(pool_layer, pt.new_rows, pt.new_page, pt.new_slot, k, v)


class HSTULayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        width = num_heads * head_dim
        self.norm = nn.LayerNorm(hidden, eps=1e-5)
        self.uvqk = nn.Linear(hidden, 4 * width)
        self.attn_norm = nn.LayerNorm(width, eps=1e-5)
        self.out = nn.Linear(width, hidden, bias=False)

    def forward(
        self,
        x,
        batch: Batch,
        kernel,
        *,
        alpha: float,
        inv_n: float,
        pool_layer: Optional[torch.Tensor] = None,
        x_is_scratch: bool = False,
    ):
        """x_is_scratch: x belongs to the block (not its caller), so the residual sum may be
        written into it where the kernels can (no copy of x)."""
        width = self.num_heads * self.head_dim
        fp8 = kernel.gemm_fp8  # e4m3 GEMMs: the LayerNorms hand over e4m3 rows and row scales
        h = kernel.layernorm(
            x, self.norm.weight, self.norm.bias, self.norm.eps, **({"fp8": True} if fp8 else {})
        )
        z = scaled_linear(*h, fp8_weight(self, "uvqk"), self.uvqk.bias, x.dtype) if fp8 else self.uvqk(h)
        if not kernel.silu_on_load:
            z = F.silu(z)
        u, v, q, k = (t.reshape(-1, self.num_heads, self.head_dim) for t in z.split(width, dim=-1))
        paged = batch.pages is not None
        out = {}
        if kernel.silu_on_load:  # SiLU of q, k, v in place, and the append of post-SiLU K/V
            if kernel.attention_splits(q, batch, paged, pool_layer):  # its sum buffer cleared on the way
                acc = torch.empty(q.shape, dtype=torch.float32, device=q.device)
                out = dict(out=acc, out_zeroed=True)
            kernel.silu_qkv(q, k, v, batch, pool_layer, out.get("out"))
        elif paged:
            pt = batch.pages
            kernel.append_kv(pool_layer, pt.new_rows, pt.new_page, pt.new_slot, k, v)
        if not paged:
            a = kernel.attention_full(q, k, v, batch, alpha=alpha, inv_n=inv_n, **out)
        else:
            a = kernel.attention_paged(
                q, k, v, batch, pool_layer[:, 0], pool_layer[:, 1], alpha=alpha, inv_n=inv_n, **out
            )
        in_place = dict(in_place=True) if x_is_scratch and kernel.residual_in_place else {}
        w_o = fp8_weight(self, "out") if fp8 else self.out.weight
        return kernel.layernorm_mul_linear_add(
            a.reshape(-1, width),
            u.reshape(-1, width),
            self.attn_norm.weight,
            self.attn_norm.bias,
            w_o,
            x,
            self.attn_norm.eps,
            **in_place,
        )


class HSTUBlock(nn.Module):
    def __init__(
        self,
        *,
        num_layers: int,
        hidden: int,
        num_heads: int,
        head_dim: int,
        scaling_length: int,
        kernel: str = "reference",
        policy: KernelPolicy = KernelPolicy(),
    ):
        super().__init__()
        self.layers = nn.ModuleList(HSTULayer(hidden, num_heads, head_dim) for _ in range(num_layers))
        self.alpha = 1.0 / math.sqrt(head_dim)
        # Fixed N, never the batch's longest sequence: outputs must not depend on batch-mates.
        self.inv_n = 1.0 / scaling_length
        # A name and a policy (plain values), not the ops: blocks must stay deep-copyable.
        self.kernel, self.policy = kernel, policy

    def forward(
        self, x: torch.Tensor, batch: Batch, pool: Optional[torch.Tensor] = None, on_layer=None
    ) -> torch.Tensor:
        """x: [rows, hidden]. pool: [L, P, 2, page_size, H, D] when batch.pages is set, a tensor
        or e4m3 `ops.fp8.Fp8Pages` (cache.dtype=fp8; the kernels quantise and dequantise).
        on_layer(l) runs before layer l (the host tier waits there for that layer's onload)."""
        kernel = kernels(self.kernel, self.policy)
        for i, layer in enumerate(self.layers):
            if on_layer is not None:
                on_layer(i)
            x = layer(
                x,
                batch,
                kernel,
                alpha=self.alpha,
                inv_n=self.inv_n,
                pool_layer=None if pool is None else pool[i],
                x_is_scratch=i > 0,
            )
        return x


def oracle(block: HSTUBlock) -> HSTUBlock:
    """A float32 copy of the block on the reference kernels with exact GEMMs: what verify
    compares a timed path against."""
    ref = copy.deepcopy(block).float()
    ref.kernel, ref.policy = "reference", replace(block.policy, gemm_dtype="bf16")
    return ref
