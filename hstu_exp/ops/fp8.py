"""FP8 (e4m3) GEMMs for the HSTU layer's two projections, UVQK and W_o (kernel.gemm_dtype=fp8).

Row-wise scales on both sides: each activation row and each weight row (output channel) is scaled so
its largest magnitude maps to e4m3's 448, and the product is rescaled in the GEMM's epilogue
(`torch._scaled_mm` with an [M, 1] and a [1, N] float32 scale: cuBLASLt / CUTLASS on Hopper; on a
CPU the same product in float32 from the e4m3 values). Why `torch._scaled_mm` and not torchao's
float8: it is in the torch the GPU box has (2.11), needs no wheel, takes bias in the same call, is
CUDA-graph safe and keeps the quantisation of activations ours, so it can live in the LayerNorm
kernels that already read and write those rows (`fused.layernorm(..., fp8=True)`,
`fused.layernorm_mul(..., fp8=True)`); torchao's dynamic float8 linear would add its own
quantisation pass over them.

Row-wise rather than per-tensor: one outlier row (a candidate, a context token) would otherwise
cost every other row its precision, and the row amax is free where the row is in registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Scale floor: an all-zero row (a graph bucket's dead row) keeps a finite, nonzero scale.
MIN_SCALE = 1e-12


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (e4m3 [rows, k], float32 scale [rows, 1]); x ~ q * scale. The PyTorch
    version of what the fused kernels do (kernel=reference, and the tests' oracle)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(MIN_SCALE)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Weight:
    """A linear weight [n, k] quantised once per output channel: `q` [n, k] e4m3 and `scale`
    [1, n] float32, as `torch._scaled_mm` takes them (q.t() is the column-major B operand)."""

    def __init__(self, weight: torch.Tensor):
        q, scale = quantize_rows(weight.detach())
        self.q, self.scale = q, scale.reshape(1, -1).contiguous()
        self.source = (weight.data_ptr(), weight._version, weight.device)

    def stale(self, weight: torch.Tensor) -> bool:
        return self.source != (weight.data_ptr(), weight._version, weight.device)


def fp8_weight(module: torch.nn.Module, name: str) -> Fp8Weight:
    """`module.<name>`'s weight in e4m3, quantised on first use and again only if the weight
    changed (moved, or written in place)."""
    weight = getattr(module, name).weight
    cached = module.__dict__.get(f"_fp8_{name}")
    if cached is None or cached.stale(weight):
        cached = Fp8Weight(weight)
        module.__dict__[f"_fp8_{name}"] = cached  # not a parameter or buffer: never saved
    return cached


def scaled_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: Fp8Weight,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(xq * x_scale) (w.q * w.scale)^T + bias in out_dtype; float32 accumulation."""
    if xq.device.type == "cpu":
        # The same product from the e4m3 values in float32: torch 2.11's CPU `_scaled_mm` (the
        # GPU box's torch) takes per-tensor scales only.
        out = (xq.float() * x_scale) @ (w.q.float() * w.scale.t()).t()
        return (out if bias is None else out + bias.float()).to(out_dtype)
    return torch._scaled_mm(xq, w.q.t(), x_scale, w.scale, bias=bias, out_dtype=out_dtype)


# -- the FP8 KV cache (cache.dtype=fp8) ------------------------------------------------------------
# One float32 scale per token per head: appends write whole tokens, so a token's scale is final
# when it is written (a per-page scale would have to be fixed by the page's first token, or its
# earlier tokens requantised as later ones arrive), and a scale covers only D values, so one large
# key costs no other token precision. Its price is 4 bytes per D: at D = 128 a token-head takes
# 132 bytes against bf16's 256 (0.52x), at D = 256 260 against 512 (0.51x).


def quantize_tokens(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], float32 scale [...]) with x ~ q * scale[..., None]: each
    token-head's largest magnitude maps to e4m3's 448."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / E4M3_MAX).clamp_min(MIN_SCALE)
    return (xf / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize_tokens(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 values e4m3 `q` [..., D] with scales [...] stand for."""
    return q.float() * scale[..., None]


@dataclass(frozen=True)
class Fp8Pages:
    """K/V pages in e4m3 with their float32 scales, indexed together: `data` [..., D] e4m3 and
    `scales` the same shape without D. The whole pool ([layers, pages, 2, page_size, H, D]), one
    layer of it, or its K or V pages (`pool[l][:, 0]`) are all Fp8Pages; the kernels take one
    wherever they take a page tensor and then read e4m3 keys and values."""

    data: torch.Tensor
    scales: torch.Tensor

    def __getitem__(self, index) -> "Fp8Pages":
        return Fp8Pages(self.data[index], self.scales[index])

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device
