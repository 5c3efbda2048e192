"""The request path of a ranking server, one module above the model, the KV-cache manager and
the graph runners (docs/design.md §1.1, §2):

    lookup -> plan pages (offload / evict to make room) -> onload -> embeddings -> block -> heads

`RequestPath.serve` runs it for one batch of requests and says, per request, where its cached prefix
came from (the tier: GPU pool, host tier, or a miss), how many tokens it computed and the bytes
its batch moved. Both e2e (offline batches) and serve (an open-loop request stream) call it; the
model (`model/ranking.py`) only computes rows and never drives the cache manager.

Nothing here waits for the device: a step's metadata (page table, rows, token ids) is built on
the host and reaches the device in one non_blocking copy from pinned memory (with graphs: the
bucket's one packed copy), so the host prepares a batch while the device may still run the
previous one. The cache manager records the batch's fingerprints after the launch. Each
`Served` says how long the host took to issue the batch (`host_ms`) and how long its compute
took on the device (`device_ms`). Callers that time a batch synchronize themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from hstu_exp.core.jagged import make_batch, upload_step
from hstu_exp.data.synthetic import Request
from hstu_exp.model.ranking import HSTURanker, forward_rows, phase

TIERS = ("gpu", "host", "miss")  # where a request's cached prefix came from
# The request path's host work in order: lookup and page planning; token rows and batch
# metadata; staging them (graphs: the bucket's pinned buffer; eager: the upload); onloads from
# the host tier (graphs: all layers' before the replay; eager: inside the launch); the launch
# (graph replay, or the eager forward's launches); the cache manager's commit.
HOST_PHASES = ("plan", "tokens", "stage", "onload", "launch", "commit")


@dataclass
class Served:
    """One batch served: logits [sum of candidates, tasks] and, per request, what it took. The
    per-request figures are computed when read (e2e's timed loop never reads them)."""

    logits: torch.Tensor
    hidden: Optional[torch.Tensor]  # candidate hidden states (return_hidden=True)
    requests: Sequence[Request]
    cached: List[int]  # prefix tokens served from the cache, per request
    was_on_host: List[bool]  # the user's cached prefix sat in the host tier
    batch_bytes: Tuple[int, int] = (0, 0)  # (onloaded, offloaded) by the batch
    host_ms: float = 0.0  # host clock from the call to the batch's launch (and the bookkeeping)
    # The compute's span: CUDA events around it (from the first launch to its end on the device;
    # eager: the device's waits for the host's launches count), or the host clock on a CPU.
    span: Optional[tuple] = None
    # host_ms by phase (HOST_PHASES), ms: which part of the host's work a slow batch spent.
    host_phases: Dict[str, float] = field(default_factory=dict)

    @property
    def device_ms(self) -> Optional[float]:
        """The compute's time on the device, ms (CUDA: valid once the batch has finished)."""
        if self.span is None:
            return None
        start, end = self.span
        return start.elapsed_time(end) if hasattr(start, "elapsed_time") else (end - start) * 1e3

    def by_request(self, rows: torch.Tensor) -> List[torch.Tensor]:
        """`rows` (the logits or the hidden states) cut into each request's candidates, as
        float32 copies on the CPU: what a verify step keeps after the buffers are reused."""
        counts = [r.candidates.numel() for r in self.requests]
        return list(rows.detach().float().cpu().clone().split(counts))

    @property
    def tiers(self) -> List[str]:
        """TIERS: where each request's cached prefix came from."""
        return [
            "miss" if c == 0 else "host" if h else "gpu" for c, h in zip(self.cached, self.was_on_host)
        ]

    @property
    def computed(self) -> List[int]:
        """Tokens computed per request: uncached history + candidates."""
        return [r.seq_len - c + r.candidates.numel() for r, c in zip(self.requests, self.cached)]

    @property
    def onloaded_bytes(self) -> List[int]:
        """The batch's onloads shared out by the host-tier tokens each request brought back."""
        host = [c if h else 0 for c, h in zip(self.cached, self.was_on_host)]
        return apportion(self.batch_bytes[0], host)

    @property
    def offloaded_bytes(self) -> List[int]:
        """The batch's offloads shared out by the new tokens that needed room."""
        return apportion(
            self.batch_bytes[1], [r.seq_len - c for r, c in zip(self.requests, self.cached)]
        )


def apportion(total: int, weights: Sequence[int]) -> List[int]:
    """`total` split in proportion to `weights` as integers that sum to it exactly (largest
    remainders; all of it to the first request when every weight is 0)."""
    weights = list(weights)
    if not weights:
        return []
    whole = sum(weights)
    if whole == 0:
        return [total] + [0] * (len(weights) - 1)
    shares = [total * w // whole for w in weights]
    order = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


class RequestPath:
    """The ranking model behind an optional KV-cache manager and an optional graph runner.

    manager: a `KVCacheManager` (lookup, strip the cached prefix, plan pages, layer-wise onload
    waits) or None for a full recompute of every sequence.
    graphs: a `GraphedRanker` replaying `forward_rows` per bucket (host onloads land first), or
    None to run it eagerly."""

    def __init__(self, model: HSTURanker, *, device, manager=None, graphs=None):
        self.model, self.device, self.manager, self.graphs = model, device, manager, graphs

    def reset(self) -> None:
        """Forget every user (an emptied cache, zeroed statistics)."""
        if self.manager is not None:
            self.manager.reset()

    @torch.no_grad()
    def serve(self, requests: Sequence[Request], *, return_hidden: bool = False) -> Served:
        clock = time.perf_counter
        t0 = clock()
        with phase("rank.plan"):
            cached, was_on_host, table, on_layer = self._plan_pages(requests)
        t_plan = clock()
        with phase("rank.tokens"):
            tokens = self.model.embeddings.tokens(requests, cached, self.device, upload=False)
            batch = make_batch(tokens.rows, tokens.num_candidates, self.device, table, upload=False)
        t_tokens = clock()
        pool = self.manager.cache.kv if self.manager is not None else None
        cuda = torch.device(self.device).type == "cuda"
        if self.graphs is None:  # eager: each layer waits for its own onloads (on_layer)
            batch, tokens = upload_step(batch, tokens, self.device)
            t_stage = t_onload = clock()
            start = _mark(cuda)
            logits, h = forward_rows(self.model, tokens, batch, pool, on_layer)
        else:
            with phase("rank.graph"):
                staged = self.graphs.stage_step(tokens, batch)
                t_stage = clock()
                self._onload_all(on_layer)
                t_onload = clock()
                start = _mark(cuda)
                logits, h = self.graphs.run(staged)
        span = (start, _mark(cuda))
        t_launch = clock()
        if self.manager is not None:
            self.manager.commit()  # fingerprints, while the device computes
        t_end = clock()
        marks = (t0, t_plan, t_tokens, t_stage, t_onload, t_launch, t_end)
        return Served(
            logits=logits,
            hidden=h if return_hidden else None,
            requests=requests,
            cached=cached,
            was_on_host=was_on_host,
            batch_bytes=self._bytes_moved(),
            host_ms=(t_end - t0) * 1e3,
            span=span,
            host_phases={n: 1e3 * (b - a) for n, a, b in zip(HOST_PHASES, marks, marks[1:])},
        )

    @torch.no_grad()
    def tune_shapes(self, shapes, progress=None) -> int:
        """Eager: one synthetic full batch of every bucket of `shapes` run through the model, so
        that its kernels tune every shape before a timed run (`builders.eager_shapes`: a
        `BucketGraphs` whose buckets are the attention tuner's keys: each batch size, rows and KV
        by powers of two). The batches' keys are read from pool pages and their appends go to the
        scratch page: no user's cache changes. Returns how many batches ran."""
        say = progress or (lambda msg: None)
        pool = self.manager.cache.kv if self.manager is not None else None
        todo, t0 = shapes.buckets(), time.perf_counter()
        for i, bucket in enumerate(todo):
            requests, starts, table = shapes.synthetic(bucket)
            tokens = self.model.embeddings.tokens(requests, starts, self.device, upload=False)
            batch = make_batch(tokens.rows, tokens.num_candidates, self.device, table, upload=False)
            batch, tokens = upload_step(batch, tokens, self.device)
            forward_rows(self.model, tokens, batch, pool, None)
            if (i + 1) % 64 == 0 or i + 1 == len(todo):
                say(
                    f"warm-up: tuned {i + 1}/{len(todo)} eager shapes ({time.perf_counter() - t0:.1f} s)"
                )
        return len(todo)

    def capture_graphs(self, progress=None) -> int:
        """Every graph bucket a batch can meet captured (`GraphedRanker.capture_all`); returns
        how many were captured now (0 without graphs)."""
        return 0 if self.graphs is None else self.graphs.capture_all(progress)

    def _plan_pages(self, requests):
        """Lookup and page planning: (cached prefix per request, whether it sat in the host
        tier, PageTable or None, the onload hook or None). Making room offloads or evicts
        least-recent users."""
        if self.manager is None:
            return [0] * len(requests), [False] * len(requests), None, None
        # Which users sit in the host tier is known only before planning moves them back.
        on_host = getattr(self.manager.cache, "host_users", {})
        was_on_host = [r.user in on_host for r in requests]
        cached, table, on_layer = self.manager.plan(requests, upload=False)
        return cached, was_on_host, table, on_layer

    def _onload_all(self, on_layer) -> None:
        """One graph replay runs every layer: all onloads must land before it."""
        if on_layer is not None:
            for layer in range(len(self.model.block.layers)):
                on_layer(layer)

    def _bytes_moved(self) -> Tuple[int, int]:
        """(onloaded, offloaded) bytes of the batch just planned."""
        if self.manager is None or not self.manager.batches:
            return 0, 0
        last = self.manager.batches[-1]
        return last["onloaded_bytes"], last["offloaded_bytes"]


def _mark(cuda: bool):
    """A point in the compute's timeline: a recorded CUDA event, or the host clock."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def rank(
    model: HSTURanker,
    requests: Sequence[Request],
    *,
    device,
    manager=None,
    graphs=None,
    return_hidden: bool = False,
):
    """Logits [sum of candidates, tasks] of a batch of requests (and the candidate hidden states
    with return_hidden): `RequestPath.serve` without the per-request accounting."""
    served = RequestPath(model, device=device, manager=manager, graphs=graphs).serve(
        requests, return_hidden=return_hidden
    )
    return (served.logits, served.hidden) if return_hidden else served.logits
