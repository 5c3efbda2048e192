"""CUDA graphs for the block forward (DESIGN §4).

One graph per bucket (batch, tokens per user, and in paged mode kv tokens per user), captured on
first use into one shared memory pool and kept for every later batch that fits. A batch is padded
to its bucket: extra users have length 0, rows past the last user are dead (computed on, never
read), padded K/V appends go to the cache's scratch page. Metadata travels as two packed buffers
(int32 and int64), so a replay is: copy x, copy two buffers, replay.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from hstu_exp.model.jagged import Batch, PageTable


@dataclass(frozen=True)
class Bucket:
    batch: int
    tokens: int  # rows per user (new history + candidates)
    kv: int = 0  # history keys per user in paged mode (0: full mode)

    @property
    def name(self) -> str:
        return f"b{self.batch}xt{self.tokens}" + (f"xkv{self.kv}" if self.kv else "")

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


def _smallest(options: Sequence[int], need: int, key: str) -> int:
    options = sorted(options)
    i = bisect_left(options, need)
    if i == len(options):
        raise ValueError(f"{key}: no bucket holds {need} (largest is {options[-1]})")
    return options[i]


def _kv_bucket(need: int, page_size: int, limit: int) -> int:
    size = page_size
    while size < need:
        size *= 2
    return min(size, max(limit, need))


@dataclass
class Staged:
    """A batch laid out for one bucket, on the device, ready to be copied in at replay."""
    bucket: Bucket
    rows: int
    i32: torch.Tensor
    i64: torch.Tensor


class _Layout:
    """Field offsets inside the packed metadata buffers of a bucket."""

    def __init__(self, bucket: Bucket, pages_per_user: int):
        b, paged = bucket.batch, bucket.kv > 0
        sizes32 = {"offsets": b + 1, "num_candidates": b}
        if paged:
            sizes32.update(page_indptr=b + 1, cached_lengths=b, last_page_len=b,
                           page_ids=b * pages_per_user)
        sizes64 = {"new_rows": bucket.rows, "new_page": bucket.rows,
                   "new_slot": bucket.rows} if paged else {"unused": 1}
        self.fields32, self.n32 = self._offsets(sizes32)
        self.fields64, self.n64 = self._offsets(sizes64)

    @staticmethod
    def _offsets(sizes):
        out, at = {}, 0
        for name, n in sizes.items():
            out[name] = (at, at + n)
            at += n
        return out, at

    def views(self, i32: torch.Tensor, i64: torch.Tensor) -> dict:
        v = {k: i32[a:b] for k, (a, b) in self.fields32.items()}
        v.update({k: i64[a:b] for k, (a, b) in self.fields64.items()})
        return v


def _padded(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    """t followed by `fill` (a number or a 0-d device tensor: no host sync) up to length n."""
    out = t.new_empty(n)
    out[:t.numel()] = t
    out[t.numel():] = fill
    return out


def capture(fn, mempool=None):
    """Warm fn up on a side stream (kernel selection happens there), then capture one call.
    Returns (graph, output); graph.replay() refreshes the output in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=mempool):
        out = fn()
    return graph, out


class _Captured:
    def __init__(self, layout: _Layout, i32, i64, x, out, graph):
        self.layout, self.i32, self.i64, self.x, self.out, self.graph = \
            layout, i32, i64, x, out, graph


