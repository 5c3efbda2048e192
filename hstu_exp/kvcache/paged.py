"""Paged KV cache (docs/design.md §3): one preallocated pool, per-user page lists, user-level LRU.

The pool is `[layers, pages, 2 (K, V), page_size, heads, head_dim]` in the model dtype and holds
the post-SiLU K and V of history tokens. Page bookkeeping is host-side Python; what the kernels
see is a `PageTable` of device tensors built once per batch (one host->device copy).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np
import torch

from hstu_exp.model.jagged import PageTable, to_device


class CacheFullError(RuntimeError):
    """The pool cannot hold the batch even after evicting every user outside it."""


@dataclass
class UserPages:
    pages: List[int] = field(default_factory=list)
    length: int = 0  # history tokens held


class PagedKVCache:
    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        self.page_size, self.num_pages = page_size, num_pages
        self.device = torch.device(device)
        # One page more than the free list hands out: a scratch page that padded appends
        # (CUDA-graph buckets) may write into without touching any user's keys.
        self.pool = torch.zeros(num_layers, num_pages + 1, 2, page_size, num_heads, head_dim,
                                dtype=dtype, device=device)
        self.scratch_page = num_pages
        self.users: "OrderedDict[int, UserPages]" = OrderedDict()  # least recent first
        self.reset()

    def reset(self) -> None:
        """Forget every user (the pool is reused as is: stale pages are never read)."""
        self.free: List[int] = list(range(self.num_pages - 1, -1, -1))  # pop(): low ids first
        self.users.clear()
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def cached_length(self, user: int) -> int:
        entry = self.users.get(user)
        return entry.length if entry else 0

    def drop(self, user: int) -> None:
        entry = self.users.pop(user, None)
        if entry:
            self.free.extend(reversed(entry.pages))

    def evict(self, user: int) -> None:
        """Forget a user to free its pages (a host tier overrides this to keep them)."""
        self.evictions += 1
        self.drop(user)

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def plan(self, users: Sequence[int], new_history: Sequence[int],
             num_candidates: Sequence[int]) -> PageTable:
        """Reserve room for each user's new history tokens after what is cached, and describe
        where every key of the batch lives. Rows are laid out `[new history | candidates]`."""
        if len(set(users)) != len(users):
            raise ValueError(f"a batch holds each user once, got {list(users)}")
        for user in users:  # touch first, so the batch's own users are the last to go
            self.users.setdefault(user, UserPages())
            self.users.move_to_end(user)
        batch = set(users)
        need = sum(max(0, self._pages_for(self.users[u].length + n) - len(self.users[u].pages))
                   for u, n in zip(users, new_history))
        while len(self.free) < need:
            victim = next((u for u in self.users if u not in batch), None)
            if victim is None:
                raise CacheFullError(
                    f"KV pool of {self.num_pages} pages x {self.page_size} tokens cannot hold "
                    f"this batch ({need} new pages needed, {len(self.free)} free, nothing to evict)")
            self.evict(victim)

        # Host-side numpy, vectorised per user; one copy to the device at the end.
        size = self.page_size
        indptr, ids, cached, last = [0], [], [], []
        new_rows, new_page, new_slot = [], [], []
        row = 0
        for user, n, c in zip(users, new_history, num_candidates):
            entry = self.users[user]
            start = entry.length
            while len(entry.pages) < self._pages_for(start + n):
                entry.pages.append(self.free.pop())
            positions = np.arange(start, start + n)
            touched = np.asarray(entry.pages[start // size:], dtype=np.int64)  # pages written
            new_rows.append(np.arange(row, row + n))
            new_page.append(touched[positions // size - start // size])
            new_slot.append(positions % size)
            entry.length = start + n
            cached.append(start)
            last.append(entry.length - (len(entry.pages) - 1) * size if entry.pages else 0)
            ids.extend(entry.pages)
            indptr.append(len(ids))
            row += n + c

        host = {"page_indptr": np.asarray(indptr, dtype=np.int32),
                "page_ids": np.asarray(ids, dtype=np.int32),
                "cached_lengths": np.asarray(cached, dtype=np.int32),
                "last_page_len": np.asarray(last, dtype=np.int32),
                "new_rows": _cat(new_rows), "new_page": _cat(new_page), "new_slot": _cat(new_slot)}
        return PageTable(**to_device(host, self.device), host=host,
                         max_kv_len=max((self.users[u].length for u in users), default=0))


def _cat(parts: List[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)
