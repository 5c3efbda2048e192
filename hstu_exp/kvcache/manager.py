"""KV-cache manager: which prefix of each request is already cached, and only the rest computed.

Lookup is by user id and the request's sequence: the cache holds the first `cached_length(user)`
tokens of the user's sequence (GPU or host tier) and the manager keeps the token ids they were
computed from, so a request whose history shrank or changed is caught before stale K/V is
served: the user's cache is dropped (both tiers), one line says what happened, and the whole
sequence is recomputed. Host-side bookkeeping only; the cache (`PagedKVCache` or
`OffloadPagedKVCache`) owns pages and transfers.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from hstu_exp.core.paging import pages_for
from hstu_exp.data.synthetic import Request
from hstu_exp.kvcache.paged import PagedKVCache

log = logging.getLogger(__name__)


class CapacityError(ValueError):
    """A single request needs more pages than a tier holds."""


class KVCacheManager:
    def __init__(self, cache: PagedKVCache, *, warn: Callable[[str], None] = log.warning):
        self.cache = cache
        self.warn = warn
        self.reset()

    def reset(self) -> None:
        """Forget every user, in the cache too, and zero the statistics."""
        self.cache.reset()
        # user -> the fingerprint of the request its cached K/V came from (`Request.fingerprint`)
        self._seen: Dict[int, Tuple[bytes, bytes]] = {}
        self.hit_tokens = self.computed_tokens = self.invalidations = 0
        self.last_starts: List[int] = []  # cached prefix per request of the last batch planned
        self.batches: List[dict] = []  # per batch planned: where its tokens came from, bytes moved
        self._pending: Sequence[Request] = ()  # planned, fingerprints not yet recorded

    def lookup(self, request: Request) -> int:
        """Tokens at the start of the request's sequence whose K/V the cache holds."""
        self.commit()
        user = request.user
        held = self.cache.cached_length(user)
        seen = self._seen.get(user)
        if held == 0 or seen is None or len(seen[1]) < held * 8:
            if held:  # pages without a record of all their ids: never serve them
                self.cache.drop(user)
            self._seen.pop(user, None)
            return 0
        problem = None
        if request.seq_len < held:
            problem = f"its sequence shrank from {held} cached tokens to {request.seq_len}"
        else:
            # Equal bytes are equal tokens: the record is the fingerprint of the request that
            # left `held` tokens cached (8 bytes a token), and starts this one's if they agree.
            size = held * 8
            kinds, ids = (b if len(b) == size else b[:size] for b in seen)
            now_kinds, now_ids = request.fingerprint
            if not (now_ids.startswith(ids) and now_kinds.startswith(kinds)):
                diff = (np.frombuffer(now_ids, np.int64)[:held] != np.frombuffer(ids, np.int64)) | (
                    np.frombuffer(now_kinds, np.int64)[:held] != np.frombuffer(kinds, np.int64)
                )
                first = int(np.flatnonzero(diff)[0])
                problem = f"token {first} of its {held} cached tokens changed"
        if problem:
            self.warn(f"user {user}: {problem}; dropped its cached K/V, recomputing from scratch")
            self.invalidations += 1
            self.cache.drop(user)
            self._seen.pop(user, None)
            return 0
        return held

    def plan(self, requests: Sequence[Request], *, upload: bool = True):
        """(cached prefix per request, PageTable, on_layer hook or None) for one batch; pages for
        the uncached tokens are reserved (evicting / offloading least-recent users).
        upload=False: the table stays on the host (`PageTable.host`) for the caller to upload
        with the rest of its step. What the cached K/V came from is recorded by `commit`, which
        a server calls after launching the batch (off the critical path); any later lookup,
        plan or stats commits first."""
        self.commit()
        users = [r.user for r in requests]
        if len(set(users)) != len(users):
            raise ValueError(f"a batch holds each user once, got {users}")
        size = self.cache.page_size
        for r in requests:
            if pages_for(r.seq_len, size) > self.cache.num_pages:
                raise CapacityError(
                    f"user {r.user}: a request of {r.seq_len} tokens needs "
                    f"{pages_for(r.seq_len, size)} pages of {size}; the KV pool holds "
                    f"{self.cache.num_pages} (raise cache.num_pages)"
                )
        host_tier = getattr(self.cache, "host_users", {})
        starts: List[int] = [self.lookup(r) for r in requests]
        on_host = sum(s for r, s in zip(requests, starts) if r.user in host_tier)
        new = [r.seq_len - s for r, s in zip(requests, starts)]
        candidates = [r.arrays[2].size for r in requests]
        moved = self._bytes_moved()
        table = self.cache.plan(users, new, candidates, upload=upload)
        after = self._bytes_moved()
        self.batches.append(
            {
                "gpu_hit_tokens": sum(starts) - on_host,
                "host_hit_tokens": on_host,
                "miss_tokens": sum(new),
                "offloaded_bytes": after[0] - moved[0],
                "onloaded_bytes": after[1] - moved[1],
            }
        )
        self._pending = requests
        self.last_starts = starts
        self.hit_tokens += sum(starts)
        self.computed_tokens += sum(new) + sum(candidates)
        hook = getattr(self.cache, "layer_hook", None)
        return starts, table, hook() if hook else None

    def commit(self) -> None:
        """Record what the last planned batch's K/V came from (copies of its token kinds and
        ids: the next request of a user is checked against them)."""
        for r in self._pending:
            self._seen[r.user] = r.fingerprint
        self._pending = ()

    def _bytes_moved(self) -> Tuple[int, int]:
        """(offloaded, onloaded) bytes since reset; zeros without a host tier."""
        return (getattr(self.cache, "offloaded_bytes", 0), getattr(self.cache, "onloaded_bytes", 0))

    def stats(self) -> dict:
        """Cache statistics since reset (synchronizes on CUDA when a host tier is in use).
        hit_tokens = gpu_hit_tokens + host_hit_tokens (prefix tokens served from the GPU pool and
        from the host tier); miss_tokens: history tokens computed (candidates not counted)."""
        self.commit()
        per_batch = self.batches
        out = {
            "hit_tokens": self.hit_tokens,
            "computed_tokens": self.computed_tokens,
            **{
                k: sum(b[k] for b in per_batch)
                for k in ("gpu_hit_tokens", "host_hit_tokens", "miss_tokens")
            },
            "evictions": self.cache.evictions,
            "invalidations": self.invalidations,
            "offloaded_bytes": 0,
            "onloaded_bytes": 0,
            "onload_wait_ms": 0.0,
            "host_evictions": 0,
        }
        transfers = getattr(self.cache, "transfer_stats", None)
        if transfers:
            out.update(transfers())
        return out
