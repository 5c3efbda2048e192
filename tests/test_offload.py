"""Host tier of the paged KV cache: evicted users' pages go to host and come back bit-exact,
host LRU, capacity errors, and (on a GPU) the side-stream onload with per-layer waits."""

import random
import time

import pytest
import torch

from hstu_exp.config import capacity_problem
from hstu_exp.data.synthetic import make_request
from hstu_exp.kvcache.manager import CapacityError, KVCacheManager
from hstu_exp.kvcache.offload import OffloadPagedKVCache, _runs
from hstu_exp.kvcache.paged import CacheFullError

PAGE = 4


def make_cache(num_pages=6, host_pages=8, device="cpu", layers=2):
    return OffloadPagedKVCache(
        num_layers=layers,
        num_pages=num_pages,
        page_size=PAGE,
        num_heads=2,
        head_dim=3,
        host_pages=host_pages,
        dtype=torch.float32,
        device=device,
    )


def serve(cache, users, tokens):
    """Plan a batch, write fresh random K/V where the new tokens go (what the block's append
    does), run the layer waits; returns what was written per (user, position)."""
    table = cache.plan(users, tokens, [0] * len(users))
    hook = cache.layer_hook()
    for layer in range(cache.pool.shape[0]):  # what the block does before each layer
        if hook:
            hook(layer)
    written = {}
    pages, slots = table.new_page.tolist(), table.new_slot.tolist()
    i = 0
    for user, n in zip(users, tokens):
        start = cache.cached_length(user) - n
        for pos in range(start, start + n):
            value = torch.randn(cache.pool.shape[0], 2, *cache.pool.shape[4:], device=cache.pool.device)
            cache.pool[:, pages[i], :, slots[i]] = value
            written[(user, pos)] = value
            i += 1
    return written


