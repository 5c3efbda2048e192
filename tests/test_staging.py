"""Host-side metadata: the packed one-copy transfer and the CUDA-graph bucket padding (CPU; the
replay itself is covered by test_graphs_gpu)."""

import random

import numpy as np
import pytest
import torch

from hstu_exp.core.jagged import make_batch, pack, to_device, unpack
from hstu_exp.graphs import Bucket, fit_rows, pad_metadata
from hstu_exp.kvcache.paged import PagedKVCache

SCRATCH = 8


def test_to_device_round_trips_mixed_dtypes_and_empty_arrays():
    arrays = {
        "a": np.arange(3, dtype=np.int32),
        "empty": np.zeros(0, np.int64),
        "b": np.arange(5, dtype=np.int64) - 2,
        "c": np.array([7], np.int32),
    }
    out = to_device(arrays, "cpu")
    for name, a in arrays.items():
        assert out[name].dtype == {np.int32: torch.int32, np.int64: torch.int64}[a.dtype.type]
        assert out[name].tolist() == a.tolist()
    buf, layout = pack(arrays, pin=False)
    assert all(start % 16 == 0 for start, _, _ in layout.values())  # aligned views
    assert unpack(buf, layout)["b"].tolist() == [-2, -1, 0, 1, 2]


def paged_batch():
    """The batch of test_page_table_metadata: users 5 (6 cached + 3 new, 1 candidate) and 9."""
    cache = PagedKVCache(
        num_layers=1,
        num_pages=SCRATCH,
        page_size=4,
        num_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
    )
    cache.plan([5], [6], [0])
    table = cache.plan([5, 9], [3, 2], [1, 2])
    return make_batch([4, 4], [1, 2], "cpu", table)


def test_pad_metadata_pads_users_pages_and_appends():
    batch = paged_batch()
    padded = pad_metadata(
        batch, Bucket(batch=4, tokens=8, kv=16), pages_per_user=4, scratch_page=SCRATCH
    )
    ids = batch.pages.page_ids.tolist()
    assert padded["offsets"].tolist() == [0, 4, 8, 8, 8]  # extra users: no rows
    assert padded["num_candidates"].tolist() == [1, 2, 0, 0]
    assert padded["page_indptr"].tolist() == [0, 3, 4, 4, 4]
    assert padded["cached_lengths"].tolist() == [6, 0, 0, 0]
    assert padded["last_page_len"].tolist() == [1, 2, 0, 0]
    assert padded["page_ids"].tolist() == ids + [SCRATCH] * 12
    assert padded["new_rows"].tolist() == [0, 1, 2, 4, 5] + [0] * 27  # bucket rows: 4 x 8
    assert padded["new_page"].tolist() == batch.pages.new_page.tolist() + [SCRATCH] * 27
    assert padded["new_slot"].tolist() == [2, 3, 0, 0, 1] + [0] * 27
    assert {k: v.dtype for k, v in padded.items()} == {
        **{
            k: np.int32
            for k in (
                "offsets",
                "num_candidates",
                "page_indptr",
                "cached_lengths",
                "last_page_len",
                "page_ids",
            )
        },
        **{k: np.int64 for k in ("new_rows", "new_page", "new_slot")},
    }


def test_pad_metadata_same_bucket_same_layout():
    """A replay copies a staged buffer over the captured one: same bucket, same bytes layout."""
    bucket = Bucket(batch=4, tokens=8, kv=16)
    small = make_batch([3], [1], "cpu")
    small.pages = paged_batch().pages  # only the sizes matter here
    layouts = [
        pack(pad_metadata(b, bucket, pages_per_user=4, scratch_page=SCRATCH), pin=False)[1]
        for b in (paged_batch(), small)
    ]
    assert layouts[0] == layouts[1]


def test_pad_metadata_full_mode_has_no_page_fields():
    batch = make_batch([5, 2], [1, 1], "cpu")
    padded = pad_metadata(batch, Bucket(batch=2, tokens=8), pages_per_user=0, scratch_page=0)
    assert set(padded) == {"offsets", "num_candidates"}
    assert padded["offsets"].tolist() == [0, 5, 7]


