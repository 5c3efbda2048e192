"""HSTU attention for Hopper (sm_90), warp-specialised, written in Gluon (docs/design.md §5).

Same semantics and signatures as `triton_attention` in both modes (full: queries = keys = a user's
rows; paged: queries = the new rows, history keys from the pages; candidates see the history and
themselves); bf16/fp16 on an sm_90 GPU only; key splits in paged mode. What Triton's automatic
pipeliner could not give the portable kernel (its key loop waited for K/V tiles and for Q.K^T
before the SiLU, because both warpgroups of a program did the same phase at the same time;
outputs/BENCHMARKS.md, "Hopper kernel"):

  * a producer warp issues every TMA copy (Q halves once, then K and V boxes into K_STAGES /
    V_STAGES rings guarded by ready / empty mbarriers), so loads go out as soon as a slot is free;
    in paged mode it also loads the page ids and issues one box a page, off the consumers' path;
  * two consumer warpgroups own 64 query rows each of the program's 128 and run their own loop,
    so while one applies SiLU and masks on the CUDA cores the other keeps the tensor cores busy;
  * K and V have rings of their own, so Q.K^T starts when K lands (2 slots each + the 64 KB Q tile
    take 192 of the 227 KB at D = 256; a third K slot fits, but its consumers spill and it is
    slower).

Per program (query block of 128 rows, user, head, key split) the key blocks visited are the key
sequence's blocks up to the block's last history row (all of them if it holds candidates), then
the diagonal blocks of its candidate rows, read from k / v (their own keys come through the mask);
each consumer skips the blocks none of its rows can see (it still takes part in the barrier
protocol), masks only blocks that straddle its rows' causal edge or hold candidate keys, and zeroes
V rows past the user's keys on the last block (rows a box reads past them may be dead padding
holding NaN; 0 x NaN is NaN). Split programs add float32 partials with atomics.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Names that moved between Triton 3.6 (the GPU box) and 3.9: a TMA load into shared memory, and
# all warps of a partition past a point.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_sync_warps = getattr(gl, "thread_barrier", None) or gl.barrier
HALF = gl.constexpr(64)  # query rows per consumer warpgroup: one wgmma M extent of its 4 warps
BLOCK_M = gl.constexpr(128)
# Registers: 3 warpgroups (2 consumers + the producer's, padded) share 64 K registers a thread x
# 384 threads at maxnreg 168; the producer drops to 24 so each consumer can hold 240 (its [64, 256]
# fp32 accumulator alone is 128).
MAXNREG = 168
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)
# (user, head) pairs whose query blocks are ordered together (see _schedule): 8 pairs' K/V at
# 4352 x 256 keys take 35 MB of the H200's 50 MB L2.
GROUP = 8


@gluon.jit
def _schedule(
    offsets,
    num_cand,
    cached_len,
    num_users,
    num_heads,
    m_blocks,
    splits,
    chunk,
    BLOCK_N: gl.constexpr,
    GROUP: gl.constexpr,
    PAGED: gl.constexpr,
    SPLIT: gl.constexpr,
):
    """The program's user, head, split, rows and key-block list: `n_a` blocks of the key sequence
    from block `lo_a` (full mode: the user's rows; paged: the pages, cached prefix + new history),
    then the diagonal blocks from `jd0` of its candidate rows (rows of q, k, v; split 0 only).

    Order (blocks start in program-id order): (user, head, split) in groups of GROUP, and inside a
    group the query blocks longest first (causal: later blocks see more keys), groups interleaved.
    One by one (GROUP = 1) the last pair's longest blocks would start near the end and run alone;
    all pairs at once would spread every pair's K/V over L2 at the same time."""
    per_group = GROUP * m_blocks
    g = gl.program_id(0) // per_group
    r = gl.program_id(0) % per_group
    dead_user = 0 if SPLIT else 1  # unsplit: one more "user" whose programs zero dead rows
    size = gl.minimum(GROUP, (num_users + dead_user) * num_heads * splits - g * GROUP)
    pid_m = m_blocks - 1 - r // size
    pair = g * GROUP + r % size
    split = pair % splits
    b = pair // splits // num_heads
    h = pair // splits % num_heads
    bb = gl.minimum(b, num_users - 1)
    row0 = gl.load(offsets + bb)
    seq_len = gl.load(offsets + bb + 1) - row0
    n_hist = seq_len - gl.load(num_cand + bb)  # rows that are history (the rest: candidates)
    first = 0  # key position of query row 0
    if PAGED:
        first = gl.load(cached_len + bb)
    kv_len = first + n_hist
    m0 = pid_m * BLOCK_M
    has_cand = m0 + BLOCK_M > n_hist
    hi = first + m0 + BLOCK_M  # keys up to the block's last history row, all if it has candidates
    if has_cand:
        hi = kv_len
    a_blocks = gl.cdiv(hi, BLOCK_N)
    lo_a = 0
    if SPLIT:
        lo_a = split * chunk
        a_blocks = gl.minimum(a_blocks, lo_a + chunk)
    n_a = gl.maximum(a_blocks - lo_a, 0)
    if PAGED:  # candidate keys live in k / v (rows of the request), never in pages
        jd0 = gl.maximum(m0, n_hist) // BLOCK_N
    else:  # past the history blocks (a block straddling n_hist already holds some)
        jd0 = gl.maximum(a_blocks, m0 // BLOCK_N)
    n_b = gl.where(
        has_cand & (split == 0),
        gl.maximum(gl.cdiv(gl.minimum(seq_len, m0 + BLOCK_M), BLOCK_N) - jd0, 0),
        0,
    )
    total = n_a + n_b
    if (b >= num_users) | (m0 >= seq_len):
        total = 0
    return pid_m, b, h, row0, seq_len, n_hist, first, kv_len, m0, lo_a, n_a, jd0, total


@gluon.jit
def _load_pages(
    desc,
    bar,
    buf,
    page_ids,
    page_base,
    n0,
    kv_len,
    page_rows,
    extra_rows,
    col,
    BLOCK_N: gl.constexpr,
    PAGE_SIZE: gl.constexpr,
):
    """Key block n0 of a user's pages into buf: one box a page (or the block's part of one).
    Boxes past the user's last key read its first page (V is zeroed there)."""
    BOX: gl.constexpr = PAGE_SIZE if PAGE_SIZE < BLOCK_N else BLOCK_N
    for i in gl.static_range(BLOCK_N // BOX):
        pos = n0 + i * BOX
        page = gl.load(page_ids + page_base + gl.where(pos < kv_len, pos // PAGE_SIZE, 0))
        _tma_load(
            desc, [page * page_rows + pos % PAGE_SIZE + extra_rows, col], bar, buf.slice(i * BOX, BOX)
        )


@gluon.jit
def _load_partition(
    qd,
    kd,
    vd,
    kpd,
    vpd,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    offsets,
    num_cand,
    cached_len,
    page_indptr,
    page_ids,
    page_rows,
    v_rows,
    num_users,
    num_heads,
    m_blocks,
    splits,
    chunk,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    GROUP: gl.constexpr,
    PAGED: gl.constexpr,
    PAGE_SIZE: gl.constexpr,
    SPLIT: gl.constexpr,
):
    K_STAGES: gl.constexpr = k_smem.type.shape[0]
    V_STAGES: gl.constexpr = v_smem.type.shape[0]
    _, b, h, row0, seq_len, n_hist, first, kv_len, m0, lo_a, n_a, jd0, total = _schedule(
        offsets,
        num_cand,
        cached_len,
        num_users,
        num_heads,
        m_blocks,
        splits,
        chunk,
        BLOCK_N,
        GROUP,
        PAGED,
        SPLIT,
    )
    col = h * HEAD_DIM
    page_base = 0
    if PAGED:
        page_base = gl.load(page_indptr + gl.minimum(b, num_users - 1))
    if total > 0:
        mbarrier.expect(q_bar, 2 * qd.block_type.nbytes)
        _tma_load(qd, [row0 + m0, col], q_bar, q_smem.index(0))
        _tma_load(qd, [row0 + m0 + HALF, col], q_bar, q_smem.index(1))
    for t in range(total):
        from_pages = t < n_a
        n0 = gl.where(from_pages, lo_a + t, jd0 + t - n_a) * BLOCK_N
        sk = t % K_STAGES
        sv = t % V_STAGES
        k_buf = k_smem.index(sk)
        v_buf = v_smem.index(sv)
        mbarrier.wait(k_empty.index(sk), ((t // K_STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
        mbarrier.expect(k_ready.index(sk), kd.block_type.nbytes)
        if PAGED & from_pages:  # page-id loads sit here, off the consumers' path
            _load_pages(
                kpd,
                k_ready.index(sk),
                k_buf,
                page_ids,
                page_base,
                n0,
                kv_len,
                page_rows,
                0,
                col,
                BLOCK_N,
                PAGE_SIZE,
            )
            mbarrier.wait(v_empty.index(sv), ((t // V_STAGES) & 1) ^ 1)
            mbarrier.expect(v_ready.index(sv), vd.block_type.nbytes)
            _load_pages(
                vpd,
                v_ready.index(sv),
                v_buf,
                page_ids,
                page_base,
                n0,
                kv_len,
                page_rows,
                v_rows,
                col,
                BLOCK_N,
                PAGE_SIZE,
            )
        else:
            _tma_load(kd, [row0 + n0, col], k_ready.index(sk), k_buf)
            mbarrier.wait(v_empty.index(sv), ((t // V_STAGES) & 1) ^ 1)
            mbarrier.expect(v_ready.index(sv), vd.block_type.nbytes)
            _tma_load(vd, [row0 + n0, col], v_ready.index(sv), v_buf)


@gluon.jit
def _silu_fast(s, half_alpha):
    # x sigmoid(x) = u + u tanh(u), u = x / 2: one MUFU op a score (as in triton_attention._silu)
    u = s * half_alpha
    th = gl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=gl.float32, is_pure=True, pack=1
    )
    return u + u * th


@gluon.jit
def _consumer(
    HALF_ID: gl.constexpr,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    Out,
    stride_or,
    stride_oh,
    offsets,
    num_cand,
    cached_len,
    num_users,
    num_heads,
    m_blocks,
    splits,
    chunk,
    num_rows,
    alpha,
    inv_n,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    GROUP: gl.constexpr,
    PAGED: gl.constexpr,
    SPLIT: gl.constexpr,
):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    v_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    K_STAGES: gl.constexpr = k_smem.type.shape[0]
    V_STAGES: gl.constexpr = v_smem.type.shape[0]
    pid_m, b, h, row0, seq_len, n_hist, first, kv_len, m0, lo_a, n_a, jd0, total = _schedule(
        offsets,
        num_cand,
        cached_len,
        num_users,
        num_heads,
        m_blocks,
        splits,
        chunk,
        BLOCK_N,
        GROUP,
        PAGED,
        SPLIT,
    )
    r0 = m0 + HALF_ID * HALF
    out_ty = Out.dtype.element_ty
    rows_o = gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))

    if not SPLIT:
        if b == num_users:
            # Rows past the last user (graph padding) are zeroed, as the reference does (split:
            # the caller's zeroed float32 buffer already holds zeros there).
            start = gl.load(offsets + num_users)
            zero = gl.zeros([HALF, HEAD_DIM], out_ty, o_layout)
            for r in range(start + pid_m * BLOCK_M + HALF_ID * HALF, num_rows, m_blocks * BLOCK_M):
                rows = (r + rows_o).to(gl.int64)
                gl.store(
                    Out + rows[:, None] * stride_or + h * stride_oh + cols_o[None, :],
                    zero,
                    mask=(rows < num_rows)[:, None],
                )

    rows_s = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    keys_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    keys_v = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, v_layout))
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)
    q = q_smem.index(HALF_ID)
    half_alpha = 0.5 * alpha
    half_end = gl.minimum(r0 + HALF, seq_len)  # rows of this half that belong to the user
    live = r0 < half_end
    # Sequence keys below it are seen by every row of the half (no mask); below the other, by
    # some row (history row i sees key positions <= first + i, candidates all of the sequence).
    clear_edge = gl.minimum(first + r0, kv_len)
    seen_edge = gl.minimum(first + half_end, kv_len)
    cand_lo = gl.maximum(r0, n_hist)  # first candidate row of the half: own keys from here
    if total > 0:
        mbarrier.wait(q_bar, 0)
    for t in range(total):
        from_seq = t < n_a
        n0 = gl.where(from_seq, lo_a + t, jd0 + t - n_a) * BLOCK_N
        sk = t % K_STAGES
        sv = t % V_STAGES
        k_buf = k_smem.index(sk)
        v_buf = v_smem.index(sv)
        # own keys of the half's candidates (a diagonal block, or in full mode a sequence block
        # reaching past the history)
        own = (n0 < half_end) & (n0 + BLOCK_N > cand_lo)
        if from_seq:
            sees = live & ((n0 < seen_edge) | ((not PAGED) & own))
        else:
            sees = live & own
        mbarrier.wait(k_ready.index(sk), (t // K_STAGES) & 1)
        if sees:
            s = warpgroup_mma(q, k_buf.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s,))
            mbarrier.arrive(k_empty.index(sk))
            p = _silu_fast(s, half_alpha)
            if (t >= n_a) | (n0 + BLOCK_N > clear_edge):
                keys = (n0 + keys_s)[None, :]
                rows = rows_s[:, None]
                is_own = (keys == rows) & (rows >= n_hist)
                if from_seq:
                    visible = (keys < kv_len) & ((rows >= n_hist) | (keys <= first + rows))
                    if not PAGED:
                        visible = visible | is_own
                else:
                    visible = is_own
                p = gl.where(visible, p, 0.0)
            p = gl.convert_layout(p.to(q_smem.dtype), p_layout)
            mbarrier.wait(v_ready.index(sv), (t // V_STAGES) & 1)
            limit = seq_len  # rows of the block that are the user's keys
            if PAGED & from_seq:
                limit = kv_len
            if n0 + BLOCK_N > limit:
                # Rows past them may be another user's or dead padding (NaN; 0 x NaN is NaN):
                # zero them (both consumers write the same bytes).
                v = v_buf.load(v_layout)
                v = gl.where(((n0 + keys_v) < limit)[:, None], v, gl.zeros_like(v))
                v_buf.store(v)
                fence_async_shared()
                _sync_warps()
            acc = warpgroup_mma(p, v_buf, acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(v_empty.index(sv))
        else:
            mbarrier.arrive(k_empty.index(sk))
            mbarrier.wait(v_ready.index(sv), (t // V_STAGES) & 1)
            mbarrier.arrive(v_empty.index(sv))

    if total > 0:
        rows = r0 + rows_o
        ptrs = Out + (row0 + rows).to(gl.int64)[:, None] * stride_or + h * stride_oh + cols_o[None, :]
        if SPLIT:  # float32 partial sums over key chunks
            gl.atomic_add(ptrs, acc * inv_n, mask=(rows < seq_len)[:, None], sem="relaxed")
        else:
            gl.store(ptrs, (acc * inv_n).to(out_ty), mask=(rows < seq_len)[:, None])


# The per-batch counts are not specialized on (see triton_attention._hstu_fwd).
@gluon.jit(do_not_specialize=["num_users", "m_blocks", "num_rows"])
def _hopper_fwd(
    qd,
    kd,
    vd,
    kpd,
    vpd,
    Out,
    offsets,
    num_cand,
    cached_len,
    page_indptr,
    page_ids,
    stride_or,
    stride_oh,
    page_rows,
    v_rows,
    num_users,
    num_heads,
    m_blocks,
    splits,
    chunk,
    num_rows,
    alpha,
    inv_n,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    K_STAGES: gl.constexpr,
    V_STAGES: gl.constexpr,
    GROUP: gl.constexpr,
    PAGED: gl.constexpr,
    PAGE_SIZE: gl.constexpr,
    SPLIT: gl.constexpr,
):
    dtype: gl.constexpr = qd.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], qd.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], kd.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BLOCK_N, HEAD_DIM], vd.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer warpgroup
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)

    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    0,
                    q_smem,
                    k_smem,
                    v_smem,
                    q_bar,
                    k_ready,
                    k_empty,
                    v_ready,
                    v_empty,
                    Out,
                    stride_or,
                    stride_oh,
                    offsets,
                    num_cand,
                    cached_len,
                    num_users,
                    num_heads,
                    m_blocks,
                    splits,
                    chunk,
                    num_rows,
                    alpha,
                    inv_n,
                    HEAD_DIM,
                    BLOCK_N,
                    GROUP,
                    PAGED,
                    SPLIT,
                ),
            ),
            (
                _consumer,
                (
                    1,
                    q_smem,
                    k_smem,
                    v_smem,
                    q_bar,
                    k_ready,
                    k_empty,
                    v_ready,
                    v_empty,
                    Out,
                    stride_or,
                    stride_oh,
                    offsets,
                    num_cand,
                    cached_len,
                    num_users,
                    num_heads,
                    m_blocks,
                    splits,
                    chunk,
                    num_rows,
                    alpha,
                    inv_n,
                    HEAD_DIM,
                    BLOCK_N,
                    GROUP,
                    PAGED,
                    SPLIT,
                ),
            ),
            (
                _load_partition,
                (
                    qd,
                    kd,
                    vd,
                    kpd,
                    vpd,
                    q_smem,
                    k_smem,
                    v_smem,
                    q_bar,
                    k_ready,
                    k_empty,
                    v_ready,
                    v_empty,
                    offsets,
                    num_cand,
                    cached_len,
                    page_indptr,
                    page_ids,
                    page_rows,
                    v_rows,
                    num_users,
                    num_heads,
                    m_blocks,
                    splits,
                    chunk,
                    HEAD_DIM,
                    BLOCK_N,
                    GROUP,
                    PAGED,
                    PAGE_SIZE,
                    SPLIT,
                ),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )


def supported(t: torch.Tensor) -> bool:
    """Whether this kernel can read t ([rows, H, D]): bf16/fp16 on an sm_90 GPU, D in {64, 128,
    256}, heads packed so a TMA descriptor covers it as [rows, H*D] (16-byte aligned)."""
    D = t.shape[-1]
    return (
        t.is_cuda
        and t.dim() == 3
        and t.dtype in (torch.bfloat16, torch.float16)
        and D in (64, 128, 256)
        and _capability(t.device.index or 0) == 9
        and t.stride(2) == 1
        and t.stride(1) == D
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def pool_rows(k_pages: torch.Tensor, v_pages: torch.Tensor):
    """(view, page_rows, v_rows): the pool seen as rows [n, H*D] that one TMA descriptor covers,
    K slot s of page p at row p * page_rows + s and its V at that + v_rows; None where the pages
    ([P, page_size, H, D] views) are not laid out so (slots packed, V after K, aligned)."""
    P, page, H, D = k_pages.shape
    row = k_pages.stride(1)
    el = k_pages.element_size()
    gap = v_pages.data_ptr() - k_pages.data_ptr()
    if not (
        supported(k_pages[0])
        and v_pages.dtype == k_pages.dtype
        and row == H * D
        and k_pages.stride() == v_pages.stride()
        and k_pages.stride(0) % row == 0
        and gap >= 0
        and gap % (row * el) == 0
        and page >= 8
        and page & (page - 1) == 0
    ):
        return None
    page_rows, v_rows = k_pages.stride(0) // row, gap // (row * el)
    n = (P - 1) * page_rows + page + v_rows
    return torch.as_strided(k_pages, (n, row), (row, 1)), page_rows, v_rows


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _desc(t: torch.Tensor, rows: int, head_dim: int) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(
        [rows, head_dim], gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    )
    return TensorDescriptor.from_tensor(t.flatten(1) if t.dim() == 3 else t, [rows, head_dim], layout)


def launch(
    q,
    k,
    v,
    out,
    batch,
    *,
    alpha: float,
    inv_n: float,
    pages=None,
    chunk: int = 0,
    splits: int = 1,
    block_n: int = 64,
    k_stages: int = 2,
    v_stages: int = 2,
    group: Optional[int] = None,
):
    """q, k, v [rows, H, D] jagged by batch.offsets into out (any row / head strides; float32
    and zeroed when split). pages: None (full mode) or (k_pages, v_pages) read through
    batch.pages. chunk: key blocks a split takes (0: no split), splits: how many. The grid
    comes from host ints, so the launch can be captured in a CUDA graph."""
    # the full-mode schedule is not split-safe (docs/design.md §5); triton_attention._plan
    # never splits it, and a caller that tried would get wrong sums, not an error
    assert pages is not None or not chunk, "Hopper attention splits keys in paged mode only"
    rows, H, D = q.shape
    B = batch.batch_size
    qd, kd, vd = _desc(q, int(HALF), D), _desc(k, block_n, D), _desc(v, block_n, D)
    if pages is None:
        kpd, vpd, page_rows, v_rows, page_size = kd, vd, 0, 0, block_n
        cached = indptr = ids = batch.offsets  # unused pointers in full mode
    else:
        view, page_rows, v_rows = pool_rows(*pages)
        page_size = pages[0].shape[1]
        kpd = vpd = _desc(view, min(page_size, block_n), D)
        pt = batch.pages
        cached, indptr = pt.cached_lengths, pt.page_indptr
        ids = pt.page_ids if pt.page_ids.numel() else indptr
    group = group or GROUP
    m_blocks = triton.cdiv(batch.max_len, int(BLOCK_M))
    users = B + (0 if chunk else 1)  # unsplit: one more "user" whose programs zero dead rows
    grid = (m_blocks * users * H * splits,)
    return _hopper_fwd[grid](
        qd,
        kd,
        vd,
        kpd,
        vpd,
        out,
        batch.offsets,
        batch.num_candidates,
        cached,
        indptr,
        ids,
        out.stride(0),
        out.stride(1),
        page_rows,
        v_rows,
        B,
        H,
        m_blocks,
        splits,
        chunk,
        rows,
        float(alpha),
        float(inv_n),
        HEAD_DIM=D,
        BLOCK_N=block_n,
        K_STAGES=k_stages,
        V_STAGES=v_stages,
        GROUP=group,
        PAGED=pages is not None,
        PAGE_SIZE=page_size,
        SPLIT=bool(chunk),
        num_warps=4,
        maxnreg=MAXNREG,
    )
