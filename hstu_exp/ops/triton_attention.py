"""Triton HSTU attention, forward only (docs/design.md §2, §5). Same signatures as `reference`.

One kernel serves both modes. A program owns (query block of BLOCK_M rows, user, head, key split):
  full mode  - queries = keys = the user's rows; history keys are the non-candidate rows;
  paged mode - queries = the new rows; history keys are read from the pages (cached prefix + the
               new history, already appended) through page_indptr / page_ids, BLOCK_N keys at a time
               (a key block spans BLOCK_N / page_size pages, or sits inside one page).
Scores are SiLU(alpha q.k) / N with no softmax, so there is no running max or normaliser: the key
loop is a plain sum, and sums over disjoint key ranges simply add. That gives three cheap tricks:
  * causal skipping: key blocks past the query block's last position are never visited, and only
    the blocks straddling the diagonal (or the kv end) pay for a mask;
  * candidates: their query rows visit the history keys like everyone else; the candidate self
    term is a rowwise dot added to the accumulator, so candidate x candidate tiles never exist;
  * split-K: when (query blocks x users x heads) cannot fill the GPU, or a few long programs would
    run alone in a last wave, the key range is cut into chunks handled by separate programs that
    add fp32 partials with atomics into a zeroed buffer, cast to the output dtype after unless the
    caller takes the fp32 sums (batch 1 paged: 12 query-block programs against 4352 keys would
    leave 120 of 132 SMs idle).
SiLU goes through tanh.approx: one special-function op a score instead of exp + reciprocal.
No host syncs: grid sizes come from host ints (max_len, max_kv_len, B, H, shapes), everything else
is read on the device, so the ops can be captured in CUDA graphs. Tile sizes and splits come from
a hand-tuned table (`CONFIGS`) and a cost rule, or with autotune from timing the candidates once
per shape bucket, outside any capture (a capture reuses the choice, or falls back to the rule).

What to launch is decided by a `KernelPolicy` (ops/policy.py) and remembered by an `Attention`
object: its tuned table and its last launch. Nothing here is module state, so two policies in
one process never see each other's choices.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from hstu_exp.core.jagged import Batch
from hstu_exp.ops.fp8 import Fp8Pages
from hstu_exp.ops.policy import KernelPolicy

try:  # Gluon (Triton >= 3.5): the warp-specialised Hopper kernel for full mode
    from hstu_exp.ops import hopper_attention
except ImportError:  # pragma: no cover - an older Triton: the portable kernel serves every case
    hopper_attention = None


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    kernel: str = "triton"  # "hopper": hopper_attention (full mode, sm_90, no splits)


# (paged, head dim bucket, long queries) -> Config; "long" = max_len > 512 rows per user (a key so
# short-query shapes can be retuned; today both buckets agree). The winners of
# scripts/gpu_attention_check.py --sweep on the GPU box (BENCHMARKS: "attention tile table"):
#   D=256: 128x64 tiles, 8 warps, 2 stages. Nothing larger fits: acc [128, 256] fp32 is 128
#          registers a thread at 8 warps, and q + 2 stages of K/V take 192 of the 227 KB of
#          shared memory.
#   D=128: 128x64, 8 warps, 3 stages.
#   D=64:  not measured; the D=128 shape with 4 warps.
CONFIGS = {
    (paged, dim, long): cfg
    for paged in (False, True)
    for long in (False, True)
    for dim, cfg in (
        (64, Config(128, 64, 4, 3)),
        (128, Config(128, 64, 8, 3)),
        (256, Config(128, 64, 8, 2)),
    )
}
INTERPRETER_CONFIG = Config(16, 16, 4, 1)  # CPU interpreter: small tiles keep numpy cheap

# Split-K rule (host ints only), the fallback when nothing is tuned for a shape (and during a
# capture). Program j (a query block) visits about work_j key blocks: causal, so later blocks see
# more, and the candidates' block sees them all. The kernel time is modelled as
#   max(the longest program, waves x the mean program)
# with PROGRAM_OVERHEAD_BLOCKS per program (launch, q tile, candidate self term) and
# SPLIT_OVERHEAD_BLOCKS more per program when split (fp32 atomics epilogue), all in key-block units
# (fitted on an H200, D=256; BENCHMARKS: "split-K rule"). A chunk of c key blocks caps the
# longest program at c: batch 1 paged (12 programs x 64 key blocks) gets 11 splits; batch 1 full
# gets its long candidate and late-history blocks cut, where unsplit they ran alone in a last
# wave.
PROGRAM_OVERHEAD_BLOCKS = 2
SPLIT_OVERHEAD_BLOCKS = 7
MIN_SPLIT_BLOCKS = 2
# The Hopper kernel's tiles: 64-key boxes, 2 K and 2 V slots (3 K slots spill; BENCHMARKS).
HOPPER_CONFIG = Config(128, 64, 4, 2, "hopper")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_config(head_dim: int, max_len: int, paged: bool, device: torch.device) -> Config:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return CONFIGS[(paged, bucket, max_len > 512)]


def resident_slots(cfg: Config, head_dim: int, num_sms: int) -> int:
    """Programs the GPU runs at once: shared memory (q tile + staged K/V tiles, 2-byte inputs) and
    registers (these kernels run near 255 a thread) bound the programs per SM."""
    smem = 2 * head_dim * (cfg.block_m + 2 * cfg.block_n * max(cfg.num_stages - 1, 2))
    by_smem = (227 * 1024) // smem
    by_regs = 65536 // (32 * cfg.num_warps * 255)
    return num_sms * max(1, min(by_smem, by_regs))


def modelled_time(chunk: int, work, users_heads: int, slots: int) -> float:
    """The rule's cost (key-block units) of running programs with `work` key blocks each, for
    users_heads (batch x heads) copies, cut into chunks of `chunk` blocks (0: no split)."""
    split = 0 < chunk < max(work, default=0)
    per_piece = PROGRAM_OVERHEAD_BLOCKS + (SPLIT_OVERHEAD_BLOCKS if split else 0)
    pieces = users_heads * sum(triton.cdiv(w, chunk) if split else 1 for w in work)
    total = users_heads * sum(work) + pieces * per_piece
    longest = (min(chunk, max(work)) if split else max(work)) + per_piece
    return max(longest, triton.cdiv(pieces, slots) * total / pieces)


def program_work(m_blocks: int, kv_blocks: int, rows_per_key_block: float) -> list:
    """Key blocks each query block visits, for users of the longest shape: queries sit at the end
    of the keys (full mode: queries = keys; paged: the new rows after the cached prefix)."""
    first = max(0.0, kv_blocks - m_blocks * rows_per_key_block)
    return [min(kv_blocks, math.ceil(first + (j + 1) * rows_per_key_block)) for j in range(m_blocks)]


def split_chunk(
    m_blocks: int,
    users_heads: int,
    kv_blocks: int,
    rows_per_key_block: float,
    slots: int,
    split_k: Optional[int],
) -> int:
    """Key blocks per split; 0 means no split. split_k: None = by the rule, 1 = never, n = about
    n splits of the longest key range."""
    if split_k is None:
        if kv_blocks < 2 * MIN_SPLIT_BLOCKS:
            return 0
        work = program_work(m_blocks, kv_blocks, rows_per_key_block)
        options = {triton.cdiv(kv_blocks, s) for s in range(2, kv_blocks // MIN_SPLIT_BLOCKS + 1)}
        best = min(
            [0, *sorted(options, reverse=True)], key=lambda c: modelled_time(c, work, users_heads, slots)
        )
        return best
    if split_k <= 1 or kv_blocks <= 1:
        return 0
    return triton.cdiv(kv_blocks, min(split_k, kv_blocks))


@triton.jit
def _silu(s, alpha, FAST: tl.constexpr):
    """SiLU(alpha * s). FAST: x * sigmoid(x) = t + t * tanh(t) with t = x / 2, and tanh.approx is a
    single MUFU op where exp + reciprocal take two; the special-function unit sits on the critical
    path beside the tensor cores (the exact form is slower: BENCHMARKS, "fast SiLU").
    Its error (~2^-11 relative) stays below the bf16 rounding of the output. (tanh.approx.f16x2,
    two scores an op, was no faster.)"""
    if FAST:
        t = s * (0.5 * alpha)
        th = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1
        )
        return t + t * th
    else:
        x = s * alpha
        return x * tl.sigmoid(x)


@triton.jit
def _load_kv(
    K,
    V,
    KD,
    VD,
    KP,
    VP,
    page_ids,
    row0,
    page_base,
    n0,
    offs,
    kv_len,
    h,
    offs_d,
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    stride_kpp,
    stride_kps,
    stride_kph,
    stride_vpp,
    stride_vps,
    stride_vph,
    KS,
    VS,
    stride_ksp,
    stride_kss,
    stride_ksh,
    stride_vsp,
    stride_vss,
    stride_vsh,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    """K and V tiles [BLOCK_N, D] of history keys `offs` = n0 + [0, BLOCK_N) (positions in the
    user's key sequence), and their float32 scales [BLOCK_N] (FP8_KV: e4m3 pages, one scale a
    token-head; else ones, never used). The caller scales the tiles' rows, in the layout they
    were loaded in: scaling the columns of S = Q K^T and of P instead (the same arithmetic)
    moves each scale vector into the MMA layout and spilled about twice the registers
    (outputs/BENCHMARKS.md, "FP8 KV cache"). Masked tiles load zeros past kv_len: a garbage V
    times a zero score could still give NaN."""
    ok = offs < kv_len
    k_scale = tl.full(offs.shape, 1.0, tl.float32)
    v_scale = k_scale
    if USE_TMA:  # whole box from the descriptors; rows past the user belong to the next one
        k = KD.load([row0 + n0, h * offs_d.shape[0]])
        v = VD.load([row0 + n0, h * offs_d.shape[0]])
        if MASKED:  # (garbage keys only make scores the mask drops)
            v = tl.where(ok[:, None], v, 0.0)
        return k, v, k_scale, v_scale
    if PAGED:
        if MASKED:
            page = tl.load(page_ids + page_base + offs // PAGE_SIZE, mask=ok, other=0)
        else:
            page = tl.load(page_ids + page_base + offs // PAGE_SIZE)
        page = page.to(tl.int64)
        slot = offs % PAGE_SIZE
        k_ptr = KP + page[:, None] * stride_kpp + slot[:, None] * stride_kps + h * stride_kph
        v_ptr = VP + page[:, None] * stride_vpp + slot[:, None] * stride_vps + h * stride_vph
        if FP8_KV:  # zero scales past kv_len: those scores and values are zero either way
            ks_ptr = KS + page * stride_ksp + slot * stride_kss + h * stride_ksh
            vs_ptr = VS + page * stride_vsp + slot * stride_vss + h * stride_vsh
            if MASKED:
                k_scale = tl.load(ks_ptr, mask=ok, other=0.0)
                v_scale = tl.load(vs_ptr, mask=ok, other=0.0)
            else:
                k_scale = tl.load(ks_ptr)
                v_scale = tl.load(vs_ptr)
    else:
        row = (row0 + offs).to(tl.int64)
        k_ptr = K + row[:, None] * stride_kr + h * stride_kh
        v_ptr = V + row[:, None] * stride_vr + h * stride_vh
    if MASKED:
        k = tl.load(k_ptr + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + offs_d[None, :], mask=ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + offs_d[None, :])
        v = tl.load(v_ptr + offs_d[None, :])
    return k, v, k_scale, v_scale


# The batch's user and row counts change every batch: specializing on them (Triton compiles a
# variant per value class, e.g. divisible by 16 or not) would make a served stream meet new
# compiles after the warm-up, whose enumerated shapes cannot hit every class.
@triton.jit(do_not_specialize=["num_users", "num_rows"])
def _hstu_fwd(
    Q,
    K,
    V,
    QD,
    KD,
    VD,
    Out,
    KP,
    VP,
    offsets,
    num_cand,
    page_indptr,
    page_ids,
    cached_len,
    stride_qr,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    stride_or,
    stride_oh,
    stride_kpp,
    stride_kps,
    stride_kph,
    stride_vpp,
    stride_vps,
    stride_vph,
    KS,
    VS,
    stride_ksp,
    stride_kss,
    stride_ksh,
    stride_vsp,
    stride_vss,
    stride_vsh,
    num_users,
    num_heads,
    num_rows,
    chunk,
    alpha,
    inv_n,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    # Reversed query blocks: the last blocks see the most keys (causal) and hold the candidates,
    # so they start first and the short ones fill in behind them.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    if b == num_users:
        # Without split-K one extra "user" zeroes the dead rows past the last user (graph padding),
        # as the reference does; with split-K the zero-filled fp32 buffer already holds zeros.
        start = tl.load(offsets + num_users)
        zero = tl.zeros([BLOCK_M, HEAD_DIM], dtype=Out.dtype.element_ty)
        for r0 in range(start + pid_m * BLOCK_M, num_rows, tl.num_programs(0) * BLOCK_M):
            rows = (r0 + offs_m).to(tl.int64)
            tl.store(
                Out + rows[:, None] * stride_or + h * stride_oh + offs_d[None, :],
                zero,
                mask=rows[:, None] < num_rows,
            )
        return

    row0 = tl.load(offsets + b)
    seq_len = tl.load(offsets + b + 1) - row0
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:
        return
    n_hist = seq_len - tl.load(num_cand + b)  # query rows that are history (the rest: candidates)
    if PAGED:
        first = tl.load(cached_len + b)  # absolute key position of query row 0
        page_base = tl.load(page_indptr + b)
    else:
        first = 0
        page_base = 0
    kv_len = first + n_hist
    # Keys this block needs: up to its last history row's position, or all of them if it holds a
    # candidate. Keys below `full_end` are visible to every row of the block: no mask there.
    hi = tl.minimum(kv_len, first + m0 + BLOCK_M)
    full_end = (tl.minimum(first + m0, kv_len) // BLOCK_N) * BLOCK_N
    lo = 0
    if SPLIT:
        lo = split * chunk * BLOCK_N
        hi = tl.minimum(hi, lo + chunk * BLOCK_N)
    self_term = (m0 + BLOCK_M > n_hist) & (split == 0)
    if (lo >= hi) & (self_term == 0):
        return

    i = m0 + offs_m  # query row within the user
    row_ok = i < seq_len
    q_rows = (row0 + i).to(tl.int64)
    if USE_TMA:  # rows past the user are other users' queries: computed, never stored
        q = QD.load([row0 + m0, h * HEAD_DIM])
    else:
        q = tl.load(
            Q + q_rows[:, None] * stride_qr + h * stride_qh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if self_term:  # candidate rows see their own key: a rowwise dot, never a candidate tile
        ks = tl.load(
            K + q_rows[:, None] * stride_kr + h * stride_kh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        vs = tl.load(
            V + q_rows[:, None] * stride_vr + h * stride_vh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        p = _silu(tl.sum(q.to(tl.float32) * ks, axis=1), alpha, False)
        acc = tl.where((row_ok & (i >= n_hist))[:, None], p[:, None] * vs, 0.0)

    for n0 in range(lo, tl.minimum(hi, full_end), BLOCK_N):
        k, v, k_scale, v_scale = _load_kv(
            K,
            V,
            KD,
            VD,
            KP,
            VP,
            page_ids,
            row0,
            page_base,
            n0,
            n0 + offs_n,
            kv_len,
            h,
            offs_d,
            stride_kr,
            stride_kh,
            stride_vr,
            stride_vh,
            stride_kpp,
            stride_kps,
            stride_kph,
            stride_vpp,
            stride_vps,
            stride_vph,
            KS,
            VS,
            stride_ksp,
            stride_kss,
            stride_ksh,
            stride_vsp,
            stride_vss,
            stride_vsh,
            PAGED,
            PAGE_SIZE,
            False,
            USE_TMA,
            FP8_KV,
        )
        if FP8_KV:  # e4m3 tiles: each key row times its scale in float32, rounded once
            k = (k.to(tl.float32) * k_scale[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        p = _silu(s, alpha, FAST)
        acc += tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    # Blocks on the diagonal / at the kv end: history row i sees key positions <= first + i.
    for n0 in range(tl.maximum(lo, full_end), hi, BLOCK_N):
        offs = n0 + offs_n
        k, v, k_scale, v_scale = _load_kv(
            K,
            V,
            KD,
            VD,
            KP,
            VP,
            page_ids,
            row0,
            page_base,
            n0,
            offs,
            kv_len,
            h,
            offs_d,
            stride_kr,
            stride_kh,
            stride_vr,
            stride_vh,
            stride_kpp,
            stride_kps,
            stride_kph,
            stride_vpp,
            stride_vps,
            stride_vph,
            KS,
            VS,
            stride_ksp,
            stride_kss,
            stride_ksh,
            stride_vsp,
            stride_vss,
            stride_vsh,
            PAGED,
            PAGE_SIZE,
            True,
            USE_TMA,
            FP8_KV,
        )
        if FP8_KV:
            k = (k.to(tl.float32) * k_scale[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        p = _silu(s, alpha, FAST)
        visible = (offs[None, :] < kv_len) & (
            (i[:, None] >= n_hist) | (offs[None, :] <= first + i[:, None])
        )
        p = tl.where(visible, p, 0.0)
        acc += tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)

    out_ptr = Out + q_rows[:, None] * stride_or + h * stride_oh + offs_d[None, :]
    if SPLIT:
        tl.atomic_add(out_ptr, acc * inv_n, mask=row_ok[:, None], sem="relaxed")
    else:
        tl.store(out_ptr, (acc * inv_n).to(Out.dtype.element_ty), mask=row_ok[:, None])


def _tma_ok(t: torch.Tensor) -> bool:
    """A [rows, H, D] view a TMA descriptor can cover as [rows, H*D]: heads packed, 16-byte
    aligned base and row stride."""
    size = t.element_size()
    return t.stride(1) == t.shape[2] and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def _check(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the head dim must be contiguous (stride {t.stride()})")
    return t


@functools.lru_cache(maxsize=4096)
def _plan(cfg, D, B, H, max_len, max_kv, split_k, device_index, paged=True):
    """Grid decisions from host ints, cached: the hot path only does a dict lookup. The Hopper
    kernel splits keys in paged mode only (at one user in full mode its 34 query blocks x 4 heads
    already fill the H200)."""
    sms = _num_sms(device_index) if device_index >= 0 else 132
    m_blocks = triton.cdiv(max_len, cfg.block_m)
    kv_blocks = triton.cdiv(max(max_kv, 1), cfg.block_n)
    if cfg.kernel == "hopper" and not paged:
        return m_blocks, kv_blocks, 0
    chunk = split_chunk(
        m_blocks, B * H, kv_blocks, cfg.block_m / cfg.block_n, resident_slots(cfg, D, sms), split_k
    )
    return m_blocks, kv_blocks, chunk


# Autotuning: per shape bucket (mode, B, H, D, dtype, rows and keys per user rounded up to a power of
# two) the first call outside a graph capture times every (tile config, split) candidate on the
# call's own inputs and keeps the fastest; later calls, captures included, reuse it. Candidates:
# the rule's split, no split, twice and half as many splits, for each tile config of TUNE_CONFIGS.
TUNE_CONFIGS = {
    64: [Config(128, 64, 4, 3), Config(64, 64, 4, 3)],
    128: [Config(128, 64, 8, 3), Config(64, 64, 4, 3)],
    256: [Config(128, 64, 8, 2), Config(64, 64, 4, 2), Config(64, 32, 4, 3)],
}


# The tuner's key rounds rows and keys up to a power of two, and at least this: shapes inside
# one tile of the tuned configs tune alike, and a server's warm-up enumerates fewer keys.
TUNE_FLOOR = 64


def _bucket(paged, B, H, D, dtype, max_len, max_kv, fp8_pages=False):
    return (
        paged,
        fp8_pages,
        B,
        H,
        D,
        str(dtype),
        triton.next_power_of_2(max(max_len, TUNE_FLOOR)),
        triton.next_power_of_2(max(max_kv, TUNE_FLOOR)),
    )


GRAPH_LAUNCHES = 10


def _median_ms(fn, timing: str, reps: int = 5) -> float:
    """Device time of one fn() (a launch, with its memset when split). timing "graph" times
    GRAPH_LAUNCHES launches captured in one CUDA graph, so the host's launch cost (tens of us a
    Triton launch) stays out: timed eagerly one at a time ("events"), a 10 us candidate measured
    the host, and a slow unsplit launch could win (the B=1 cached T=1024 vs 4096 inversion)."""
    fn()  # compiles on first use
    if timing == "graph":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_LAUNCHES):
                fn()
        graph.replay()
        run, per_run = graph.replay, GRAPH_LAUNCHES
    else:
        run, per_run = fn, 1
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per_run)
    return statistics.median(times)


def _tune(run, D, B, H, max_len, max_kv, device_index, paged=True, hopper=False, timing="graph"):
    """(config, split_k) of the fastest candidate; run(config, split_k) launches one. hopper:
    the Hopper kernel is a candidate too (unsplit in full mode)."""
    bucket = 64 if D <= 64 else 128 if D <= 128 else 256
    options = [(HOPPER_CONFIG, 1)] if hopper and not paged else []
    for cfg in TUNE_CONFIGS[bucket] + ([HOPPER_CONFIG] if hopper and paged else []):
        _, kv_blocks, chunk = _plan(cfg, D, B, H, max_len, max_kv, None, device_index, paged)
        rule = triton.cdiv(kv_blocks, chunk) if chunk else 1
        for split in dict.fromkeys([rule, 1, 2 * rule, max(1, rule // 2)]):
            options.append((cfg, split))
    timed = []
    for cfg, split in options:
        try:
            timed.append((_median_ms(lambda c=cfg, s=split: run(c, s), timing), cfg, split))
        except triton.runtime.errors.OutOfResources:  # a tile that does not fit this GPU
            continue
    _, cfg, split = min(timed, key=lambda t: t[0])
    return cfg, split


def _hopper_ok(paged: bool, *tensors, pages=None) -> bool:
    """Whether the Hopper kernel can run these [rows, H, D] tensors and, in paged mode, these
    (k_pages, v_pages) (unknown pages: judged by the tensors alone). It reads half-precision
    pages only: e4m3 pages (`Fp8Pages`) go to this file's kernel, and the launch says so
    (last_launch["config"].kernel)."""
    if pages is not None and isinstance(pages[0], Fp8Pages):
        return False
    return (
        hopper_attention is not None
        and all(hopper_attention.supported(t) for t in tensors)
        and (not paged or pages is None or hopper_attention.pool_rows(*pages) is not None)
    )


def _device_index(q) -> int:
    return (q.device.index or 0) if q.is_cuda else -1


@dataclass
class Attention:
    """The attention ops under one policy, with what they remember: the tuned (tiles, split)
    per shape bucket and what the last launch ran (tiles, splits, grid and the compiled kernel,
    for benchmarks: registers, spills). `ops.kernels` keeps one per policy."""

    policy: KernelPolicy = field(default_factory=KernelPolicy)
    tuned: dict = field(default_factory=dict)  # shape bucket -> (Config, split_k)
    last_launch: dict = field(default_factory=dict)

    def full(
        self,
        q,
        k,
        v,
        batch: Batch,
        *,
        alpha: float,
        inv_n: float,
        split_k: Optional[int] = None,
        config: Optional[Config] = None,
        out: Optional[torch.Tensor] = None,
        partial_fp32: bool = False,
        out_zeroed: bool = False,
    ) -> torch.Tensor:
        """q, k, v [rows, H, D] jagged by batch.offsets -> [rows, H, D] in q's dtype.
        split_k: None = the policy's (tuned or by rule, unless it forces one), 1 = never,
        n = about n key splits. config: tiles to use (skips tuning). out: optional destination.
        partial_fp32: when split, return the float32 sum buffer as it is (the next op reads
        float32 anyway: saves a cast pass). out_zeroed: out (float32, contiguous) already holds
        zeros, so a split launch needs no memset (a neighbouring kernel cleared it)."""
        return self._launch(
            q,
            k,
            v,
            batch,
            None,
            None,
            alpha=alpha,
            inv_n=inv_n,
            split_k=split_k,
            config=config,
            out=out,
            partial_fp32=partial_fp32,
            out_zeroed=out_zeroed,
        )

    def paged(
        self,
        q,
        k,
        v,
        batch: Batch,
        k_pages,
        v_pages,
        *,
        alpha: float,
        inv_n: float,
        split_k: Optional[int] = None,
        config: Optional[Config] = None,
        out: Optional[torch.Tensor] = None,
        partial_fp32: bool = False,
        out_zeroed: bool = False,
    ) -> torch.Tensor:
        """q, k, v: the new rows ([new history | candidates] per user); history keys come from
        k_pages / v_pages ([P, page_size, H, D] views, any strides) through batch.pages.
        Options as in `full`."""
        return self._launch(
            q,
            k,
            v,
            batch,
            k_pages,
            v_pages,
            alpha=alpha,
            inv_n=inv_n,
            split_k=split_k,
            config=config,
            out=out,
            partial_fp32=partial_fp32,
            out_zeroed=out_zeroed,
        )

    def will_split(self, q, batch: Batch, paged: bool, pool=None) -> bool:
        """Whether the launch for these shapes sums key splits into a zeroed float32 buffer (as
        far as is known before it runs: a first autotuned call may still decide otherwise).
        pool: the pool (layer) it will read, when known: e4m3 pages never take the Hopper
        kernel; other pages are judged by the tensors."""
        if q.shape[0] == 0 or batch.max_len == 0 or batch.batch_size == 0:
            return False
        fp8 = pool if isinstance(pool, Fp8Pages) else None
        cfg, split_k = self._choice(q, batch, paged, None, None, k_pages=fp8)
        max_kv = batch.pages.max_kv_len if paged else batch.max_len
        return bool(
            _plan(
                cfg,
                q.shape[2],
                batch.batch_size,
                q.shape[1],
                batch.max_len,
                max_kv,
                split_k,
                _device_index(q),
                paged,
            )[2]
        )

    def _tunes(self, q, config, split_k) -> bool:
        """Whether this call takes its tiles and split from the tuner."""
        p = self.policy
        return p.autotune and config is None and split_k is None and p.split_k is None and q.is_cuda

    def _choice(
        self, q, batch: Batch, paged: bool, config, split_k, k=None, v=None, k_pages=None, v_pages=None
    ):
        """(tile config, split_k) of a launch without tuning: explicit, tuned for the bucket,
        or the table and rule (split_k None). A Hopper config falls back to the table where
        that kernel cannot run; the table's choice is HOPPER_CONFIG where it can."""
        if self._tunes(q, config, split_k):
            max_kv = batch.pages.max_kv_len if paged else batch.max_len
            rows, H, D = q.shape
            fp8 = isinstance(k_pages, Fp8Pages)
            config, split_k = self.tuned.get(
                _bucket(paged, batch.batch_size, H, D, q.dtype, batch.max_len, max_kv, fp8),
                (None, None),
            )
        tensors = [t for t in (q, k, v) if t is not None]
        pages = (k_pages, v_pages) if k_pages is not None else None
        ok = _hopper_ok(paged, *tensors, pages=pages)
        if config is not None and config.kernel == "hopper" and not ok:
            config = None
        if split_k is None:
            split_k = self.policy.split_k
        if config is None and self.policy.hopper and ok and (paged or (split_k or 1) <= 1):
            config = HOPPER_CONFIG  # (its full mode never splits: a forced split keeps this kernel)
        return config or choose_config(q.shape[2], batch.max_len, paged, q.device), split_k

    def _launch(
        self,
        q,
        k,
        v,
        batch: Batch,
        k_pages,
        v_pages,
        *,
        alpha,
        inv_n,
        split_k,
        config,
        out,
        partial_fp32=False,
        out_zeroed=False,
    ):
        rows, H, D = q.shape
        if D < 16 or D > 256 or D & (D - 1):
            raise ValueError(f"head dim must be a power of two in [16, 256], got {D}")
        if q.device.type != "cuda" and not _interpreting():
            raise RuntimeError("Triton attention needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        q, k, v = _check(q, "q"), _check(k, "k"), _check(v, "v")
        if out is not None:
            _check(out, "out")
        paged = k_pages is not None
        B = batch.batch_size
        if out is None:
            out = torch.empty(rows, H, D, dtype=q.dtype, device=q.device)
        if rows == 0:
            return out
        if batch.max_len == 0 or B == 0:
            return out.zero_()
        max_kv = batch.pages.max_kv_len if paged else batch.max_len
        device_index = _device_index(q)
        policy = self.policy
        if self._tunes(q, config, split_k):
            key = _bucket(paged, B, H, D, q.dtype, batch.max_len, max_kv, isinstance(k_pages, Fp8Pages))
            if key not in self.tuned and not torch.cuda.is_current_stream_capturing():
                with policy.one_off():
                    self.tuned[key] = _tune(
                        lambda c, s: self._launch(
                            q,
                            k,
                            v,
                            batch,
                            k_pages,
                            v_pages,
                            alpha=alpha,
                            inv_n=inv_n,
                            split_k=s,
                            config=c,
                            out=out,
                        ),
                        D,
                        B,
                        H,
                        batch.max_len,
                        max_kv,
                        device_index,
                        paged,
                        policy.hopper and _hopper_ok(paged, q, k, v, pages=(k_pages, v_pages)),
                        policy.tune_timing,
                    )
                out_zeroed = False  # the candidates summed into it
        cfg, split_k = self._choice(q, batch, paged, config, split_k, k, v, k_pages, v_pages)
        m_blocks, kv_blocks, chunk = _plan(
            cfg, D, B, H, batch.max_len, max_kv, split_k, device_index, paged
        )
        splits = triton.cdiv(kv_blocks, chunk) if chunk else 1
        dst = out
        if chunk:  # fp32 partial sums over key chunks; dead rows stay zero
            dst = (
                out
                if (out.dtype == torch.float32 and out.is_contiguous())
                else torch.zeros(rows, H, D, dtype=torch.float32, device=q.device)
            )
            if dst is out and not out_zeroed:
                dst.zero_()
        last = self.last_launch
        if cfg.kernel == "hopper":
            last["kernel"] = hopper_attention.launch(
                q,
                k,
                v,
                dst,
                batch,
                alpha=alpha,
                inv_n=inv_n,
                pages=(k_pages, v_pages) if paged else None,
                chunk=chunk,
                splits=splits,
                block_n=cfg.block_n,
                k_stages=cfg.num_stages,
                group=policy.hopper_group,
            )
            last.update(grid=None, config=cfg, splits=splits, tma=True)
        else:
            _launch_portable(
                q,
                k,
                v,
                dst,
                batch,
                k_pages,
                v_pages,
                cfg,
                m_blocks,
                chunk,
                splits,
                alpha,
                inv_n,
                policy,
                last,
            )
        if dst is not out and not partial_fp32:
            out.copy_(dst)
        return dst if partial_fp32 else out


def _launch_portable(
    q,
    k,
    v,
    dst,
    batch: Batch,
    k_pages,
    v_pages,
    cfg: Config,
    m_blocks: int,
    chunk: int,
    splits: int,
    alpha: float,
    inv_n: float,
    policy: KernelPolicy,
    last: dict,
):
    """This file's kernel into dst (float32 and zeroed when split); what ran goes into
    `last`."""
    rows, H, D = q.shape
    B = batch.batch_size
    paged = k_pages is not None
    fp8 = isinstance(k_pages, Fp8Pages)
    # e4m3 pages: their [P, page_size, H] scales beside them; else any valid pointers do
    ks, vs, sstrides = (k_pages.scales, v_pages.scales, ()) if fp8 else (q, q, (0,) * 6)
    if fp8:
        sstrides = (*ks.stride(), *vs.stride())
        k_pages, v_pages = k_pages.data, v_pages.data
    if paged:
        pt = batch.pages
        _check(k_pages, "k_pages"), _check(v_pages, "v_pages")
        page_size = k_pages.shape[1]
        kp, vp, indptr, ids = k_pages, v_pages, pt.page_indptr, pt.page_ids
        cached = pt.cached_lengths
        if ids.numel() == 0:  # nothing is ever read through it, but the kernel wants a pointer
            ids = indptr
        pstrides = (*k_pages.stride()[:3], *v_pages.stride()[:3])
    else:
        page_size, kp, vp = 1, k, v  # unused in full mode: any valid pointers do
        indptr = ids = cached = batch.offsets
        pstrides = (0,) * 6
    half_gpu = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    fast = policy.fast_silu and half_gpu
    # TMA in full mode only: a paged key block spans pages, not one box, and boxes of one page
    # each measured slower than pointer loads (BENCHMARKS: "TMA").
    use_tma = policy.tma and half_gpu and not paged and all(_tma_ok(t) for t in (q, k, v))
    qd, kd, vd = q, k, v  # unused pointers unless use_tma
    if use_tma:
        qd, kd, vd = (
            TensorDescriptor.from_tensor(t.flatten(1), [n, D])
            for t, n in ((q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n))
        )
    grid = (m_blocks, (B + (0 if chunk else 1)) * H, splits)
    last["kernel"], last["grid"] = (
        _hstu_fwd[grid](
            q,
            k,
            v,
            qd,
            kd,
            vd,
            dst,
            kp,
            vp,
            batch.offsets,
            batch.num_candidates,
            indptr,
            ids,
            cached,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            dst.stride(0),
            dst.stride(1),
            *pstrides,
            ks,
            vs,
            *sstrides,
            B,
            H,
            rows,
            chunk,
            float(alpha),
            float(inv_n),
            HEAD_DIM=D,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            PAGED=paged,
            PAGE_SIZE=page_size,
            SPLIT=bool(chunk),
            FAST=fast,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
            USE_TMA=use_tma,
            FP8_KV=fp8,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        ),
        grid,
    )
    last.update(config=cfg, splits=splits, tma=use_tma)


def attention_full(
    q,
    k,
    v,
    batch: Batch,
    *,
    alpha: float,
    inv_n: float,
    policy: KernelPolicy = KernelPolicy(autotune=False),
    **options,
) -> torch.Tensor:
    """One call of `Attention(policy).full` (nothing tuned is kept: with autotune on, keep an
    `Attention` to tune once per bucket)."""
    return Attention(policy).full(q, k, v, batch, alpha=alpha, inv_n=inv_n, **options)


def attention_paged(
    q,
    k,
    v,
    batch: Batch,
    k_pages,
    v_pages,
    *,
    alpha: float,
    inv_n: float,
    policy: KernelPolicy = KernelPolicy(autotune=False),
    **options,
) -> torch.Tensor:
    """One call of `Attention(policy).paged`."""
    return Attention(policy).paged(q, k, v, batch, k_pages, v_pages, alpha=alpha, inv_n=inv_n, **options)
