"""Small fused Triton kernels around the attention, for kernel=triton.

At batch 1 a layer is a dozen launch-bound kernels besides attention, so fewer launches is most
of the gain: the K/V append becomes one kernel (it was a gather and a scatter for K and for V),
and U * LayerNorm(A) one row-wise kernel (was four). The PyTorch versions beside them are what
kernel=reference runs, and the oracle in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hstu_exp.ops.fp8 import Fp8Pages, quantize_tokens


@triton.jit
def _quantize_heads(x, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """A token's row [BLOCK] (heads of HEAD_DIM back to back) in e4m3, one float32 scale a
    head ([BLOCK // HEAD_DIM]): what fp8.quantize_tokens does. Heads past the row's width hold
    garbage and are never stored (the width is whole heads)."""
    xf = tl.reshape(x.to(tl.float32), [BLOCK // HEAD_DIM, HEAD_DIM])
    scale = tl.maximum(tl.max(tl.abs(xf), axis=1) / 448.0, 1e-12)
    y = _e4m3_round(tl.minimum(tl.maximum(xf / scale[:, None], -448.0), 448.0))
    return tl.reshape(y, [BLOCK]).to(tl.float8e4nv), scale


@triton.jit
def _store_kv(
    dst,
    scale_dst,
    stride_pkv,
    stride_skv,
    k,
    v,
    to_page,
    n_heads,
    FP8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """A token's k and v rows to their pool slot (dst: K's; V's is stride_pkv on); FP8: e4m3,
    with their scales to scale_dst (V's stride_skv on). to_page: the columns to write (all or
    none: row masks as column bounds); n_heads: the heads to write."""
    if FP8:
        kq, ks = _quantize_heads(k, HEAD_DIM, BLOCK)
        vq, vs = _quantize_heads(v, HEAD_DIM, BLOCK)
        heads = tl.arange(0, BLOCK // HEAD_DIM)
        tl.store(dst, kq, mask=to_page)
        tl.store(dst + stride_pkv, vq, mask=to_page)
        tl.store(scale_dst + heads, ks, mask=heads < n_heads)
        tl.store(scale_dst + stride_skv + heads, vs, mask=heads < n_heads)
    else:
        tl.store(dst, k, mask=to_page)
        tl.store(dst + stride_pkv, v, mask=to_page)


@triton.jit
def _append_kv_kernel(
    k_ptr,
    v_ptr,
    rows_ptr,
    page_ptr,
    slot_ptr,
    pool_ptr,
    scale_ptr,
    stride_kr,
    stride_vr,
    stride_pp,
    stride_pkv,
    stride_ps,
    stride_sp,
    stride_skv,
    stride_ss,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    FP8: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    page = tl.load(page_ptr + i)
    slot = tl.load(slot_ptr + i)
    cols = tl.arange(0, BLOCK)
    mask = cols < WIDTH
    dst = pool_ptr + page * stride_pp + slot * stride_ps + cols
    k = tl.load(k_ptr + row * stride_kr + cols, mask=mask)
    v = tl.load(v_ptr + row * stride_vr + cols, mask=mask)
    scale_dst = scale_ptr + page * stride_sp + slot * stride_ss
    _store_kv(
        dst, scale_dst, stride_pkv, stride_skv, k, v, mask, WIDTH // HEAD_DIM, FP8, HEAD_DIM, BLOCK
    )


def _pool_args(pool_layer):
    """(pool data, scales, the data's (page, K/V, slot) strides, the scales' ones, fp8) of a
    pool layer [P, 2, page_size, H, D]: a tensor, or e4m3 `Fp8Pages` (then scales [P, 2,
    page_size, H], heads contiguous). Without scales any valid pointer stands in for them."""
    fp8 = isinstance(pool_layer, Fp8Pages)
    data = pool_layer.data if fp8 else pool_layer
    assert data.stride(-1) == 1
    if not fp8:
        return data, data, data.stride()[:3], (0, 0, 0), False
    scales = pool_layer.scales
    assert scales.stride(-1) == 1
    return data, scales, data.stride()[:3], scales.stride()[:3], True


def append_kv(pool_layer, new_rows, new_page, new_slot, k: torch.Tensor, v: torch.Tensor) -> None:
    """pool_layer [P, 2, page_size, H, D] (or e4m3 `Fp8Pages`: each token-head quantised); k, v
    [rows, H, D] (row-strided views are fine)."""
    n = new_rows.numel()
    if n == 0:
        return
    width = k.shape[1] * k.shape[2]
    assert k.stride(2) == 1 and k.stride(1) == k.shape[2]
    pool, scales, pstrides, sstrides, fp8 = _pool_args(pool_layer)
    _append_kv_kernel[(n,)](
        k,
        v,
        new_rows,
        new_page,
        new_slot,
        pool,
        scales,
        k.stride(0),
        v.stride(0),
        *pstrides,
        *sstrides,
        WIDTH=width,
        BLOCK=triton.next_power_of_2(width),
        HEAD_DIM=k.shape[2],
        FP8=fp8,
    )


@triton.jit
def _silu_rounded(x):
    """SiLU in float32, rounded back to x's dtype: what F.silu on the tensor gives."""
    xf = x.to(tl.float32)
    return (xf / (1.0 + tl.exp(-xf))).to(x.dtype)


@triton.jit(do_not_specialize=["num_users"])  # changes every batch (see _hstu_fwd)
def _silu_qkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    offsets_ptr,
    cand_ptr,
    page_ptr,
    slot_ptr,
    pool_ptr,
    scale_ptr,
    zero_ptr,
    num_users,
    stride_qr,
    stride_kr,
    stride_vr,
    stride_pp,
    stride_pkv,
    stride_ps,
    stride_sp,
    stride_skv,
    stride_ss,
    stride_z,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    PAGED: tl.constexpr,
    USERS: tl.constexpr,
    ZERO: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    FP8: tl.constexpr,
):
    """One row: q (and k, v) replaced by their SiLU in place. Paged: a history row's post-SiLU
    k, v go to its (page, slot) instead (the attention reads history keys only from the pages);
    a candidate row's stay in place for the attention's self term. ZERO: also clear the row of
    the attention's float32 split-K sum buffer (saves the attention its memset launch)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < WIDTH
    if ZERO:
        tl.store(zero_ptr + row * stride_z + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)
    q = tl.load(q_ptr + row * stride_qr + cols, mask=mask)
    k = _silu_rounded(tl.load(k_ptr + row * stride_kr + cols, mask=mask))
    v = _silu_rounded(tl.load(v_ptr + row * stride_vr + cols, mask=mask))
    tl.store(q_ptr + row * stride_qr + cols, _silu_rounded(q), mask=mask)
    keep = mask  # where k, v are written back in place
    if PAGED:
        # The row's user from the offsets (users are few: one vector compare), and its index in
        # the batch's append list (history rows in row order = the row minus earlier candidates).
        # Rows past the last user (graph padding) belong to nobody: plain in-place SiLU.
        users = tl.arange(0, USERS)
        live = users < num_users
        ends = tl.load(offsets_ptr + 1 + users, mask=live, other=0)
        b = tl.sum((live & (ends <= row)).to(tl.int32), axis=0)
        owned = b < num_users
        start = tl.load(offsets_ptr + b, mask=owned, other=0)
        n_hist = (
            tl.load(offsets_ptr + b + 1, mask=owned, other=0)
            - start
            - tl.load(cand_ptr + b, mask=owned, other=0)
        )
        history = owned & (row - start < n_hist)
        cands = tl.load(cand_ptr + users, mask=live, other=0)
        i = row - tl.sum(tl.where(users < b, cands, 0), axis=0)
        page = tl.load(page_ptr + i, mask=history, other=0)
        slot = tl.load(slot_ptr + i, mask=history, other=0)
        dst = pool_ptr + page * stride_pp + slot * stride_ps + cols
        # Row masks as column bounds (a scalar & vector mask is not accepted everywhere).
        to_page = cols < WIDTH * history.to(tl.int32)
        scale_dst = scale_ptr + page * stride_sp + slot * stride_ss
        heads = (WIDTH // HEAD_DIM) * history.to(tl.int32)
        _store_kv(dst, scale_dst, stride_pkv, stride_skv, k, v, to_page, heads, FP8, HEAD_DIM, BLOCK)
        keep = cols < WIDTH * (1 - history.to(tl.int32))
    tl.store(k_ptr + row * stride_kr + cols, k, mask=keep)
    tl.store(v_ptr + row * stride_vr + cols, v, mask=keep)


def silu_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch,
    pool_layer: torch.Tensor = None,
    zero: torch.Tensor = None,
) -> None:
    """q, k, v [rows, H, D] raw projections (row-strided views): SiLU in place, in one kernel.
    With the cache (batch.pages, pool_layer [P, 2, page_size, H, D], or e4m3 `Fp8Pages`: each
    token-head quantised on the way) the new history rows' K/V are appended post-SiLU instead
    (history rows' k, v themselves are then left raw: nothing reads them), so the SiLU pass and
    the append are one launch. zero: a float32 [rows, H, D]
    contiguous buffer to clear on the way."""
    rows = q.shape[0]
    if rows == 0:
        return
    width = q.shape[1] * q.shape[2]
    for t in (q, k, v):
        assert t.stride(2) == 1 and t.stride(1) == t.shape[2]
    pt = batch.pages
    paged = pt is not None
    if paged:
        pool, scales, pstrides, sstrides, fp8 = _pool_args(pool_layer)
        page, slot = pt.new_page, pt.new_slot
        if page.numel() == 0:  # nothing is appended, but the kernel wants pointers
            page = slot = batch.offsets
    else:
        pool, page, slot, pstrides = q, batch.offsets, batch.offsets, (0, 0, 0)
        scales, sstrides, fp8 = q, (0, 0, 0), False
    if zero is not None:
        assert zero.dtype == torch.float32 and zero.is_contiguous() and zero.shape == q.shape
    users = batch.batch_size
    _silu_qkv_kernel[(rows,)](
        q,
        k,
        v,
        batch.offsets,
        batch.num_candidates,
        page,
        slot,
        pool,
        scales,
        q if zero is None else zero,
        users,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        *pstrides,
        *sstrides,
        width,
        WIDTH=width,
        BLOCK=triton.next_power_of_2(width),
        PAGED=paged,
        USERS=max(16, triton.next_power_of_2(users)),
        ZERO=zero is not None,
        HEAD_DIM=q.shape[2],
        FP8=fp8,
        num_warps=4 if width <= 2048 else 8,
    )


@triton.jit
def _e4m3_round(y):
    """y (float32, |y| <= 448) rounded to the nearest e4m3 value (ties away from zero), still
    float32: the cast to e4m3 after it is then exact on every backend (Triton's CPU interpreter
    does not round its fp8 casts to nearest). The step is 2^(exponent - 3) (3 mantissa bits),
    2^-9 below e4m3's smallest normal 2^-6; the exponent comes from the bits, not a log2."""
    bits = tl.abs(y).to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(y < 0, -1.0, 1.0) * tl.floor(tl.abs(y) / step + 0.5) * step


@triton.jit
def _store_row(out_ptr, scale_ptr, row, stride_o, cols, y, mask, FP8: tl.constexpr):
    """A float32 row out in out's dtype; FP8: scaled so its largest magnitude is e4m3's 448,
    its scale (float32) to scale_ptr[row] (fused.fp8 documents the scheme)."""
    if FP8:
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.maximum(amax / 448.0, 1e-12)
        y = _e4m3_round(tl.minimum(tl.maximum(y / scale, -448.0), 448.0))
        tl.store(scale_ptr + row, scale)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    scale_ptr,
    stride_x,
    stride_o,
    eps,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < WIDTH
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / WIDTH
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / WIDTH
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * tl.rsqrt(var + eps) * w + b
    _store_row(out_ptr, scale_ptr, row, stride_o, cols, y, mask, FP8)


def _fp8_out(rows: int, width: int, device):
    from hstu_exp.ops.fp8 import E4M3

    return (
        torch.empty(rows, width, dtype=E4M3, device=device),
        torch.empty(rows, 1, dtype=torch.float32, device=device),
    )


def layernorm(x: torch.Tensor, weight, bias, eps: float, fp8: bool = False):
    """LayerNorm over the last dim of x [rows, width]: one read, one write, a row a program.
    fp8: (e4m3 rows, float32 row scales [rows, 1]) for `fp8.scaled_linear`, instead."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, width = x.shape
    if fp8:
        out, scale = _fp8_out(rows, width, x.device)
    else:
        out = scale = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    if rows:
        _layernorm_kernel[(rows,)](
            x,
            weight,
            bias,
            out,
            scale,
            x.stride(0),
            out.stride(0),
            eps,
            WIDTH=width,
            BLOCK=triton.next_power_of_2(width),
            FP8=fp8,
            num_warps=4 if width <= 2048 else 8,
        )
    return (out, scale) if fp8 else out


@triton.jit
def _ln_mul_kernel(
    a_ptr,
    u_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    scale_ptr,
    stride_a,
    stride_u,
    stride_o,
    eps,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    SILU_U: tl.constexpr,
    FP8: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < WIDTH
    a = tl.load(a_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(a, axis=0) / WIDTH
    centered = tl.where(mask, a - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / WIDTH
    y = centered * tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
    if SILU_U:  # u is the raw projection: SiLU rounded to u's dtype, as a separate pass would
        u = _silu_rounded(u)
    u = u.to(tl.float32)
    _store_row(out_ptr, scale_ptr, row, stride_o, cols, u * (y * w + b), mask, FP8)


def layernorm_mul(
    a: torch.Tensor, u: torch.Tensor, weight, bias, eps: float, silu_u: bool = False, fp8: bool = False
):
    """u * LayerNorm(a) over the last dim; a, u [rows, width] (row-strided views are fine).
    silu_u: u is the raw projection, SiLU(u) is used. fp8: (e4m3 rows, row scales) instead."""
    rows, width = a.shape
    if fp8:
        out, scale = _fp8_out(rows, width, u.device)
    else:
        out = scale = torch.empty(rows, width, dtype=u.dtype, device=u.device)
    if rows:
        _ln_mul_kernel[(rows,)](
            a,
            u,
            weight,
            bias,
            out,
            scale,
            a.stride(0),
            u.stride(0),
            out.stride(0),
            eps,
            WIDTH=width,
            BLOCK=triton.next_power_of_2(width),
            SILU_U=silu_u,
            FP8=fp8,
            num_warps=4 if width <= 2048 else 8,
        )
    return (out, scale) if fp8 else out


def layernorm_mul_linear_add(
    a, u, norm_w, norm_b, w, x, eps: float, silu_u: bool = False, in_place: bool = False
):
    """x + (u * LayerNorm(a)) w^T: the row-wise kernel (a may be float32 split-K sums), then a
    cuBLAS GEMM with the residual as its C input. silu_u: u is raw, SiLU(u) is used.
    in_place: the sum goes into x itself (an out-of-place addmm first copies x into the result:
    one device copy of [rows, hidden] a layer). w: the weight, or an `fp8.Fp8Weight` (the rows
    are quantised to e4m3 by the row-wise kernel; `_scaled_mm` has no C input, so the residual
    is one add after it)."""
    from hstu_exp.ops.fp8 import Fp8Weight, scaled_linear

    if isinstance(w, Fp8Weight):
        yq, scale = layernorm_mul(a, u, norm_w, norm_b, eps, silu_u, fp8=True)
        out = scaled_linear(yq, scale, w, None, x.dtype)
        return x.add_(out) if in_place and not x.requires_grad else x + out
    y = layernorm_mul(a, u, norm_w, norm_b, eps, silu_u)
    if in_place and not x.requires_grad:
        return x.addmm_(y, w.t())
    return torch.addmm(x, y, w.t())


def layernorm_mul_linear_add_torch(a, u, norm_w, norm_b, w, x, eps: float):
    from hstu_exp.ops.fp8 import Fp8Weight, quantize_rows, scaled_linear

    y = layernorm_mul_torch(a.to(u.dtype), u, norm_w, norm_b, eps)
    if isinstance(w, Fp8Weight):
        return x + scaled_linear(*quantize_rows(y), w, None, x.dtype)
    return torch.addmm(x, y, w.t())


def append_kv_torch(pool_layer, new_rows, new_page, new_slot, k, v) -> None:
    """pool_layer [P, 2, page_size, H, D], or `Fp8Pages` (each token-head quantised)."""
    if isinstance(pool_layer, Fp8Pages):
        for i, x in enumerate((k, v)):
            data, scale = quantize_tokens(x[new_rows])
            pool_layer.data[new_page, i, new_slot] = data
            pool_layer.scales[new_page, i, new_slot] = scale
        return
    pool_layer[new_page, 0, new_slot] = k[new_rows]
    pool_layer[new_page, 1, new_slot] = v[new_rows]


def layernorm_mul_torch(a, u, weight, bias, eps: float):
    return u * F.layer_norm(a, (a.shape[-1],), weight, bias, eps)


def layernorm_torch(x, weight, bias, eps: float, fp8: bool = False):
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if fp8:
        from hstu_exp.ops.fp8 import quantize_rows

        return quantize_rows(y)
    return y
