"""Fused Triton helpers vs their PyTorch versions (Triton's interpreter on CPU)."""
import pytest
import torch

from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.ops.fused import append_kv, append_kv_torch, layernorm_mul, layernorm_mul_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("heads,head_dim,page", [(1, 32, 4), (2, 16, 8), (4, 64, 16)])
def test_append_kv_matches_index_put(heads, head_dim, page):
    cache = PagedKVCache(num_layers=1, num_pages=16, page_size=page, num_heads=heads,
                         head_dim=head_dim, dtype=torch.float32, device=DEVICE)
    cache.plan([3], [page + 1], [0])
    table = cache.plan([3, 5], [page - 1, 2 * page + 1], [2, 0])  # crosses page boundaries
    rows = table.new_rows.numel() + 2
    # z is [rows, 4*H*D]: k and v are row-strided views, as in the layer
    z = torch.randn(rows, 4 * heads * head_dim, device=DEVICE)
    u, v, q, k = (t.reshape(-1, heads, head_dim) for t in z.split(heads * head_dim, dim=-1))
    ours, ref = cache.pool[0].clone(), cache.pool[0].clone()
    ours.fill_(float("nan"))
    ref.fill_(float("nan"))
    append_kv(ours, table.new_rows, table.new_page, table.new_slot, k, v)
    append_kv_torch(ref, table.new_rows, table.new_page, table.new_slot, k, v)
    assert torch.equal(ours.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert (~ours.isnan()).sum() == 2 * table.new_rows.numel() * heads * head_dim


@pytest.mark.parametrize("rows,width", [(1, 64), (7, 96), (33, 256)])
def test_layernorm_mul_matches_torch(rows, width):
    z = torch.randn(rows, 3 * width, device=DEVICE) * 3 + 1
    a, u = z[:, :width], z[:, width:2 * width]  # strided views, as in the layer
    w, b = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    torch.testing.assert_close(layernorm_mul(a, u, w, b, 1e-5),
                               layernorm_mul_torch(a, u, w, b, 1e-5), rtol=1e-5, atol=1e-5)
