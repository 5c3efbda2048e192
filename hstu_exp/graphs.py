"""CUDA graphs for the block forward (docs/design.md §4), and for a whole ranking step (e2e).

One graph per bucket (batch, tokens per user, in paged mode kv tokens per user, and the batch's
rows), captured on first use into one shared memory pool and kept for every later batch that
fits; a server captures every bucket a batch can fall in before its timed run
(`GraphedRanker.capture_all`, from synthetic full batches: `core/buckets.py` lists them). A
batch is padded to its bucket: extra users have length 0, rows past the last user are dead
(computed on, never read), padded K/V appends go to the cache's scratch page. The rows are batch x
tokens, or with `fit_rows` the smallest power of two holding the batch's: in a served batch one
long history beside seven short ones makes every user's rows as long as the longest, and the dead
rows cost the GEMMs several times the live work (fit_rows trades that for more buckets).
Metadata is padded on the host and travels as one packed buffer, so a replay is: copy x, copy one
host buffer, replay.

`BucketGraphs` is that mechanism; two thin front-ends use it. `GraphedBlock` replays the block
alone (workload=block). `GraphedRanker` replays the device part of a ranking step (embeddings,
block, candidate rows, heads: `ranking.forward_rows`) with the token ids padded too; at batch 1
the embedding and head launches cost the host about as much as the whole block.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from hstu_exp import first_use
from hstu_exp.core.buckets import (
    Bucket,
    all_buckets,
    fit_rows,
    kv_bucket,
    smallest,
    user_rows_at_least,
)
from hstu_exp.core.jagged import Batch, Layout, PageTable, layout_of, make_batch, unpack


@dataclass
class Staged:
    """A batch's metadata padded to its bucket, packed in one host buffer (pinned on CUDA):
    a replay copies it into the captured graph's buffer with one non_blocking copy."""

    bucket: Bucket
    rows: int
    host: torch.Tensor  # uint8, `pack`ed
    layout: Layout
    candidates: int = 0  # GraphedRanker: live candidate rows (the head outputs to keep)


# A padded field of a step's staged metadata, or one piece of it: (field, first element, live
# values, padded length, fill). The live values go first, then the fill up to the padded length.
# The fill is the bucket's own, the same for every batch of it (a staged buffer starts as a copy
# of the bucket's template, which holds the fills); what changes from batch to batch is live.
Part = Tuple[str, int, np.ndarray, int, object]

_NONE = np.zeros(0, np.int64)


def write_parts(parts: List[Part], out: Dict[str, Tuple[np.ndarray, int]], *, fill=True) -> None:
    """Each part's live values (and with `fill` its fill) into its field: `out[field]` is (an
    array, the field's first element in it). The one place padding is written: `padded` makes
    arrays of it; `BucketGraphs.stage` writes the live values straight into the packed buffer,
    a copy of the bucket's template (no padded copies, no packing, no fills: each numpy call
    costs the host about a microsecond)."""
    for name, at, live, size, pad in parts:
        field, first = out[name]
        k, at = live.size, first + at
        if k > size:
            raise ValueError(f"graph staging: {k} values of {name} in a bucket that holds {size}")
        if k:
            field[at : at + k] = live
        if fill and k < size:
            field[at + k : at + size] = pad


def extended(a: np.ndarray, n: int) -> np.ndarray:
    """`a` followed by copies of its last value up to `n` values (extra users of a bucket: no
    rows, no pages); `a` itself when it has `n` or more."""
    if a.size >= n:
        return a
    out = np.empty(n, a.dtype)
    out[: a.size], out[a.size :] = a, a[-1]
    return out


def fields_of(parts: List[Part]) -> List[Tuple[str, np.dtype, int]]:
    """(field, dtype, length) of the padded fields, in the order they first appear (a field's
    dtype is its first part's)."""
    fields: Dict[str, Tuple[np.dtype, int]] = {}
    for name, at, live, size, _ in parts:
        dtype, n = fields.get(name, (live.dtype, 0))
        fields[name] = (dtype, max(n, at + size))
    return [(name, dtype, n) for name, (dtype, n) in fields.items()]


