"""The jagged batch the block consumes: rows of all users back to back, no padding.

Each user's rows are `[new history | candidates]`. Without a cache "new history" is the whole
history; with the paged cache the user's earlier history lives in pages (`PageTable`).

Metadata is built on the host (numpy) and reaches the device through `to_device`: one staging
buffer, one copy. On CUDA a copy from pageable memory (`.to(cuda)`, `torch.tensor(...,
device=cuda)`) makes the host wait for all queued GPU work; a non_blocking copy from pinned memory
does not, so the host can prepare batch i+1 while the GPU still runs batch i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

# Every packed array starts at a multiple of 16 bytes: dtype views need their itemsize, and
# Triton specialises kernels on 16-byte aligned pointers (keep one specialisation).
_ALIGN = 16

_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}

# name -> (byte offset, numpy dtype, number of elements) inside a packed buffer
Layout = Dict[str, Tuple[int, np.dtype, int]]


def pack(arrays: Dict[str, np.ndarray], *, pin: bool) -> Tuple[torch.Tensor, Layout]:
    """1-D host arrays laid out back to back in one uint8 tensor (pinned if `pin`)."""
    layout, at = {}, 0
    for name, a in arrays.items():
        layout[name] = (at, a.dtype, a.size)
        at += -(-a.nbytes // _ALIGN) * _ALIGN
    # The caching host allocator keeps a pinned block alive until the copies that read it are
    # done (it records an event on the copy's stream), so the caller may drop it at once.
    buf = torch.empty(at, dtype=torch.uint8, pin_memory=pin)
    raw = buf.numpy()
    for name, a in arrays.items():
        start = layout[name][0]
        raw[start:start + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    return buf, layout


def unpack(buf: torch.Tensor, layout: Layout) -> Dict[str, torch.Tensor]:
    """Typed views of a packed buffer (on whichever device it lives)."""
    out = {}
    for name, (start, dtype, n) in layout.items():
        out[name] = buf[start:start + n * dtype.itemsize].view(_TORCH[dtype])
    return out


def to_device(arrays: Dict[str, np.ndarray], device) -> Dict[str, torch.Tensor]:
    """Host arrays -> device tensors of the same dtypes, through one (pinned) buffer and one
    non_blocking copy: no host sync."""
    device = torch.device(device)
    buf, layout = pack(arrays, pin=device.type == "cuda")
    return unpack(buf.to(device, non_blocking=True), layout)


@dataclass
class PageTable:
    """Where a batch's keys live in the paged pool. Device tensors, so it can sit in a graph."""

    page_indptr: torch.Tensor  # [B+1] int32: user b's pages are page_ids[indptr[b]:indptr[b+1]]
    page_ids: torch.Tensor  # [pages] int32
    cached_lengths: torch.Tensor  # [B] int32: history tokens already in pages before this request
    last_page_len: torch.Tensor  # [B] int32: tokens in the last page after the append
    new_rows: torch.Tensor  # [sum n] int64: batch row of each new history token
    new_page: torch.Tensor  # [sum n] int64: its page
    new_slot: torch.Tensor  # [sum n] int64: its slot in that page
    max_kv_len: int  # host-side: longest cached + new history in the batch
    # The fields above as host numpy arrays, by name, when the table was planned on the host:
    # a graph runner pads these instead of the device tensors (no device ops, no sync).
    host: Optional[Dict[str, np.ndarray]] = None


@dataclass
class Batch:
    offsets: torch.Tensor  # [B+1] int32 row offsets
    num_candidates: torch.Tensor  # [B] int32: the last c_b rows of each user are candidates
    max_len: int  # host-side: most rows of one user
    pages: Optional[PageTable] = None  # None: keys are the batch's own history rows
    host: Optional[Dict[str, np.ndarray]] = None  # offsets, num_candidates as numpy arrays

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1


def make_batch(rows: Sequence[int], num_candidates: Sequence[int], device,
               pages: Optional[PageTable] = None) -> Batch:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(rows, out=offsets[1:])
    host = {"offsets": offsets, "num_candidates": np.asarray(num_candidates, dtype=np.int32)}
    return Batch(**to_device(host, device), max_len=max(rows, default=0), pages=pages, host=host)


def row_to_user(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """User index of every row; searchsorted keeps it free of host syncs."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)