def read(cache, user):
    """Every cached token of a GPU-resident user, [(layer, K/V, H, D) per position]."""
    entry = cache.users[user]
    return [cache.pool[:, entry.pages[p // PAGE], :, p % PAGE] for p in range(entry.length)]


def test_runs_coalesce_consecutive_pages():
    assert _runs([0, 1, 2, 5, 6], [7, 8, 9, 3, 1]) == [(0, 7, 3), (5, 3, 1), (6, 1, 1)]
    assert _runs([], []) == []


def test_evicted_user_comes_back_bit_exact():
    cache = make_cache(num_pages=6, host_pages=8)
    t0 = time.perf_counter()
    kv = serve(cache, [0], [8])  # user 0: 2 pages
    kv |= serve(cache, [1, 2], [8, 8])  # 6 pages: the pool is full
    kv |= serve(cache, [3], [5])  # needs 2 pages: user 0 (least recent) goes to host
    assert 0 not in cache.users and cache.cached_length(0) == 8
    assert cache.offloaded_bytes == 2 * cache.page_bytes and cache.evictions == 1
    kv |= serve(cache, [0], [3])  # back from host (evicting user 1), plus 3 new tokens
    assert cache.onloaded_bytes == 2 * cache.page_bytes
    assert cache.cached_length(0) == 11 and cache.cached_length(1) == 8  # 1 now on host
    for pos, got in enumerate(read(cache, 0)):
        assert torch.equal(got, kv[(0, pos)]), pos
    kv |= serve(cache, [1, 3], [0, 1])  # user 1 back with no new token
    for pos, got in enumerate(read(cache, 1)):
        assert torch.equal(got, kv[(1, pos)]), pos
    stats = cache.transfer_stats()
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert stats["offloaded_bytes"] >= 4 * cache.page_bytes
    # on a CPU the copies are synchronous: compute waited for them, and no longer than it ran
    assert 0 < stats["onload_wait_ms"] < wall_ms, (stats, wall_ms)


def test_a_full_host_drops_its_least_recent_user():
    cache = make_cache(num_pages=4, host_pages=4)
    serve(cache, [0, 1], [8, 8])
    serve(cache, [2], [8])  # 0 -> host
    serve(cache, [3], [8])  # 1 -> host (host full: 4 pages)
    serve(cache, [4], [8])  # 2 -> host: 0 is dropped for room
    assert cache.cached_length(0) == 0 and cache.cached_length(1) == 8
    assert cache.host_evictions == 1 and sorted(cache.host_users) == [1, 2]
    cache.drop(1)  # dropping frees the host pages too
    assert cache.cached_length(1) == 0 and len(cache.host_free) == 2


def test_a_user_larger_than_the_host_tier_is_dropped_not_kept():
    cache = make_cache(num_pages=4, host_pages=2)
    serve(cache, [0], [12])  # 3 pages
    serve(cache, [1], [8])  # 0 evicted: cannot fit the host tier
    assert cache.cached_length(0) == 0 and cache.offloaded_bytes == 0


def test_batch_users_are_never_evicted_and_a_batch_too_big_is_an_error():
    cache = make_cache(num_pages=4, host_pages=8)
    serve(cache, [0, 1], [4, 4])
    with pytest.raises(CacheFullError, match="KV pool of 4 pages x 4 tokens cannot hold"):
        cache.plan([0, 1, 2], [4, 4, 4], [0, 0, 0])
    with pytest.raises(ValueError, match="each user once"):
        cache.plan([5, 5], [1, 1], [0, 0])


def test_capacity_smaller_than_one_request_is_named():
    assert (
        "cache.num_pages=10: the KV pool holds fewer pages than one batch needs "
        "(2 requests x 8 pages of 32 tokens for 256 tokens)"
        in capacity_problem(seq_tokens=256, batch_size=2, page_size=32, num_pages=10, host_pages=None)
    )
    assert capacity_problem(
        seq_tokens=256, batch_size=2, page_size=32, num_pages=16, host_pages=7
    ).startswith("cache.host_pages=7: the host tier holds")
    assert (
        capacity_problem(seq_tokens=256, batch_size=2, page_size=32, num_pages=16, host_pages=8) is None
    )
    manager = KVCacheManager(make_cache(num_pages=2, host_pages=4))
    big = make_request(7, items=range(5), actions=range(5), candidates=[1])  # 10 tokens
    with pytest.raises(
        CapacityError, match="user 7: a request of 10 tokens needs 3 pages of 4; the KV pool holds 2"
    ):
        manager.plan([big])


def test_random_churn_keeps_every_cached_token():
    """Many users, a small pool and host: whatever a tier says it holds is what was written."""
    cache = make_cache(num_pages=8, host_pages=5)
    kv = {}
    for _ in range(80):
        users = random.sample(range(9), random.randint(1, 3))
        tokens = [random.randint(0, 4) for _ in users]
        for u, n in zip(users, tokens):  # at most 2 pages a user, so any batch fits the pool
            if cache.cached_length(u) + n > 2 * PAGE:
                cache.drop(u)
        kv |= serve(cache, users, tokens)
        for u in users:
            for pos, got in enumerate(read(cache, u)):
                assert torch.equal(got, kv[(u, pos)]), (u, pos)
    assert cache.evictions and cache.onloaded_bytes and cache.host_evictions


@pytest.mark.gpu
def test_onload_on_a_side_stream_is_exact_on_cuda():
    cache = make_cache(num_pages=6, host_pages=8, device="cuda", layers=3)
    assert cache.host_pool.is_pinned()
    kv = serve(cache, [0], [8])
    kv |= serve(cache, [1, 2], [8, 8])
    kv |= serve(cache, [3], [5])  # 0 -> host on the offload stream
    t0 = time.perf_counter()
    kv |= serve(cache, [0], [3])  # back on the onload stream, layer by layer
    # the batch that onloaded waits at each layer for that layer's copy (the block calls it)
    assert cache.layer_hook() == cache._wait_layer
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    for pos, got in enumerate(read(cache, 0)):
        assert torch.equal(got, kv[(0, pos)]), pos
    stats = cache.transfer_stats()
    assert stats["onloaded_bytes"] == 2 * cache.page_bytes
    assert 0 <= stats["onload_wait_ms"] < wall_ms, (stats, wall_ms)  # events: 0 when no stall
