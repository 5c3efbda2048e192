"""The paged KV cache against an independent reference: a full recompute of whole sequences.

The reference is a direct per-user, per-head loop over docs/design.md §2 (no gathers, no pages), so it
shares no indexing code with the block under test."""

import copy
import random

import pytest
import torch
from helpers import spec_block

from hstu_exp.core.jagged import make_batch
from hstu_exp.kvcache.paged import CacheFullError, PagedKVCache
from hstu_exp.model.hstu import HSTUBlock


def naive_block(block: HSTUBlock, seq: torch.Tensor, num_candidates: int) -> torch.Tensor:
    return spec_block(block, seq, seq.shape[0] - num_candidates).to(seq.dtype)


def make_block(hidden=16, heads=2, head_dim=8, layers=2, scaling=300):
    torch.manual_seed(random.randrange(1 << 30))
    return (
        HSTUBlock(
            num_layers=layers, hidden=hidden, num_heads=heads, head_dim=head_dim, scaling_length=scaling
        )
        .double()
        .eval()
    )


def run_cached(block, cache, users, seqs, cached, cands):
    """Prefill each user's first `cached` tokens, then serve the rest + candidates."""
    table = cache.plan(users, cached, [0] * len(users))
    block(
        torch.cat([s[:c] for s, c in zip(seqs, cached)]),
        make_batch(cached, [0] * len(users), "cpu", table),
        cache.pool,
    )
    new = [s.shape[0] - c - k for s, c, k in zip(seqs, cached, cands)]
    table = cache.plan(users, new, cands)
    rows = [n + k for n, k in zip(new, cands)]
    out = block(
        torch.cat([s[c:] for s, c in zip(seqs, cached)]),
        make_batch(rows, cands, "cpu", table),
        cache.pool,
    )
    return out.split(rows)


CASES = [  # (histories, cached prefixes, candidates, page size)
    ([8], [0], [0], 8),  # full compute, one exact page
    ([8], [8], [3], 8),  # everything cached, candidates only
    ([9], [8], [2], 8),  # one new token opens a page
    ([16], [7], [1], 8),  # new tokens cross a page boundary
    ([17, 1], [16, 0], [4, 0], 8),  # last page with 1 token; a user with no candidates
    ([31, 32, 33], [30, 31, 1], [2, 5, 3], 16),
    ([40, 5, 0], [0, 5, 0], [2, 2, 3], 4),  # zero-length history: candidates only
    ([64, 63], [32, 17], [7, 1], 32),
]


@pytest.mark.parametrize("histories,cached,cands,page", CASES)
def test_cached_candidates_equal_full_recompute(histories, cached, cands, page):
    block = make_block()
    seqs = [torch.randn(t + c, 16, dtype=torch.float64) for t, c in zip(histories, cands)]
    cache = PagedKVCache(
        num_layers=2,
        num_pages=64,
        page_size=page,
        num_heads=2,
        head_dim=8,
        dtype=torch.float64,
        device="cpu",
    )
    outs = run_cached(block, cache, list(range(len(seqs))), seqs, cached, cands)
    full_rows = [t + c for t, c in zip(histories, cands)]
    full = block(torch.cat(seqs), make_batch(full_rows, cands, "cpu")).split(full_rows)
    for seq, out, f, _t, c, k in zip(seqs, outs, full, histories, cached, cands):
        ref = naive_block(block, seq, k)
        torch.testing.assert_close(f, ref, rtol=1e-9, atol=1e-9)  # full path == spec
        torch.testing.assert_close(out, ref[c:], rtol=1e-9, atol=1e-9)  # cached == spec