def padded(parts: List[Part]) -> Dict[str, np.ndarray]:
    """The padded fields of `parts` as arrays of their own."""
    out = {name: np.empty(n, dtype) for name, dtype, n in fields_of(parts)}
    write_parts(parts, {name: (a, 0) for name, a in out.items()})
    return out


def metadata_parts(
    batch: Batch, bucket: Bucket, *, pages_per_user: int, scratch_page: int
) -> List[Part]:
    """The parts of the batch's metadata (its host arrays) padded to the bucket. Extra users
    have length 0 (offsets and page_indptr repeat their last value, no candidates, no cached
    keys); page ids and K/V appends past the batch's own go to the scratch page."""
    if batch.host is None or (bucket.kv and batch.pages.host is None):
        raise ValueError(
            "graph staging needs the host-side metadata of `make_batch` and `PagedKVCache.plan`"
        )
    b, h = bucket.batch, batch.host
    parts = [
        ("offsets", 0, extended(h["offsets"], b + 1), b + 1, 0),
        ("num_candidates", 0, h["num_candidates"], b, 0),
    ]
    if bucket.kv:
        p = batch.pages.host
        parts += [
            ("page_indptr", 0, extended(p["page_indptr"], b + 1), b + 1, 0),
            ("cached_lengths", 0, p["cached_lengths"], b, 0),
            ("last_page_len", 0, p["last_page_len"], b, 0),
            ("page_ids", 0, p["page_ids"], b * pages_per_user, scratch_page),
            ("new_rows", 0, p["new_rows"], bucket.rows, 0),
            ("new_page", 0, p["new_page"], bucket.rows, scratch_page),
            ("new_slot", 0, p["new_slot"], bucket.rows, 0),
        ]
    return parts


def pad_metadata(
    batch: Batch, bucket: Bucket, *, pages_per_user: int, scratch_page: int
) -> Dict[str, np.ndarray]:
    """`metadata_parts` as arrays."""
    return padded(
        metadata_parts(batch, bucket, pages_per_user=pages_per_user, scratch_page=scratch_page)
    )


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


def token_parts(tokens, bucket: Bucket) -> List[Part]:
    """A batch's token ids and rows (`Tokens.host`) padded to fixed sizes per bucket, so one
    captured embedding forward serves every batch of the bucket. Each KJT key holds bucket.rows
    values (no key can have more); the padding values belong to one extra, padding user, look up
    id 0 and land in a spare row (index bucket.rows) that the block never sees. Candidate rows
    are padded with row 0: their head outputs are computed and dropped."""
    h, cap, b = tokens.host, bucket.rows, bucket.batch
    pad_user = np.array([cap - v.size for v in h["values"]], np.int64)  # its length, per key
    parts = []
    for k, (v, d, n) in enumerate(zip(h["values"], h["dest"], h["lengths"])):
        parts += [
            ("tok_values", k * cap, v, cap, 0),
            ("tok_dest", k * cap, d, cap, cap),
            ("tok_lengths", k * (b + 1), n, b, 0),
            ("tok_lengths", k * (b + 1) + b, pad_user[k : k + 1], 1, 0),
        ]
    return parts + [
        ("tok_positions", 0, h["positions"], cap + 1, 0),
        ("tok_candidate_rows", 0, h["candidate_rows"], cap, 0),
    ]


def pad_tokens(tokens, bucket: Bucket) -> Dict[str, np.ndarray]:
    """`token_parts` as arrays."""
    return padded(token_parts(tokens, bucket))


def static_batch(bucket: Bucket, views: dict) -> Batch:
    """`Batch` (and `PageTable`) over a graph's static buffers (the views of `pad_metadata`)."""
    pages = None
    if bucket.kv:
        pages = PageTable(
            page_indptr=views["page_indptr"],
            page_ids=views["page_ids"],
            cached_lengths=views["cached_lengths"],
            last_page_len=views["last_page_len"],
            new_rows=views["new_rows"],
            new_page=views["new_page"],
            new_slot=views["new_slot"],
            max_kv_len=bucket.kv,
        )
    return Batch(
        offsets=views["offsets"],
        num_candidates=views["num_candidates"],
        max_len=bucket.tokens,
        pages=pages,
    )


