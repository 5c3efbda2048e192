"""HSTU attention in plain PyTorch: the oracle for tests and the CPU path.

Both modes gather into dense per-user tensors and share one masked core:
  S = SiLU(alpha * Q K^T) / N,  A = (S * M) V   (no softmax)
History query at absolute position p sees history keys 0..p; a candidate sees every history key
and itself (the self term is added separately, so candidates never touch each other).
All index work stays on the device: given the host-side max lengths, this is graph-capturable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hstu_exp.core.jagged import Batch, row_to_user
from hstu_exp.ops.fp8 import Fp8Pages, dequantize_tokens


def _gather_rows(values: torch.Tensor, offsets: torch.Tensor, max_len: int):
    """[rows, H, D] jagged -> [B, max_len, H, D] dense (zeros past each length) and the valid mask."""
    lengths = offsets[1:] - offsets[:-1]
    pos = torch.arange(max_len, device=values.device)
    valid = pos[None, :] < lengths[:, None]
    idx = (offsets[:-1, None].long() + pos[None, :]).clamp(max=max(values.shape[0] - 1, 0))
    if values.shape[0] == 0:
        return values.new_zeros(offsets.numel() - 1, max_len, *values.shape[1:]), valid
    return values[idx] * valid[..., None, None].to(values.dtype), valid


def _gather_pages(pages, page_indptr, page_ids, kv_lengths, max_kv_len: int, dtype):
    """Pool view [P, page_size, H, D] (a tensor, or e4m3 `Fp8Pages`, dequantised) -> [B,
    max_kv_len, H, D] in `dtype` through the page table."""
    page_size = pages.shape[1]
    pos = torch.arange(max_kv_len, device=pages.device)
    valid = pos[None, :] < kv_lengths[:, None]
    slot_of_page = page_indptr[:-1, None].long() + pos[None, :] // page_size
    slot_of_page = slot_of_page.clamp(max=max(page_ids.numel() - 1, 0))
    if page_ids.numel() == 0:
        return torch.zeros(
            kv_lengths.numel(), max_kv_len, *pages.shape[2:], dtype=dtype, device=pages.device
        )
    page, slot = page_ids.long()[slot_of_page], pos[None, :] % page_size
    if isinstance(pages, Fp8Pages):
        dense = dequantize_tokens(pages.data[page, slot], pages.scales[page, slot])
    else:
        dense = pages[page, slot]
    dense = dense.to(dtype)
    return dense * valid[..., None, None].to(dtype)


def _masked_core(q, k, v, q_pos, q_is_cand, kv_len, alpha: float, inv_n: float):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] over history keys only."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)
    s = F.silu(s * alpha) * inv_n
    kpos = torch.arange(k.shape[1], device=q.device)
    visible = (kpos[None, None, :] < kv_len[:, None, None]) & (
        q_is_cand[:, :, None] | (kpos[None, None, :] <= q_pos[:, :, None])
    )
    s = s * visible[:, None].to(s.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", s, v)


def _to_rows(dense: torch.Tensor, offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Back to jagged rows. Rows past the last user (graph padding) come out as zeros."""
    user = row_to_user(offsets, num_rows).clamp(max=offsets.numel() - 2)
    rows = torch.arange(num_rows, device=dense.device)
    pos = (rows - offsets.long()[user]).clamp(max=dense.shape[1] - 1)
    live = (rows < offsets[-1]).to(dense.dtype)
    return dense[user, pos] * live[:, None, None]


def _add_candidate_self(out, q, k, v, is_cand_row, alpha: float, inv_n: float):
    s = F.silu((q * k).sum(-1, keepdim=True) * alpha) * inv_n  # [rows, H, 1]
    return out + s * v * is_cand_row[:, None, None].to(out.dtype)


def _candidate_rows(batch: Batch, num_rows: int) -> torch.Tensor:
    user = row_to_user(batch.offsets, num_rows).clamp(max=batch.batch_size - 1)
    end = batch.offsets[1:].long()[user]
    first_cand = end - batch.num_candidates.long()[user]
    return torch.arange(num_rows, device=batch.offsets.device) >= first_cand


def attention_full(q, k, v, batch: Batch, *, alpha: float, inv_n: float) -> torch.Tensor:
    """Queries = keys = each user's rows; history rows are the keys, causally."""
    rows = q.shape[0]
    qd, _ = _gather_rows(q, batch.offsets, batch.max_len)
    kd, _ = _gather_rows(k, batch.offsets, batch.max_len)
    vd, _ = _gather_rows(v, batch.offsets, batch.max_len)
    lengths = batch.offsets[1:] - batch.offsets[:-1]
    history = (lengths - batch.num_candidates).long()
    q_pos = torch.arange(batch.max_len, device=q.device)[None, :].expand(lengths.numel(), -1)
    q_is_cand = q_pos >= history[:, None]
    out = _to_rows(
        _masked_core(qd, kd, vd, q_pos, q_is_cand, history, alpha, inv_n), batch.offsets, rows
    )
    return _add_candidate_self(out, q, k, v, _candidate_rows(batch, rows), alpha, inv_n)


def attention_paged(
    q, k, v, batch: Batch, k_pages, v_pages, *, alpha: float, inv_n: float
) -> torch.Tensor:
    """Queries = new rows; keys = the user's pages (new history already appended) + self.
    k_pages, v_pages: tensors, or `Fp8Pages` (e4m3, dequantised here)."""
    pt = batch.pages
    rows = q.shape[0]
    qd, _ = _gather_rows(q, batch.offsets, batch.max_len)
    lengths = batch.offsets[1:] - batch.offsets[:-1]
    new_history = (lengths - batch.num_candidates).long()
    kv_len = pt.cached_lengths.long() + new_history
    kd = _gather_pages(k_pages, pt.page_indptr, pt.page_ids, kv_len, pt.max_kv_len, q.dtype)
    vd = _gather_pages(v_pages, pt.page_indptr, pt.page_ids, kv_len, pt.max_kv_len, q.dtype)
    i = torch.arange(batch.max_len, device=q.device)[None, :]
    q_pos = pt.cached_lengths.long()[:, None] + i
    q_is_cand = i >= new_history[:, None]
    out = _to_rows(
        _masked_core(qd, kd, vd, q_pos, q_is_cand, kv_len, alpha, inv_n),
        batch.offsets,
        rows,
    )
    return _add_candidate_self(out, q, k, v, _candidate_rows(batch, rows), alpha, inv_n)
