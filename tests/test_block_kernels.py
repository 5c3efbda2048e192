"""The whole block with kernel=triton (attention + fused ops) equals kernel=reference,
full and paged, on fresh random inputs (Triton's interpreter on CPU, a GPU where there is one)."""
import copy
import random

import pytest
import torch

from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.hstu import HSTUBlock
from hstu_exp.model.jagged import make_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_block_equals_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    ref = HSTUBlock(num_layers=2, hidden=32, num_heads=2, head_dim=16, scaling_length=200).to(DEVICE)
    with torch.no_grad():  # LayerNorm weights away from (1, 0)
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    tri = copy.deepcopy(ref)
    tri.kernel = "triton"
    B = rng.randint(1, 3)
    hist = [rng.randint(1, 40) for _ in range(B)]
    cached = [rng.randint(0, h) for h in hist]
    cands = [rng.randint(0, 5) for _ in range(B)]
    seqs = [torch.randn(t + c, 32, device=DEVICE) for t, c in zip(hist, cands)]

    rows = [t + c for t, c in zip(hist, cands)]
    full = make_batch(rows, cands, DEVICE)
    x = torch.cat(seqs)
    torch.testing.assert_close(tri(x, full), ref(x, full), rtol=1e-4, atol=1e-4)

    outs = []
    for block in (ref, tri):
        cache = PagedKVCache(num_layers=2, num_pages=32, page_size=8, num_heads=2, head_dim=16,
                             dtype=torch.float32, device=DEVICE)
        users = list(range(B))
        table = cache.plan(users, cached, [0] * B)
        block(torch.cat([s[:c] for s, c in zip(seqs, cached)]),
              make_batch(cached, [0] * B, DEVICE, table), cache.pool)
        new = [t - c for t, c in zip(hist, cached)]
        table = cache.plan(users, new, cands)
        outs.append(block(torch.cat([s[c:] for s, c in zip(seqs, cached)]),
                          make_batch([n + k for n, k in zip(new, cands)], cands, DEVICE, table),
                          cache.pool))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