def static_tokens(views: dict, keys, bucket: Bucket):
    """`Tokens` over a graph's static buffers (the views of `pad_tokens`' fields)."""
    from torchrec import KeyedJaggedTensor

    from hstu_exp.model.embeddings import Tokens

    features = KeyedJaggedTensor(
        keys=list(keys),
        values=views["tok_values"],
        lengths=views["tok_lengths"],
        stride=bucket.batch + 1,
        length_per_key=[bucket.rows] * len(keys),
    )
    return Tokens(
        features=features,
        dest=views["tok_dest"],
        positions=views["tok_positions"],
        candidate_rows=views["tok_candidate_rows"],
        rows=[],
        num_candidates=[],
        num_rows=bucket.rows,
    )


def _synthetic_rows(core: "BucketGraphs", bucket: Bucket) -> list:
    """Rows per user of `BucketGraphs.synthetic`: the batch holds the most rows the bucket
    allows (bucket.rows, or what its users' candidates and KV allow), its first user more than
    the token bucket below holds, and more users than the batch bucket below holds."""
    t_prev = max([t for t in core.token_buckets if t < bucket.tokens], default=0)
    b_prev = max([b for b in core.batch_buckets if b < bucket.batch], default=0)
    per_user = bucket.tokens
    if core.max_candidates:
        per_user = min(per_user, (bucket.kv or core.max_history) + core.max_candidates)
    least = user_rows_at_least(core.page_size if bucket.kv else 0, core.num_context)
    total = min(bucket.rows, bucket.batch * per_user)
    first = min(per_user, total - b_prev * least)
    if first <= t_prev:
        raise ValueError(f"graph bucket {bucket.name}: no batch of valid requests falls in it")
    rest = total - first
    others = min(bucket.batch - 1, rest // least)
    return [first] + [rest // others + (i < rest % others) for i in range(others)]


def _synthetic_table(core: "BucketGraphs", bucket: Bucket, rows, starts, candidates) -> PageTable:
    """The page table of `BucketGraphs.synthetic`'s batch, laid out as `PagedKVCache.plan` lays
    out a real one (every user bucket.kv keys after the batch)."""
    size, kv = core.page_size, bucket.kv
    n = np.asarray(rows, np.int64) - np.asarray(candidates, np.int64)  # new history per user
    start = np.asarray(starts, np.int64)
    pages = -(-kv // size)
    indptr = np.arange(len(rows) + 1, dtype=np.int32) * pages
    # Distinct pages, as a real batch reads (one page read over and over would sit in L2 and
    # flatter the tuner's timings); scratch_page is the pool's page count.
    ids = (np.arange(len(rows) * pages) % max(core.scratch, 1)).astype(np.int32)
    row0 = np.zeros(len(rows), np.int64)
    np.cumsum(np.asarray(rows, np.int64)[:-1], out=row0[1:])
    user = np.repeat(np.arange(len(rows)), n)
    j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    host = {
        "page_indptr": indptr,
        "page_ids": ids,
        "cached_lengths": start.astype(np.int32),
        "last_page_len": np.full(len(rows), kv - (pages - 1) * size, np.int32),
        "new_rows": row0[user] + j,
        "new_page": np.full(int(n.sum()), core.scratch, np.int64),
        "new_slot": (start[user] + j) % size,
    }
    return PageTable(host=host, max_kv_len=kv)


def _template(parts: List[Part]):
    """(layout, template, places, dtypes) of a bucket's staged buffer: the packed layout of the
    parts' fields, a buffer holding every part's fill (zeros between fields), each field's
    (dtype, first element in the buffer viewed as that dtype) and the dtypes."""
    layout, size = layout_of(fields_of(parts))
    places = {name: (dtype, at // dtype.itemsize) for name, (at, dtype, _) in layout.items()}
    template = np.zeros(size, np.uint8)
    views = {name: (template.view(dtype), first) for name, (dtype, first) in places.items()}
    write_parts([(name, at, _NONE, size, pad) for name, at, _, size, pad in parts], views)
    return layout, template, places, {dtype for dtype, _ in places.values()}


class _Captured:
    def __init__(self, meta, inputs, out, graph):
        # meta: the packed metadata on the device; inputs: static tensors a step copies into
        self.meta, self.inputs, self.out, self.graph = meta, inputs, out, graph


class BucketGraphs:
    """The core of both graph runners: the buckets, metadata padding, one memory pool, and one
    graph per bucket, captured on first use. `pool` is the KV pool (None in full mode).

    Captures are timed as first-use work (`hstu_exp.first_use`: a server that meets a bucket
    mid-run keeps its capture off the batch's clock) and summed in `capture_s`. `live_rows` and
    `run_rows` count the rows staged and the rows their graphs compute (padding included).

    `max_history` is the longest KV a user holds: context prefix and history together (a user's
    page table is padded to that many tokens' pages). At most `max_graphs` graphs are kept:
    each holds its activations in the pool, and serving meets ever more buckets; past that the
    least recently replayed is dropped (`evicted` counts them) and recaptured if met again.
    `buckets()` lists every bucket a batch can fall in (`max_candidates`, a request's most, and
    `num_context` rule some out); a server captures them all at start-up (`GraphedRanker.
    capture_all`)."""

    def __init__(
        self,
        *,
        device,
        batch_buckets,
        token_buckets,
        pool: Optional[torch.Tensor] = None,
        page_size: int = 0,
        max_history: int = 0,
        scratch_page: int = 0,
        fit_rows: bool = False,
        max_graphs: int = 64,
        max_candidates: int = 0,
        num_context: int = 0,
        progress=None,
    ):
        self.device, self.pool = torch.device(device), pool
        self.pin = self.device.type == "cuda"  # staged buffers in pinned memory
        self.max_candidates, self.num_context = max_candidates, num_context
        self.batch_buckets, self.token_buckets = list(batch_buckets), list(token_buckets)
        self.fit_rows = fit_rows
        self.page_size, self.max_history, self.scratch = page_size, max_history, scratch_page
        self.pages_per_user = -(-max_history // page_size) if page_size else 0
        self.mempool = None  # the graphs' shared memory pool, made at the first capture
        self.graphs: "OrderedDict[Bucket, _Captured]" = OrderedDict()  # least recent first
        self.layouts: Dict[Bucket, tuple] = {}  # the staged buffer's, per bucket
        self.max_graphs, self.evicted = max_graphs, 0
        self.used: set = set()  # bucket names replayed (a workload clears it per point)
        self.capture_s = 0.0
        self.live_rows = self.run_rows = 0
        self.progress = progress or (lambda msg: None)
        self._bucket = lru_cache(maxsize=4096)(self._bucket_of)

    def bucket_for(self, batch: Batch) -> Bucket:
        kv = batch.pages.max_kv_len if batch.pages is not None else None
        rows = None
        if self.fit_rows and batch.host is not None:
            rows = int(batch.host["offsets"][-1])
        return self._bucket(batch.batch_size, batch.max_len, kv, rows)

    def _bucket_of(self, batch_size: int, max_len: int, kv_len: Optional[int], rows):
        """The bucket of a batch of these sizes (kv_len None: full mode; rows: its rows, or None
        without fit_rows). `_bucket` remembers the answers (a few microseconds a step)."""
        b = smallest(self.batch_buckets, batch_size, "graph.batch_buckets")
        t = smallest(self.token_buckets, max_len, "graph.token_buckets")
        kv = 0 if kv_len is None else kv_bucket(kv_len, self.page_size, self.max_history)
        fit = 0 if rows is None else fit_rows(rows, min(self.token_buckets), b * t)
        return Bucket(b, t, kv, fit)

    def buckets(self) -> list:
        """Every bucket `bucket_for` can return (`core.buckets.all_buckets`), smallest first."""
        return all_buckets(
            batch_buckets=self.batch_buckets,
            token_buckets=self.token_buckets,
            page_size=self.page_size if self.pool is not None else 0,
            max_history=self.max_history,
            fit=self.fit_rows,
            max_candidates=self.max_candidates,
            num_context=self.num_context,
        )

    def synthetic(self, bucket: Bucket):
        """A batch of the bucket as full as one can be, for a capture before any request came:
        (requests, cached prefix per request, PageTable with host arrays or None). Every user
        has the most rows the bucket allows (the most candidates, the rest new history), every
        user's KV is bucket.kv keys long, so the tuner of a capture's first call times the
        work a real batch of the bucket brings. Its keys are read from pool pages in turn
        (other users' memory, only read); its appends go to the scratch page. Token ids are 0."""
        from hstu_exp.data.synthetic import ACTION, CONTEXT, ITEM, Request

        rows = _synthetic_rows(self, bucket)
        users, starts = [], []
        ctx, most = self.num_context, self.max_candidates or bucket.tokens
        for user, r in enumerate(rows):
            new = max(r - most, ctx if not bucket.kv else 0)
            seq = bucket.kv if bucket.kv else new
            kinds = torch.full((seq,), ITEM, dtype=torch.int64)
            kinds[:ctx] = CONTEXT
            kinds[ctx + 1 :: 2] = ACTION  # items and actions in turn, as interleave() lays them out
            zeros = torch.zeros(seq, dtype=torch.int64)
            cands = torch.zeros(r - new, dtype=torch.int64)
            users.append(
                Request(user=-1 - user, kinds=kinds, ids=zeros, candidates=cands, num_context=ctx)
            )
            starts.append(seq - new)
        table = None
        if bucket.kv:
            table = _synthetic_table(self, bucket, rows, starts, [r.candidates.numel() for r in users])
        return users, starts, table

    def parts(self, batch: Batch, bucket: Bucket) -> List[Part]:
        return metadata_parts(
            batch, bucket, pages_per_user=self.pages_per_user, scratch_page=self.scratch
        )

    def pad(self, batch: Batch, bucket: Bucket) -> Dict[str, np.ndarray]:
        return padded(self.parts(batch, bucket))

    def stage(self, parts: List[Part], bucket: Bucket, rows: int, candidates: int = 0) -> Staged:
        """The parts' live values written straight into one new buffer (pinned on CUDA) that
        starts as a copy of the bucket's template: laid out as every batch of the bucket is,
        its fills in place (both made once a bucket); no device work."""
        known = self.layouts.get(bucket)
        if known is None:
            known = self.layouts[bucket] = _template(parts)
        layout, template, places, dtypes = known
        # The caching host allocator keeps a pinned block alive until the copy that reads it
        # is done, so each step writes a buffer of its own (no wait on the previous replay).
        host = torch.empty(template.size, dtype=torch.uint8, pin_memory=self.pin)
        raw = host.numpy()
        raw[:] = template
        typed = {dtype: raw.view(dtype) for dtype in dtypes}
        out = {name: (typed[dtype], first) for name, (dtype, first) in places.items()}
        write_parts(parts, out, fill=False)
        self.live_rows, self.run_rows = self.live_rows + rows, self.run_rows + bucket.rows
        return Staged(bucket, rows, host, layout, candidates)

    @torch.no_grad()
    def get_or_capture(self, staged: Staged, build, what: str) -> _Captured:
        """The bucket's graph; on a miss, `build(views, batch, bucket)` over the bucket's
        static buffers returns (the step to capture, its static input tensors)."""
        cap = self.graphs.get(staged.bucket)
        if cap is not None:
            self.graphs.move_to_end(staged.bucket)
        if cap is None:
            bucket = staged.bucket
            self.progress(f"capturing CUDA graph of {what} for bucket {bucket.name}")
            before = first_use.seconds()
            with first_use.first_use():
                if self.mempool is None:
                    self.mempool = torch.cuda.graph_pool_handle()
                meta = staged.host.to(self.device)
                views = unpack(meta, staged.layout)
                if bucket.kv:  # warm-up and capture append into the scratch page, not users'
                    views["new_page"].fill_(self.scratch)
                step, inputs = build(views, static_batch(bucket, views), bucket)
                graph, out = capture(step, self.mempool)
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
                self.evicted += 1
            cap = self.graphs[bucket] = _Captured(meta, inputs, out, graph)
            self.capture_s += first_use.seconds() - before
        self.used.add(staged.bucket.name)
        return cap

    def replay(self, cap: _Captured, staged: Staged) -> None:
        # Same bucket, same layout: one non_blocking copy from pinned memory, ordered on the
        # stream after the previous replay that read this buffer (no host sync).
        cap.meta.copy_(staged.host, non_blocking=True)
        cap.graph.replay()


class GraphedBlock:
    """Replays captured forwards of an HSTU block, one per bucket of `core`."""

    def __init__(self, block, core: BucketGraphs, *, hidden: int, dtype: torch.dtype):
        self.block, self.core, self.hidden, self.dtype = block, core, hidden, dtype

    def stage(self, batch: Batch, rows: int) -> Staged:
        bucket = self.core.bucket_for(batch)
        return self.core.stage(self.core.parts(batch, bucket), bucket, rows)

    def _build(self, views, batch: Batch, bucket: Bucket):
        x = torch.zeros(bucket.rows, self.hidden, dtype=self.dtype, device=self.core.device)
        return (lambda: self.block(x, batch, self.core.pool)), x

    def replay(self, x: torch.Tensor, staged: Staged) -> torch.Tensor:
        cap = self.core.get_or_capture(staged, self._build, "the block")
        cap.inputs[: staged.rows].copy_(x)
        self.core.replay(cap, staged)
        return cap.out[: staged.rows]


class GraphedRanker:
    """Replays captured `forward_rows(model, ...)` (embeddings -> block -> heads) per bucket of
    `core`: a step is host bookkeeping, one packed copy and one replay."""

    def __init__(self, model, core: BucketGraphs):
        self.model, self.core = model, core

    def stage_step(self, tokens, batch: Batch) -> Staged:
        bucket = self.core.bucket_for(batch)
        parts = self.core.parts(batch, bucket) + token_parts(tokens, bucket)
        return self.core.stage(
            parts, bucket, tokens.num_rows, candidates=int(tokens.host["candidate_rows"].size)
        )

    def _build(self, views, batch: Batch, bucket: Bucket):
        from hstu_exp.model.ranking import forward_rows

        tokens = static_tokens(views, self.model.embeddings.keys, bucket)
        return (lambda: forward_rows(self.model, tokens, batch, self.core.pool)), None

    def synthetic_step(self, bucket: Bucket):
        """(tokens, batch) of `core.synthetic(bucket)` on the host, made as a real step's are
        (`make_tokens`, `make_batch`), so its staged arrays are laid out as a real batch's."""
        requests, starts, table = self.core.synthetic(bucket)
        tokens = self.model.embeddings.tokens(requests, starts, self.core.device, upload=False)
        batch = make_batch(tokens.rows, tokens.num_candidates, self.core.device, table, upload=False)
        if self.core.bucket_for(batch) != bucket:
            raise AssertionError(
                f"synthetic batch of {bucket.name} falls in {self.core.bucket_for(batch)}"
            )
        return tokens, batch

    def capture_all(self, progress=None) -> int:
        """Captures every bucket of `core.buckets()` not captured yet, each from a synthetic
        full batch (its autotune times real-sized work); returns how many it captured. The
        run's statistics (buckets used, rows staged) are left as they were."""
        core, say = self.core, progress or (lambda msg: None)
        todo = [b for b in core.buckets() if b not in core.graphs]
        if len(core.graphs) + len(todo) > core.max_graphs:
            raise ValueError(
                f"graph.max_graphs={core.max_graphs}: fewer than the "
                f"{len(core.graphs) + len(todo)} buckets a run can meet"
            )
        kept = (set(core.used), core.live_rows, core.run_rows, core.progress)
        core.progress = lambda msg: None  # one line per bucket would flood the console
        t0 = time.perf_counter()
        try:
            for i, bucket in enumerate(todo):
                tokens, batch = self.synthetic_step(bucket)
                core.get_or_capture(self.stage_step(tokens, batch), self._build, "the ranking step")
                if (i + 1) % 16 == 0 or i + 1 == len(todo):
                    say(
                        f"warm-up: captured {i + 1}/{len(todo)} graph buckets "
                        f"({time.perf_counter() - t0:.1f} s)"
                    )
        finally:
            core.used, core.live_rows, core.run_rows, core.progress = kept
        return len(todo)

    def run(self, staged: Staged):
        """(logits, candidate hidden states) of the staged batch, views of the graph's output."""
        cap = self.core.get_or_capture(staged, self._build, "the ranking step")
        self.core.replay(cap, staged)
        logits, h = cap.out
        return logits[: staged.candidates], h[: staged.candidates]