def test_random_splits_float32():
    """Many random (history, cached, candidates, page size, batch) draws in float32."""
    rng = random.Random(1234)
    for _ in range(12):
        page = rng.choice([4, 8, 16, 32])
        batch = rng.randint(1, 4)
        hist = [rng.randint(0, 70) for _ in range(batch)]
        cached = [rng.randint(0, h) for h in hist]
        cands = [rng.randint(0, 6) for _ in range(batch)]
        block = make_block().float()
        seqs = [torch.randn(t + c, 16) for t, c in zip(hist, cands)]
        cache = PagedKVCache(
            num_layers=2,
            num_pages=128,
            page_size=page,
            num_heads=2,
            head_dim=8,
            dtype=torch.float32,
            device="cpu",
        )
        outs = run_cached(block, cache, rng.sample(range(100), batch), seqs, cached, cands)
        oracle = copy.deepcopy(block).double()
        for seq, out, c, k in zip(seqs, outs, cached, cands):
            ref = naive_block(oracle, seq.double(), k)[c:].float()
            err = (out - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err < 1e-5, (hist, cached, cands, page, float(err))


def test_requests_grow_history_over_time():
    """A user served request after request: each answer equals a recompute of all history."""
    block = make_block()
    cache = PagedKVCache(
        num_layers=2,
        num_pages=32,
        page_size=8,
        num_heads=2,
        head_dim=8,
        dtype=torch.float64,
        device="cpu",
    )
    history = torch.randn(0, 16, dtype=torch.float64)
    for step in [5, 11, 8, 1, 16]:
        new = torch.randn(step, 16, dtype=torch.float64)
        cands = torch.randn(3, 16, dtype=torch.float64)
        table = cache.plan([7], [step], [3])
        out = block(torch.cat([new, cands]), make_batch([step + 3], [3], "cpu", table), cache.pool)
        history = torch.cat([history, new])
        ref = naive_block(block, torch.cat([history, cands]), 3)[-3:]
        torch.testing.assert_close(out[-3:], ref, rtol=1e-9, atol=1e-9)
        assert cache.cached_length(7) == history.shape[0]


def small_cache(pages=6, page=4):
    return PagedKVCache(
        num_layers=1,
        num_pages=pages,
        page_size=page,
        num_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
    )


def test_lru_evicts_least_recent_user_outside_the_batch():
    cache = small_cache()
    cache.plan([1], [8], [0])  # 2 pages each
    cache.plan([2], [8], [0])
    cache.plan([3], [8], [0])
    cache.plan([1], [0], [0])  # touch 1: user 2 is now the least recent
    cache.plan([4], [8], [0])
    assert cache.cached_length(2) == 0 and cache.evictions == 1
    assert [cache.cached_length(u) for u in (1, 3, 4)] == [8, 8, 8]
    pages = [p for u in cache.users.values() for p in u.pages]
    assert len(pages) == len(set(pages)) == 6  # no page handed out twice


def test_batch_members_are_never_evicted():
    cache = small_cache()
    cache.plan([1, 2], [8, 8], [0, 0])
    cache.plan([3], [4], [0])
    table = cache.plan([1, 2, 3], [0, 0, 4], [0, 0, 0])  # 3 grows to 2 pages: 6 in use, fits
    assert table.max_kv_len == 8
    with pytest.raises(CacheFullError, match="nothing to evict"):
        cache.plan([1, 2, 3], [0, 0, 4], [0, 0, 0])
    assert [cache.cached_length(u) for u in (1, 2, 3)] == [8, 8, 8]


def test_page_table_metadata():
    cache = small_cache(pages=8, page=4)
    cache.plan([5], [6], [0])
    t = cache.plan([5, 9], [3, 2], [1, 2])
    assert t.cached_lengths.tolist() == [6, 0]
    assert t.page_indptr.tolist() == [0, 3, 4]
    assert t.last_page_len.tolist() == [1, 2]  # 9 tokens in pages of 4; 2 tokens
    assert t.new_rows.tolist() == [0, 1, 2, 4, 5]  # user 5's candidate is row 3
    assert t.new_slot.tolist() == [2, 3, 0, 0, 1]
    user5 = cache.users[5].pages
    assert t.new_page.tolist()[:3] == [user5[1], user5[1], user5[2]]
