"""How the Triton kernels choose and launch: one value carried from the config (the `kernel`
group) through the builders into `ops.kernels`, instead of module globals a test or script
flips. Two points with equal policies share one tuned table; points with different policies
never see each other's choices, so a sweep over these knobs gives the same choices in any order.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

TUNE_TIMINGS = ("graph", "events")
GEMM_DTYPES = ("bf16", "fp8")


@dataclass(frozen=True)
class KernelPolicy:
    # Time the attention's (tiles, split) candidates once per shape bucket on CUDA and keep the
    # fastest; False: the hand-tuned table and the split rule.
    autotune: bool = True
    # Key splits of the attention: None = tuned or by the rule, 1 = never split (deterministic
    # sums: split partials are added by float32 atomics in no fixed order), n = about n splits.
    split_k: Optional[int] = None
    # Full mode's Q, K, V tiles through TMA descriptors (half precision on a GPU); False: each
    # thread's own async copies.
    tma: bool = True
    # On sm_90 in half precision: the warp-specialised Gluon kernel (hopper_attention) where it
    # can run; False: the portable kernel everywhere.
    hopper: bool = True
    # (user, head) pairs the Hopper kernel orders together (hopper_attention._schedule).
    hopper_group: int = 8
    # SiLU through tanh.approx (half precision on a GPU); False: the exact exp form.
    fast_silu: bool = True
    # How the tuner times a candidate: "graph" (launches captured back to back, the host's
    # launch cost left out) or "events" (one eager launch between two events).
    tune_timing: str = "graph"
    # The layer hands the raw UVQK projection to the kernels, which apply SiLU as they read it
    # (no separate SiLU pass and append; ops.Kernels.silu_on_load).
    silu_on_load: bool = True
    # The layer's UVQK and W_o GEMMs (both kernels): "bf16" (the model dtype) or "fp8" (e4m3 with
    # row-wise scales; ops/fp8.py).
    gemm_dtype: str = "bf16"
    # Wraps one-off work (tuning a bucket) so the harness can keep it off its clocks
    # (`hstu_exp.first_use.first_use`); the kernels themselves know nothing of benchmarks.
    one_off: Callable[[], ContextManager] = nullcontext

    def __post_init__(self):
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"split_k={self.split_k}: must be >= 1 (or None)")
        if self.hopper_group < 1:
            raise ValueError(f"hopper_group={self.hopper_group}: must be >= 1")
        if self.tune_timing not in TUNE_TIMINGS:
            raise ValueError(f"tune_timing={self.tune_timing!r}: one of {TUNE_TIMINGS}")
        if self.gemm_dtype not in GEMM_DTYPES:
            raise ValueError(f"gemm_dtype={self.gemm_dtype!r}: one of {GEMM_DTYPES}")