def test_fitted_rows_pad_the_batch_not_every_user():
    """One long user beside short ones: the rows go to a power of two of the total, not to
    batch x (the longest user's tokens); no fit where it would not save rows."""
    assert fit_rows(4000 + 7 * 300, 128, 8 * 4352) == 8192  # batch x tokens: 34816
    assert fit_rows(8 * 300, 128, 8 * 384) == 0  # 4096 >= 3072: pad to batch x tokens
    assert fit_rows(1, 128, 1024) == 128 and fit_rows(129, 128, 1024) == 256
    fitted, full = Bucket(batch=8, tokens=4352, kv=4096, fit=8192), Bucket(batch=8, tokens=4352)
    assert (fitted.rows, full.rows) == (8192, 8 * 4352)
    assert fitted.name == "b8xt4352xkv4096xr8192" and full.name == "b8xt4352"
    batch = make_batch([5, 2], [1, 1], "cpu")
    padded = pad_metadata(batch, Bucket(batch=4, tokens=8, fit=16), pages_per_user=0, scratch_page=0)
    assert padded["offsets"].tolist() == [0, 5, 7, 7, 7]


def test_graph_page_tables_hold_the_context_prefix():
    """A user of 512 history + 8 context tokens holds 17 pages of 32: the graphs' page tables are
    sized from builders.kv_tokens (context + history), not max_history alone (16 pages, which
    pad_metadata cannot fit)."""
    import pytest
    from omegaconf import OmegaConf

    from hstu_exp.builders import kv_tokens

    model = OmegaConf.create({"max_history": 512, "num_context": 8})
    page = 32
    cache = PagedKVCache(
        num_layers=1,
        num_pages=40,
        page_size=page,
        num_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
    )
    cache.plan([7], [kv_tokens(model) - 1], [0])
    table = cache.plan([7], [1], [1])
    batch = make_batch([1], [1], "cpu", table)
    assert batch.pages.page_ids.numel() == 17
    per_user = -(-kv_tokens(model) // page)
    bucket = Bucket(batch=1, tokens=8, kv=1024)
    padded = pad_metadata(batch, bucket, pages_per_user=per_user, scratch_page=39)
    assert padded["page_ids"].shape[0] == 17
    with pytest.raises(ValueError):  # what graphs.py did before: max_history's 16 pages
        pad_metadata(batch, bucket, pages_per_user=512 // page, scratch_page=39)


def plain_pad(a, n, fill):
    out = np.full(n, fill, dtype=a.dtype)
    out[: a.size] = a
    return out


def plain_staging(batch, tokens, bucket, pages_per_user, scratch):
    """A step's padded metadata and token rows as the graph runner staged them before it wrote
    straight into the packed buffer: every field padded on its own (np.full, then the live
    values), the KJT keys' padded pieces concatenated."""
    b, h, p, cap = bucket.batch, batch.host, batch.pages.host, bucket.rows
    t = tokens.host
    return {
        "offsets": plain_pad(h["offsets"], b + 1, h["offsets"][-1]),
        "num_candidates": plain_pad(h["num_candidates"], b, 0),
        "page_indptr": plain_pad(p["page_indptr"], b + 1, p["page_indptr"][-1]),
        "cached_lengths": plain_pad(p["cached_lengths"], b, 0),
        "last_page_len": plain_pad(p["last_page_len"], b, 0),
        "page_ids": plain_pad(p["page_ids"], b * pages_per_user, scratch),
        "new_rows": plain_pad(p["new_rows"], cap, 0),
        "new_page": plain_pad(p["new_page"], cap, scratch),
        "new_slot": plain_pad(p["new_slot"], cap, 0),
        "tok_values": np.concatenate([plain_pad(v, cap, 0) for v in t["values"]]),
        "tok_dest": np.concatenate([plain_pad(d, cap, cap) for d in t["dest"]]),
        "tok_lengths": np.concatenate(
            [np.concatenate([plain_pad(n, b, 0), [cap - int(n.sum())]]) for n in t["lengths"]]
        ).astype(np.int64),
        "tok_positions": plain_pad(t["positions"], cap + 1, 0),
        "tok_candidate_rows": plain_pad(t["candidate_rows"], cap, 0),
    }


@pytest.mark.parametrize("page,num_context", [(4, 0), (3, 2), (8, 1)])
def test_staged_step_equals_plain_padding_on_random_batches(page, num_context):
    """`GraphedRanker.stage_step` writes the padded fields straight into one packed buffer: the
    same values, dtypes and layout as padding each field on its own and packing them, on random
    batches of a real planner (odd lengths, page boundaries, empty new histories, cache hits,
    evictions) in buckets of every size, reusing each bucket's buffer layout."""
    from hstu_exp.data.synthetic import make_request
    from hstu_exp.graphs import BucketGraphs, GraphedRanker
    from hstu_exp.kvcache.manager import KVCacheManager
    from hstu_exp.model.embeddings import make_tokens

    rng = random.Random(page * 10 + num_context)
    max_history = 40
    vocab = {"item": 50, "action": 7, "candidate": 50}
    if num_context:
        vocab["context"] = 11
    cache = PagedKVCache(
        num_layers=1,
        num_pages=4 * -(-(max_history + num_context) // page) + 4,  # 4 users and some
        page_size=page,
        num_heads=1,
        head_dim=1,
        dtype=torch.float32,
        device="cpu",
    )
    manager = KVCacheManager(cache)
    core = BucketGraphs(
        device="cpu",
        batch_buckets=[1, 2, 4, 8],
        token_buckets=[8, 16, 32, 64],
        pool=cache.pool,
        page_size=page,
        max_history=max_history + num_context,
        scratch_page=cache.scratch_page,
    )
    runner = GraphedRanker(None, core)
    # every user's one sequence; a request carries a prefix of it (growing, or not)
    items = {u: torch.randint(50, (max_history // 2,)) for u in range(10)}
    context = {u: torch.randint(11, (num_context,)) for u in range(10)}
    met = set()
    for _ in range(60):
        requests = []
        for u in rng.sample(range(10), rng.randint(1, 4)):
            held = cache.cached_length(u) - num_context
            grow = rng.choice([0, 1, page - 1, page, page + 1, 2 * page + 1])
            # now and then a history that shrank (the cache drops the user) or starts afresh
            history = rng.choice([0, 1, page]) if rng.random() < 0.05 else held + grow
            history = min(max(history, 0), max_history)
            n_items = -(-history // 2)
            requests.append(
                make_request(
                    u,
                    context=context[u],
                    items=items[u][:n_items],
                    actions=items[u][: history - n_items] % 7,
                    candidates=torch.randint(50, (rng.choice([1, 2, 5, 13]),)),
                )
            )
        starts, table, _ = manager.plan(requests, upload=False)
        tokens = make_tokens(
            requests,
            starts,
            vocab=vocab,
            num_context=num_context,
            max_history=max_history,
            device="cpu",
            upload=False,
        )
        batch = make_batch(tokens.rows, tokens.num_candidates, "cpu", table, upload=False)
        staged = runner.stage_step(tokens, batch)
        manager.commit()
        want = plain_staging(batch, tokens, staged.bucket, core.pages_per_user, cache.scratch_page)
        assert staged.layout == pack(want, pin=False)[1]
        got = unpack(staged.host, staged.layout)
        for name, a in want.items():
            assert got[name].numpy().dtype == a.dtype, name
            assert got[name].tolist() == a.tolist(), name
        assert staged.rows == tokens.num_rows
        assert staged.candidates == sum(tokens.num_candidates)
        met.add(staged.bucket)
    stats = manager.stats()
    assert len(met) > 5 and stats["evictions"] > 0 and stats["invalidations"] > 0
