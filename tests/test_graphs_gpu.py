"""CUDA-graph replay equals eager execution (needs a GPU; skipped elsewhere)."""

import pytest
import torch

from hstu_exp.core.jagged import make_batch
from hstu_exp.graphs import BucketGraphs, GraphedBlock
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import HSTUBlock

pytestmark = pytest.mark.gpu


def block_and_cache(kernel):
    torch.manual_seed(0)
    block = (
        HSTUBlock(num_layers=2, hidden=64, num_heads=2, head_dim=32, scaling_length=600, kernel=kernel)
        .cuda()
        .eval()
    )
    cache = PagedKVCache(
        num_layers=2,
        num_pages=256,
        page_size=16,
        num_heads=2,
        head_dim=32,
        dtype=torch.float32,
        device="cuda",
    )
    return block, cache


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@torch.no_grad()
def test_replay_equals_eager_paged(kernel):
    block, cache = block_and_cache(kernel)
    core = BucketGraphs(
        device="cuda",
        batch_buckets=[2, 4],
        token_buckets=[64, 128],
        pool=cache.pool,
        page_size=16,
        max_history=512,
        scratch_page=cache.scratch_page,
        fit_rows=True,
    )
    graphs = GraphedBlock(block, core, hidden=64, dtype=torch.float32)
    eager_cache = PagedKVCache(
        num_layers=2,
        num_pages=256,
        page_size=16,
        num_heads=2,
        head_dim=32,
        dtype=torch.float32,
        device="cuda",
    )
    gen = torch.Generator().manual_seed(1)
    for users, new, cands in [
        ([1, 2, 3], [30, 7, 50], [4, 9, 1]),
        ([2, 9], [1, 40], [20, 3]),
        ([1, 3, 9, 4], [10, 10, 0, 90], [2, 2, 5, 30]),
    ]:
        rows = [n + c for n, c in zip(new, cands)]
        x = torch.randn(sum(rows), 64, generator=gen).cuda()
        batch = make_batch(rows, cands, "cuda", cache.plan(users, new, cands))
        eager_batch = make_batch(rows, cands, "cuda", eager_cache.plan(users, new, cands))
        staged = graphs.stage(batch, sum(rows))
        out = graphs.replay(x, staged).clone()
        ref = block(x, eager_batch, eager_cache.pool)
        torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
        assert staged.bucket.batch >= len(users)
        assert staged.bucket.rows < staged.bucket.batch * staged.bucket.tokens  # fitted rows
    assert len(core.graphs) >= 2 and len(core.used) == len(core.graphs)  # each captured once


@pytest.mark.parametrize("fit_rows", [True, False])
@torch.no_grad()
def test_replay_equals_eager_full(fit_rows):
    """Two batches of the same batch x token bucket: with fit_rows their rows (130 and 264 of
    4 x 256) are padded to 256 and 512, two graphs; without, both to 1024, one graph."""
    block, _ = block_and_cache("reference")
    graphs = GraphedBlock(
        block,
        BucketGraphs(device="cuda", batch_buckets=[4], token_buckets=[256], fit_rows=fit_rows),
        hidden=64,
        dtype=torch.float32,
    )
    padded = []
    for rows, cands in [([100, 30], [10, 0]), ([256, 1, 7], [56, 1, 7])]:
        x = torch.randn(sum(rows), 64, device="cuda")
        batch = make_batch(rows, cands, "cuda")
        staged = graphs.stage(batch, sum(rows))
        out = graphs.replay(x, staged).clone()
        torch.testing.assert_close(out, block(x, batch), rtol=2e-4, atol=2e-4)
        padded.append(staged.bucket.rows)
    assert padded == ([256, 512] if fit_rows else [1024, 1024])
    assert len(graphs.core.graphs) == len(set(padded)) and graphs.core.capture_s > 0
    assert (graphs.core.live_rows, graphs.core.run_rows) == (130 + 264, sum(padded))
