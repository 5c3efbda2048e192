"""Paged KV cache (docs/design.md §3): one preallocated pool, per-user page lists, user-level LRU.

The pool is `[layers, pages, 2 (K, V), page_size, heads, head_dim]` in the model dtype and holds
the post-SiLU K and V of history tokens; with fp8=True (cache.dtype=fp8) it is e4m3, and a float32
`scales` tensor `[layers, pages, 2, page_size, heads]` pages with it (same page ids: one token-head
scale, ops/fp8.py says why). `kv` is what the block and kernels take: the pool, or both as
`Fp8Pages`. Page bookkeeping is host-side: the LRU order is a dict,
every page list and the free list are numpy arrays, and `plan` computes a batch's page table
with a fixed number of numpy calls over the whole batch (Python passes over its users for the
dict lookups and sizes; the users' page lists grow as slices of the batch's). What the kernels see
is a `PageTable`, uploaded in one host->device copy, or kept on the host for the caller to
upload with the rest of a step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Sequence

import numpy as np
import torch

from hstu_exp.core.jagged import PageTable, per_user
from hstu_exp.core.paging import pages_for
from hstu_exp.ops.fp8 import E4M3, Fp8Pages


class CacheFullError(RuntimeError):
    """The pool cannot hold the batch even after evicting every user outside it."""


def _no_pages() -> np.ndarray:
    return np.zeros(0, np.int32)


@dataclass
class UserPages:
    pages: np.ndarray = field(default_factory=_no_pages)  # int32 page ids, in token order
    length: int = 0  # history tokens held


class PagedKVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        fp8: bool = False,
    ):
        self.page_size, self.num_pages = page_size, num_pages
        self.device = torch.device(device)
        # One page more than the free list hands out: a scratch page that padded appends
        # (CUDA-graph buckets) may write into without touching any user's keys.
        shape = (num_layers, num_pages + 1, 2, page_size, num_heads)
        self.pool = torch.zeros(*shape, head_dim, dtype=E4M3 if fp8 else dtype, device=device)
        self.scales = torch.zeros(shape, dtype=torch.float32, device=device) if fp8 else None
        self.kv = Fp8Pages(self.pool, self.scales) if fp8 else self.pool
        self.scratch_page = num_pages
        self.users: "OrderedDict[int, UserPages]" = OrderedDict()  # least recent first
        self.reset()

    def reset(self) -> None:
        """Forget every user (the pool is reused as is: stale pages are never read)."""
        # A stack of free page ids, top at the end: low ids are handed out first.
        self.free = np.arange(self.num_pages - 1, -1, -1, dtype=np.int32)
        self.users.clear()
        self.evictions = 0

    @property
    def fp8(self) -> bool:
        return self.scales is not None

    @property
    def nbytes(self) -> int:
        """The pool's bytes, its scales included."""
        return sum(t.numel() * t.element_size() for t in (self.pool, self.scales) if t is not None)

    @property
    def token_bytes(self) -> int:
        """Bytes one history token takes in the pool: K and V of every layer and head (and
        their scales)."""
        return self.nbytes // (self.pool.shape[1] * self.page_size)

    def capacity(self, user_tokens: int) -> dict:
        """What the record says of the pool: its K/V dtype, pages, bytes (scales included),
        bytes per history token (K and V of every layer and head) and how many users of
        `user_tokens` cached tokens it holds at once."""
        return {
            "kv_dtype": "fp8" if self.fp8 else str(self.pool.dtype).removeprefix("torch."),
            "kv_pool_pages": self.num_pages,
            "kv_pool_bytes": self.nbytes,
            "kv_token_bytes": self.token_bytes,
            "kv_pool_users": self.num_pages // max(1, self._pages_for(user_tokens)),
        }

    def cached_length(self, user: int) -> int:
        entry = self.users.get(user)
        return entry.length if entry else 0

    def take(self, count: int) -> np.ndarray:
        """`count` free pages, low ids first (the caller has made room)."""
        taken = self.free[len(self.free) - count :][::-1]
        self.free = self.free[: len(self.free) - count]
        return taken

    def give_back(self, pages: np.ndarray) -> None:
        """Pages back to the free list; the first of them is the next handed out."""
        self.free = np.concatenate([self.free, np.asarray(pages, np.int32)[::-1]])

    def drop(self, user: int) -> None:
        entry = self.users.pop(user, None)
        if entry:
            self.give_back(entry.pages)

    def evict(self, user: int) -> None:
        """Forget a user to free its pages (a host tier overrides this to keep them)."""
        self.evictions += 1
        self.drop(user)

    def _pages_for(self, tokens: int) -> int:
        return pages_for(tokens, self.page_size)

    def plan(
        self,
        users: Sequence[int],
        new_history: Sequence[int],
        num_candidates: Sequence[int],
        *,
        upload: bool = True,
    ) -> PageTable:
        """Reserve room for each user's new history tokens after what is cached, and describe
        where every key of the batch lives. Rows are laid out `[new history | candidates]`.
        upload=False: the table's host arrays only (`PageTable.host`), for one copy later."""
        if len(set(users)) != len(users):
            raise ValueError(f"a batch holds each user once, got {list(users)}")
        for user in users:  # touch first, so the batch's own users are the last to go
            if user in self.users:
                self.users.move_to_end(user)
            else:
                self.users[user] = UserPages()
        entries = [self.users[u] for u in users]
        size = self.page_size
        n, c = [int(k) for k in new_history], [int(k) for k in num_candidates]
        # new pages per user
        grow = [max(0, -(-(e.length + k) // size) - e.pages.size) for e, k in zip(entries, n)]
        need = sum(grow)
        batch = set(users)
        while len(self.free) < need:
            victim = next((u for u in self.users if u not in batch), None)
            if victim is None:
                raise CacheFullError(
                    f"KV pool of {self.num_pages} pages x {self.page_size} tokens cannot hold "
                    f"this batch ({need} new pages needed, {len(self.free)} free, nothing to evict)"
                )
            self.evict(victim)
        return self._table(entries, n, c, grow, upload)

    def _table(self, entries, n, c, grow, upload: bool) -> PageTable:
        """The batch's page table (room for `grow` is there): per-user sizes as Python ints (a
        batch has a few users), per-token arrays with a fixed number of numpy calls whatever
        the batch size (each costs about a microsecond)."""
        size = self.page_size
        fresh, at, pieces = self.take(sum(grow)), 0, []
        for e, k in zip(entries, grow):  # each user's pages, then its new ones
            pieces += [e.pages, fresh[at : at + k]]
            at += k
        ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        start = [e.length for e in entries]
        end = [s + k for s, k in zip(start, n)]
        pages_before = list(accumulate((e.pages.size + k for e, k in zip(entries, grow)), initial=0))
        # Each user's page list becomes its slice of the batch's (no copy per user).
        for u, (e, length) in enumerate(zip(entries, end)):
            e.pages, e.length = ids[pages_before[u] : pages_before[u + 1]], length
        last = [e - (p - 1) * size if p > 0 else 0 for e, p in zip(end, (u.pages.size for u in entries))]
        rows_before = list(accumulate((k + m for k, m in zip(n, c)), initial=0))
        tokens_before = list(accumulate(n, initial=0))
        # New token k of the batch (user u's) is at position start_u + k - tokens_before_u of
        # u's sequence and in row rows_before_u + k - tokens_before_u (rows of a user are [new
        # history | candidates], users back to back). Counted from the start of u's first page
        # in the batch's page list, that position is `at`: its page is ids[at // size], its
        # slot at % size.
        k = np.arange(tokens_before[-1])
        at = k + per_user(
            [p * size + s - t for p, s, t in zip(pages_before[:-1], start, tokens_before)], n
        )
        host = {
            "page_indptr": np.array(pages_before, np.int32),
            "page_ids": ids,
            "cached_lengths": np.array(start, np.int32),
            "last_page_len": np.array(last, np.int32),
            "new_rows": k + per_user([r - t for r, t in zip(rows_before[:-1], tokens_before)], n),
            "new_page": ids[at // size].astype(np.int64),
            "new_slot": at % size,
        }
        table = PageTable(host=host, max_kv_len=max(end, default=0))
        return table.upload(self.device) if upload else table
