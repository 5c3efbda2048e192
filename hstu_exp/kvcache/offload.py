"""Paged KV cache with a host tier (docs/design.md §3, cache=paged_offload).

Users evicted from the GPU pool keep their K/V in a preallocated host pool (pinned when CUDA is
available) instead of losing it. A later request for such a user allocates GPU pages and onloads
its pages back layer by layer; the block's `on_layer(l)` hook makes the compute stream wait for
layer l's copy alone, so layer 0 computes while deeper layers are still in flight. When the host
pool is full its least-recent users are dropped: their next request recomputes everything.

Ordering on CUDA (two side streams: D2H offload, H2D onload), issued at the end of `plan`:
  - both side streams first wait for the compute stream: an evicted user's pages were written,
    and freed pages may still be read, by compute already enqueued;
  - the offload stream waits for the onload stream: host pages freed by an onload may be reused;
  - per layer l: offload copies, event off[l]; the onload stream waits off[l] (an onload may land
    in pages just vacated), onload copies, event on[l];
  - `on_layer(l)` makes compute wait on[l] (hence off[l]) before layer l appends into the pool.
On CPU there are no streams: the same copies run synchronously inside `plan`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import List, Sequence, Tuple

import numpy as np
import torch

from hstu_exp.kvcache.paged import CacheFullError, PagedKVCache, UserPages


def _runs(src: Sequence[int], dst: Sequence[int]) -> List[Tuple[int, int, int]]:
    """(src start, dst start, length) of the stretches where both page lists are consecutive:
    one copy per stretch instead of one per page."""
    out: List[Tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


class OffloadPagedKVCache(PagedKVCache):
    def __init__(
        self,
        *,
        host_pages: int,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        fp8: bool = False,
    ):
        self.host_pages = host_pages
        self.host_users: "OrderedDict[int, UserPages]" = OrderedDict()  # least recent first
        super().__init__(
            num_layers=num_layers,
            num_pages=num_pages,
            page_size=page_size,
            num_heads=num_heads,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
            fp8=fp8,
        )
        # (GPU tensor, its host tier) pairs; empty, not zeros: a host page is only ever read after
        # it was written. With fp8 the host tier holds e4m3 pages and their scales, and both
        # travel in every copy.
        pin = torch.cuda.is_available()
        self.mirrored = [(self.pool, self._host_like(self.pool, host_pages, pin))]
        if self.fp8:
            self.mirrored.append((self.scales, self._host_like(self.scales, host_pages, pin)))
        self.host_pool = self.mirrored[0][1]
        self.host_scales = self.mirrored[1][1] if self.fp8 else None
        self.page_bytes = sum(t[:, 0].numel() * t.element_size() for t, _ in self.mirrored)  # all layers
        self.cuda = self.pool.device.type == "cuda"
        if self.cuda:
            self.offload_stream = torch.cuda.Stream(self.pool.device)
            self.onload_stream = torch.cuda.Stream(self.pool.device)

    @staticmethod
    def _host_like(t: torch.Tensor, pages: int, pin: bool) -> torch.Tensor:
        return torch.empty(t.shape[0], pages, *t.shape[2:], dtype=t.dtype, pin_memory=pin)

    @property
    def host_nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for _, h in self.mirrored)

    def reset(self) -> None:
        super().reset()
        self.host_users.clear()
        self.host_free: List[int] = list(range(self.host_pages - 1, -1, -1))
        self._offloads: List[Tuple[List[int], List[int]]] = []  # (gpu pages, host pages)
        self._onloads: List[Tuple[List[int], List[int]]] = []  # (host pages, gpu pages)
        self._protect: set = set()
        self._ready = None  # per-layer events compute waits on (CUDA), None when nothing moved
        self._stalls = []  # (start, end) event pairs around compute's waits (CUDA)
        self.offloaded_bytes = self.onloaded_bytes = 0
        self.host_evictions = 0  # users dropped from the host tier (recomputed next time)
        self._wait_ms = 0.0

    # -- tiers -------------------------------------------------------------------------------

    def cached_length(self, user: int) -> int:
        entry = self.users.get(user) or self.host_users.get(user)
        return entry.length if entry else 0

    def drop(self, user: int) -> None:
        super().drop(user)
        entry = self.host_users.pop(user, None)
        if entry:
            self.host_free.extend(reversed(entry.pages.tolist()))

    def evict(self, user: int) -> None:
        """Move a user's pages to the host tier (dropping least-recent host users to make room);
        a user larger than the whole host tier is dropped."""
        entry = self.users.get(user)
        self.evictions += 1
        need = len(entry.pages)
        if need == 0 or need > self.host_pages:  # nothing to keep, or it can never fit
            self.drop(user)
            return
        while len(self.host_free) < need:
            victim = next((u for u in self.host_users if u not in self._protect), None)
            if victim is None:  # host holds only users of this batch: keep them, lose this one
                self.drop(user)
                return
            self.host_evictions += 1
            self.drop(victim)
        host = [self.host_free.pop() for _ in range(need)]
        self._offloads.append((entry.pages.tolist(), host))
        self.offloaded_bytes += need * self.page_bytes
        super().drop(user)  # GPU pages go back to the free list; compute waits before reuse
        self.host_users[user] = UserPages(pages=np.asarray(host, np.int32), length=entry.length)

    # -- planning ----------------------------------------------------------------------------

    def plan(
        self,
        users: Sequence[int],
        new_history: Sequence[int],
        num_candidates: Sequence[int],
        *,
        upload: bool = True,
    ):
        if len(set(users)) != len(users):
            raise ValueError(f"a batch holds each user once, got {list(users)}")
        self._protect = set(users)  # neither tier gives up this batch's users to make room
        try:
            return self._plan(users, new_history, num_candidates, upload)
        finally:  # even after a CacheFullError: evictions already made must reach the host
            self._protect = set()
            self._issue()

    def _plan(self, users, new_history, num_candidates, upload):
        need = 0
        for user, n in zip(users, new_history):
            if user in self.host_users:
                need += self._pages_for(self.host_users[user].length + n)
            else:
                entry = self.users.get(user)
                have, length = (len(entry.pages), entry.length) if entry else (0, 0)
                need += max(0, self._pages_for(length + n) - have)
        while len(self.free) < need:
            victim = next((u for u in self.users if u not in self._protect), None)
            if victim is None:
                raise CacheFullError(
                    f"KV pool of {self.num_pages} pages x {self.page_size} tokens cannot hold "
                    f"this batch ({need} pages needed, {len(self.free)} free, nothing to evict)"
                )
            self.evict(victim)
        for user in users:  # host users come back: fresh GPU pages, filled by the onload
            entry = self.host_users.pop(user, None)
            if entry is None:
                continue
            gpu = self.take(len(entry.pages))
            self._onloads.append((entry.pages.tolist(), gpu.tolist()))
            self.onloaded_bytes += len(gpu) * self.page_bytes
            self.host_free.extend(reversed(entry.pages.tolist()))  # reused after the onload (top)
            self.users[user] = UserPages(pages=gpu, length=entry.length)
        # Room is there: no evictions.
        return super().plan(users, new_history, num_candidates, upload=upload)

    def _copy_layer(self, layer: int, moves, to_host: bool) -> None:
        """One layer's page moves, pages and (fp8) scales alike, GPU -> host when to_host."""
        for gpu, host in self.mirrored:
            src_pool, dst_pool = (gpu, host) if to_host else (host, gpu)
            for src, dst in moves:
                for s, d, n in _runs(src, dst):
                    dst_pool[layer, d : d + n].copy_(src_pool[layer, s : s + n], non_blocking=True)

    def _issue(self) -> None:
        """Enqueue this batch's offloads and onloads, layer by layer."""
        offloads, onloads = self._offloads, self._onloads
        self._offloads, self._onloads, self._ready = [], [], None
        if not offloads and not onloads:
            return
        layers = self.pool.shape[0]
        if not self.cuda:  # synchronous: compute waits for all of it
            t0 = time.perf_counter()
            for layer in range(layers):
                self._copy_layer(layer, offloads, to_host=True)
                self._copy_layer(layer, onloads, to_host=False)
            self._wait_ms += (time.perf_counter() - t0) * 1e3
            return
        compute = torch.cuda.current_stream(self.pool.device)
        off, on = self.offload_stream, self.onload_stream
        off.wait_stream(compute)
        off.wait_stream(on)
        on.wait_stream(compute)
        self._ready = []
        for layer in range(layers):
            with torch.cuda.stream(off):
                self._copy_layer(layer, offloads, to_host=True)
                done = torch.cuda.Event()
                done.record(off)
            on.wait_event(done)
            with torch.cuda.stream(on):
                self._copy_layer(layer, onloads, to_host=False)
                ready = torch.cuda.Event()
                ready.record(on)
            self._ready.append(ready)

    def layer_hook(self):
        """The block's on_layer for the batch just planned, or None when nothing moved."""
        return self._wait_layer if self._ready is not None else None

    def _wait_layer(self, layer: int) -> None:
        compute = torch.cuda.current_stream(self.pool.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        compute.wait_event(self._ready[layer])
        end.record(compute)  # start -> end on the compute stream: how long it stalled here
        self._stalls.append((start, end))

    def transfer_stats(self) -> dict:
        """Bytes moved since reset, and how long compute waited for the copies: on CUDA the
        stalls at the per-layer waits (onloads, and the offloads of pages being reused); on CPU
        the synchronous copies themselves. Synchronizes on CUDA."""
        if self._stalls:
            self._stalls[-1][1].synchronize()
            self._wait_ms += sum(s.elapsed_time(e) for s, e in self._stalls)
            self._stalls = []
        return {
            "offloaded_bytes": self.offloaded_bytes,
            "onloaded_bytes": self.onloaded_bytes,
            "onload_wait_ms": self._wait_ms,
            "host_evictions": self.host_evictions,
        }
