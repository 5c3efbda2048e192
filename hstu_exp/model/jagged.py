"""The jagged batch the block consumes: rows of all users back to back, no padding.

Each user's rows are `[new history | candidates]`. Without a cache "new history" is the whole
history; with the paged cache the user's earlier history lives in pages (`PageTable`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


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


@dataclass
class Batch:
    offsets: torch.Tensor  # [B+1] int32 row offsets
    num_candidates: torch.Tensor  # [B] int32: the last c_b rows of each user are candidates
    max_len: int  # host-side: most rows of one user
    pages: Optional[PageTable] = None  # None: keys are the batch's own history rows

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1


def make_batch(rows: Sequence[int], num_candidates: Sequence[int], device,
               pages: Optional[PageTable] = None) -> Batch:
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.tensor(rows, dtype=torch.int32), 0)
    return Batch(offsets=offsets.to(device),
                 num_candidates=torch.tensor(list(num_candidates), dtype=torch.int32, device=device),
                 max_len=max(rows, default=0), pages=pages)


def row_to_user(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """User index of every row; searchsorted keeps it free of host syncs."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)