class GraphedBlock:
    """Replays captured forwards of `block`; `pool` is the KV pool (None for full mode)."""

    def __init__(self, block, *, hidden: int, dtype: torch.dtype, device, batch_buckets,
                 token_buckets, pool: Optional[torch.Tensor] = None, page_size: int = 0,
                 max_history: int = 0, scratch_page: int = 0, progress=None):
        self.block, self.pool = block, pool
        self.hidden, self.dtype, self.device = hidden, dtype, torch.device(device)
        self.batch_buckets, self.token_buckets = list(batch_buckets), list(token_buckets)
        self.page_size, self.max_history, self.scratch = page_size, max_history, scratch_page
        self.pages_per_user = -(-max_history // page_size) if page_size else 0
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: Dict[Bucket, _Captured] = {}
        self.progress = progress or (lambda msg: None)

    def bucket_for(self, batch: Batch) -> Bucket:
        b = _smallest(self.batch_buckets, batch.batch_size, "graph.batch_buckets")
        t = _smallest(self.token_buckets, batch.max_len, "graph.token_buckets")
        kv = 0
        if batch.pages is not None:
            kv = _kv_bucket(batch.pages.max_kv_len, self.page_size, self.max_history)
        return Bucket(b, t, kv)

    def stage(self, batch: Batch, rows: int) -> Staged:
        """Pad the batch's metadata to its bucket (device ops, no host sync)."""
        bucket = self.bucket_for(batch)
        layout = _Layout(bucket, self.pages_per_user)
        i32 = torch.zeros(layout.n32, dtype=torch.int32, device=self.device)
        i64 = torch.zeros(layout.n64, dtype=torch.int64, device=self.device)
        v = layout.views(i32, i64)
        b = bucket.batch
        v["offsets"].copy_(_padded(batch.offsets, b + 1, batch.offsets[-1]))
        v["num_candidates"].copy_(_padded(batch.num_candidates, b, 0))
        pt = batch.pages
        if pt is not None:
            v["page_indptr"].copy_(_padded(pt.page_indptr, b + 1, pt.page_indptr[-1]))
            v["cached_lengths"].copy_(_padded(pt.cached_lengths, b, 0))
            v["last_page_len"].copy_(_padded(pt.last_page_len, b, 0))
            v["page_ids"].copy_(_padded(pt.page_ids, v["page_ids"].numel(), self.scratch))
            v["new_rows"].copy_(_padded(pt.new_rows, bucket.rows, 0))
            v["new_page"].copy_(_padded(pt.new_page, bucket.rows, self.scratch))
            v["new_slot"].copy_(_padded(pt.new_slot, bucket.rows, 0))
        return Staged(bucket, rows, i32, i64)

    def _static_batch(self, bucket: Bucket, views: dict) -> Batch:
        pages = None
        if bucket.kv:
            pages = PageTable(page_indptr=views["page_indptr"], page_ids=views["page_ids"],
                              cached_lengths=views["cached_lengths"],
                              last_page_len=views["last_page_len"], new_rows=views["new_rows"],
                              new_page=views["new_page"], new_slot=views["new_slot"],
                              max_kv_len=bucket.kv)
        return Batch(offsets=views["offsets"], num_candidates=views["num_candidates"],
                     max_len=bucket.tokens, pages=pages)

    @torch.no_grad()
    def _capture(self, staged: Staged) -> _Captured:
        bucket = staged.bucket
        self.progress(f"capturing CUDA graph for bucket {bucket.name}")
        layout = _Layout(bucket, self.pages_per_user)
        i32, i64 = staged.i32.clone(), staged.i64.clone()
        if bucket.kv:  # warm-up and capture append into the scratch page, not a user's pages
            layout.views(i32, i64)["new_page"].fill_(self.scratch)
        x = torch.zeros(bucket.rows, self.hidden, dtype=self.dtype, device=self.device)
        batch = self._static_batch(bucket, layout.views(i32, i64))
        graph, out = capture(lambda: self.block(x, batch, self.pool), self.mempool)
        return _Captured(layout, i32, i64, x, out, graph)

    def replay(self, x: torch.Tensor, staged: Staged) -> torch.Tensor:
        cap = self.graphs.get(staged.bucket)
        if cap is None:
            cap = self.graphs[staged.bucket] = self._capture(staged)
        cap.x[:staged.rows].copy_(x)
        cap.i32.copy_(staged.i32)
        cap.i64.copy_(staged.i64)
        cap.graph.replay()
        return cap.out[:staged.rows]
