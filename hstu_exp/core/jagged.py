"""The jagged batch the block consumes: rows of all users back to back, no padding.

Each user's rows are `[new history | candidates]`. Without a cache "new history" is the whole
history; with the paged cache the user's earlier history lives in pages (`PageTable`).

Metadata is built on the host (numpy) and reaches the device through `to_device`: one staging
buffer, one copy. On CUDA a copy from pageable memory (`.to(cuda)`, `torch.tensor(...,
device=cuda)`) makes the host wait for all queued GPU work; a non_blocking copy from pinned memory
does not, so the host can prepare batch i+1 while the GPU still runs batch i.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

# Every packed array starts at a multiple of 16 bytes: dtype views need their itemsize, and
# Triton specialises kernels on 16-byte aligned pointers (keep one specialisation).
_ALIGN = 16

_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}

# name -> (byte offset, numpy dtype, number of elements) inside a packed buffer
Layout = Dict[str, Tuple[int, np.dtype, int]]


def layout_of(fields) -> Tuple[Layout, int]:
    """(layout, bytes) of 1-D arrays given as (name, numpy dtype, elements), back to back."""
    layout, at = {}, 0
    for name, dtype, n in fields:
        layout[name] = (at, dtype, n)
        at += -(-n * dtype.itemsize // _ALIGN) * _ALIGN
    return layout, at


def pack(arrays: Dict[str, np.ndarray], *, pin: bool) -> Tuple[torch.Tensor, Layout]:
    """1-D host arrays laid out back to back in one uint8 tensor (pinned if `pin`)."""
    layout, size = layout_of((name, a.dtype, a.size) for name, a in arrays.items())
    # The caching host allocator keeps a pinned block alive until the copies that read it are
    # done (it records an event on the copy's stream), so the caller may drop it at once.
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    raw, typed = buf.numpy(), {}
    for name, a in arrays.items():  # one write an array, into the buffer viewed as its dtype
        start, dtype, n = layout[name]
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = raw.view(dtype)
        view[start // dtype.itemsize : start // dtype.itemsize + n] = a
    return buf, layout


def unpack(buf, layout: Layout) -> dict:
    """Typed views of a packed buffer (a tensor on whichever device it lives, or its numpy
    array on the host): the whole buffer viewed once per dtype (its size is a multiple of 16
    bytes), then one slice an array (a torch op costs the host microseconds; a step unpacks a
    dozen arrays)."""
    whole = {}
    out = {}
    host = isinstance(buf, np.ndarray)
    for name, (start, dtype, n) in layout.items():
        typed = whole.get(dtype)
        if typed is None:
            typed = whole[dtype] = buf.view(dtype if host else _TORCH[dtype])
        first = start // dtype.itemsize
        out[name] = typed[first : first + n]
    return out


def to_device(arrays: Dict[str, np.ndarray], device) -> Dict[str, torch.Tensor]:
    """Host arrays -> device tensors of the same dtypes, through one (pinned) buffer and one
    non_blocking copy: no host sync."""
    device = torch.device(device)
    buf, layout = pack(arrays, pin=device.type == "cuda")
    return unpack(buf.to(device, non_blocking=True), layout)


PAGE_FIELDS = (
    "page_indptr",
    "page_ids",
    "cached_lengths",
    "last_page_len",
    "new_rows",
    "new_page",
    "new_slot",
)
BATCH_FIELDS = ("offsets", "num_candidates")


@dataclass
class PageTable:
    """Where a batch's keys live in the paged pool. Device tensors, so it can sit in a graph;
    None until uploaded when it was planned on the host alone (`PagedKVCache.plan(upload=
    False)`: the caller uploads it with the rest of its step, or a graph runner pads `host`)."""

    page_indptr: Optional[torch.Tensor] = None  # [B+1] int32: page_ids[indptr[b]:indptr[b+1]]
    page_ids: Optional[torch.Tensor] = None  # [pages] int32
    cached_lengths: Optional[torch.Tensor] = None  # [B] int32: tokens in pages before this request
    last_page_len: Optional[torch.Tensor] = None  # [B] int32: tokens in the last page after the append
    new_rows: Optional[torch.Tensor] = None  # [sum n] int64: batch row of each new history token
    new_page: Optional[torch.Tensor] = None  # [sum n] int64: its page
    new_slot: Optional[torch.Tensor] = None  # [sum n] int64: its slot in that page
    max_kv_len: int = 0  # host-side: longest cached + new history in the batch
    # The fields above as host numpy arrays, by name, when the table was planned on the host:
    # a graph runner pads these instead of the device tensors (no device ops, no sync).
    host: Optional[Dict[str, np.ndarray]] = None

    def upload(self, device) -> "PageTable":
        return self.with_views(to_device(self.host, device))

    def with_views(self, views: Dict[str, torch.Tensor]) -> "PageTable":
        return replace(self, **{k: views[k] for k in PAGE_FIELDS})


@dataclass
class Batch:
    offsets: Optional[torch.Tensor]  # [B+1] int32 row offsets (None until uploaded)
    num_candidates: Optional[torch.Tensor]  # [B] int32: the last c_b rows of each user
    max_len: int  # host-side: most rows of one user
    pages: Optional[PageTable] = None  # None: keys are the batch's own history rows
    host: Optional[Dict[str, np.ndarray]] = None  # offsets, num_candidates as numpy arrays

    @property
    def batch_size(self) -> int:
        return len(self.host["offsets"]) - 1 if self.host else self.offsets.numel() - 1

    def upload(self, device) -> "Batch":
        return self.with_views(to_device(self.host, device))

    def with_views(self, views: Dict[str, torch.Tensor]) -> "Batch":
        return replace(self, **{k: views[k] for k in BATCH_FIELDS})


def per_user(values: Sequence[int], counts: Sequence[int]):
    """values[u] for each of the counts[u] items (tokens, candidates) of user u, as one int64
    array; with one user, its value alone (numpy broadcasts it: no repeat). The host path's
    per-token arrays are `np.arange` plus such per-user offsets."""
    if len(values) == 1:
        return values[0]
    return np.array(values, np.int64).repeat(counts)


def make_batch(
    rows: Sequence[int],
    num_candidates: Sequence[int],
    device,
    pages: Optional[PageTable] = None,
    *,
    upload: bool = True,
) -> Batch:
    """upload=False: host arrays only (`Batch.host`; see `upload_step`)."""
    offsets = np.array(list(accumulate(rows, initial=0)), dtype=np.int32)
    host = {"offsets": offsets, "num_candidates": np.asarray(num_candidates, dtype=np.int32)}
    batch = Batch(None, None, max_len=int(max(rows, default=0)), pages=pages, host=host)
    return batch.upload(device) if upload else batch


def upload_step(batch: Batch, tokens, device):
    """A step's metadata (batch, its page table, the token rows `tokens.device_arrays()`)
    uploaded together: one pinned buffer, one non_blocking copy. Returns (batch, tokens) with
    device tensors."""
    groups = {"b": batch.host, "t": tokens.device_arrays()}
    if batch.pages is not None:
        groups["p"] = batch.pages.host
    views = to_device({f"{g}.{k}": a for g, arrays in groups.items() for k, a in arrays.items()}, device)
    part = lambda g: {k: views[f"{g}.{k}"] for k in groups[g]}  # noqa: E731
    if batch.pages is not None:
        batch = replace(batch, pages=batch.pages.with_views(part("p")))
    return batch.with_views(part("b")), tokens.with_views(part("t"))


def row_to_user(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """User index of every row; searchsorted keeps it free of host syncs."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)
