"""The start-up warm-up's graph buckets (CPU): `all_buckets` lists every bucket a batch of valid
requests falls in, and the synthetic batch it captures each bucket from is staged exactly as a real
batch of that bucket is (same arrays, dtypes, shapes: a replay copies one over the other). The
capture itself needs CUDA: test_graphs_gpu covers it."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hstu_exp.core.buckets import Bucket, all_buckets
from hstu_exp.core.jagged import make_batch
from hstu_exp.data.synthetic import make_request
from hstu_exp.graphs import BucketGraphs, GraphedRanker, pad_metadata, pad_tokens
from hstu_exp.kvcache.paged import PagedKVCache
from hstu_exp.model.embeddings import SequenceEmbeddings

HISTORY, CANDIDATES, PAGE = 24, 6, 4
BATCHES, TOKENS = [1, 2, 4], [8, 16, 32]


def test_enumeration_of_a_small_config():
    kw = dict(batch_buckets=[1, 2], token_buckets=[8, 16], page_size=4, max_history=16)
    # kv sizes 4, 8, 16; a user of more than 8 rows (at most 4 candidates) has 5+ new keys
    expected = [
        Bucket(b, t, kv) for b in (1, 2) for t, kv in [(8, 4), (8, 8), (8, 16), (16, 8), (16, 16)]
    ]
    assert all_buckets(**kw, max_candidates=4) == expected
    assert len(all_buckets(**kw)) == 2 * 2 * 3  # candidates unknown: nothing ruled out
    assert all_buckets(**{**kw, "page_size": 0}, max_candidates=4) == [
        Bucket(b, t) for b in (1, 2) for t in (8, 16)
    ]
    # fit_rows: b2 x t16 x kv8 holds 10 (a user of 9+ rows and another of 1+) to 24 rows (two
    # of 8 keys + 4 candidates): padded to 16 or to batch x tokens (32, fit 0)
    fits = [
        x.fit
        for x in all_buckets(**kw, fit=True, max_candidates=4)
        if (x.batch, x.tokens, x.kv) == (2, 16, 8)
    ]
    assert fits == [16, 0]
    # the longest token bucket no request reaches (16 keys + 4 candidates < 21) is left out
    wide = all_buckets(**{**kw, "token_buckets": [8, 16, 32, 64]}, max_candidates=4)
    assert {x.tokens for x in wide} == {8, 16, 32}


def embeddings(num_context):
    torch.manual_seed(0)
    return SequenceEmbeddings(
        hidden=8,
        item_vocab=50,
        action_vocab=7,
        num_context=num_context,
        context_vocab=11,
        max_history=HISTORY,
        position_embedding=True,
    )


def small_cache() -> PagedKVCache:
    return PagedKVCache(
        num_layers=1,
        num_pages=96,
        page_size=PAGE,
        num_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
    )


def runner(paged, fit, num_context):
    cache = small_cache()
    core = BucketGraphs(
        device="cpu",
        batch_buckets=BATCHES,
        token_buckets=TOKENS,
        pool=cache.kv if paged else None,
        page_size=PAGE if paged else 0,
        max_history=num_context + HISTORY,
        scratch_page=cache.scratch_page,
        fit_rows=fit,
        max_candidates=CANDIDATES,
        num_context=num_context,
    )
    model = SimpleNamespace(embeddings=embeddings(num_context))
    return GraphedRanker(model, core), cache


def random_step(rng, ranker, cache, paged, num_context):
    """A real batch: distinct users, each a longer history than the cache holds of it (a user at
    the longest history starts over), random candidates; planned by the cache when paged."""
    users = rng.sample(range(12), rng.randint(1, max(BATCHES)))
    requests, starts = [], []
    for user in users:
        cached = cache.cached_length(user) if paged else 0
        if cached >= num_context + HISTORY:
            cache.drop(user)
            cached = 0
        history = rng.randint(max(0, cached - num_context), HISTORY)
        items = (history + 1) // 2
        requests.append(
            make_request(
                user,
                context=torch.zeros(num_context, dtype=torch.int64),
                items=torch.randint(50, (items,)),
                actions=torch.randint(7, (history - items,)),
                candidates=torch.randint(50, (rng.randint(1, CANDIDATES),)),
            )
        )
        starts.append(cached)
    tokens = ranker.model.embeddings.tokens(requests, starts, "cpu", upload=False)
    table = None
    if paged:
        new = [r.seq_len - s for r, s in zip(requests, starts)]
        table = cache.plan(users, new, tokens.num_candidates, upload=False)
    return tokens, make_batch(tokens.rows, tokens.num_candidates, "cpu", table, upload=False)


def staged_arrays(ranker, tokens, batch, bucket):
    arrays = ranker.core.pad(batch, bucket)
    arrays.update(pad_tokens(tokens, bucket))
    return arrays


def shapes(arrays):
    return {k: (a.dtype, a.shape) for k, a in arrays.items()}


@pytest.mark.parametrize(
    "paged,fit,num_context",
    [(True, False, 0), (True, True, 0), (False, False, 0), (False, True, 1), (True, False, 1)],
)
def test_every_met_bucket_is_enumerated_and_staged_like_its_synthetic_batch(paged, fit, num_context):
    rng = random.Random(7)
    torch.manual_seed(7)
    ranker, cache = runner(paged, fit, num_context)
    listed = ranker.core.buckets()
    assert len(set(listed)) == len(listed)
    met = set()
    for _ in range(300):
        tokens, batch = random_step(rng, ranker, cache, paged, num_context)
        bucket = ranker.core.bucket_for(batch)
        assert bucket in listed, bucket
        if bucket not in met:  # a real batch and the synthetic one: the same staged layout
            met.add(bucket)
            real = staged_arrays(ranker, tokens, batch, bucket)
            synthetic = staged_arrays(ranker, *ranker.synthetic_step(bucket), bucket)
            assert shapes(synthetic) == shapes(real), bucket
    assert len(met) >= len(listed) // 4  # the random batches reached a good share of them
    for bucket in listed:  # every listed bucket has a batch of valid requests (the synthetic)
        ranker.synthetic_step(bucket)  # raises where the batch falls in another bucket


def test_synthetic_batch_is_full_length_work_on_real_pages():
    ranker, cache = runner(paged=True, fit=False, num_context=0)
    core = ranker.core
    for bucket in core.buckets():
        tokens, batch = ranker.synthetic_step(bucket)
        a = staged_arrays(ranker, tokens, batch, bucket)
        offsets = a["offsets"]
        assert (np.diff(offsets) >= 0).all() and offsets[-1] <= bucket.rows
        live = batch.batch_size
        rows = np.diff(offsets)[:live]
        assert rows.max() > max([t for t in TOKENS if t < bucket.tokens], default=0)
        assert 0 <= a["page_ids"].min() and a["page_ids"].max() <= cache.scratch_page
        pages = batch.pages.host
        new = rows - a["num_candidates"][:live]
        # every user holds bucket.kv keys after the batch: cached prefix + new history
        assert (a["cached_lengths"][:live] + new == bucket.kv).all(), bucket
        assert (a["cached_lengths"][live:] == 0).all()
        assert (pages["page_ids"] < cache.scratch_page).all()  # reads real pages...
        assert (a["new_page"] == cache.scratch_page).all()  # ...appends only to the scratch page
        assert a["num_candidates"][:live].min() >= 1
        assert a["tok_values"].max() == 0  # token ids 0
    # the table is laid out as PagedKVCache.plan lays out a user of 14 cached keys and 10 new
    bucket = Bucket(1, 16, 24)
    tokens, batch = ranker.synthetic_step(bucket)
    assert tokens.rows == [16] and tokens.num_candidates == [CANDIDATES]
    real = small_cache()
    real.plan([0], [14], [0])
    plan = real.plan([0], [10], [CANDIDATES], upload=False).host
    mine = batch.pages.host
    assert mine.keys() == plan.keys()
    for key in ("page_indptr", "cached_lengths", "last_page_len", "new_rows", "new_slot"):
        assert mine[key].tolist() == plan[key].tolist(), key
        assert mine[key].dtype == plan[key].dtype, key
    padded = pad_metadata(batch, bucket, pages_per_user=core.pages_per_user, scratch_page=core.scratch)
    assert padded["page_ids"].size == core.pages_per_user


def test_too_many_buckets_for_max_graphs_is_refused():
    ranker, _ = runner(paged=True, fit=True, num_context=0)
    ranker.core.max_graphs = 8
    with pytest.raises(ValueError, match="graph.max_graphs=8"):
        ranker.capture_all()


def test_eager_warm_up_runs_every_shape_the_attention_tuner_can_meet(monkeypatch):
    """An eager server's kernels tune per (batch size, rows, KV) in powers of two: the warm-up's
    synthetic batches (`builders.eager_shapes`, `RequestPath.tune_shapes`) meet every key that
    random batches of returns and misses meet, and leave every user's pages as they were."""
    from test_e2e import make_cache, make_model, random_users, request

    import hstu_exp.serving.path as path_mod
    from hstu_exp.builders import eager_shapes
    from hstu_exp.kvcache.manager import KVCacheManager
    from hstu_exp.ops.triton_attention import TUNE_FLOOR, _bucket
    from hstu_exp.serving.path import RequestPath

    history, most = 300, 6  # rows reach 2 + 300 + 6: keys 64 .. 512
    model = make_model(max_history=history)
    cache = make_cache("paged", num_pages=300, host_pages=0)
    path = RequestPath(model, device="cpu", manager=KVCacheManager(cache))
    keys, forward = [], path_mod.forward_rows

    def spy(model, tokens, batch, pool, on_layer):  # the real forward; notes the tuner's key
        keys.append(_bucket(True, batch.batch_size, 2, 8, None, batch.max_len, batch.pages.max_kv_len))
        return forward(model, tokens, batch, pool, on_layer)

    monkeypatch.setattr(path_mod, "forward_rows", spy)
    sizes = SimpleNamespace(num_context=2, max_history=history, max_candidates=most)
    shapes = eager_shapes(sizes, cache, max_batch=4, device="cpu")
    pages = cache.pool[:, : cache.scratch_page].clone()
    assert path.tune_shapes(shapes) == len(shapes.buckets()) == len(keys)
    assert torch.equal(cache.pool[:, : cache.scratch_page], pages) and not cache.users
    enumerated, keys[:] = set(keys), []
    assert min(k[-1] for k in enumerated) == TUNE_FLOOR and max(k[-2] for k in enumerated) == 512

    seqs = random_users(40, max_history=history)
    held = [0] * len(seqs)
    for _ in range(60):  # returns of a few tokens, misses of whole histories, 1..4 users
        batch = []
        for u in random.sample(range(len(seqs)), random.randint(1, 4)):
            held[u] = random.choice(
                [min(held[u] + random.randint(0, 9), history), random.randint(0, history)]
            )
            batch.append(request(seqs, u, held[u]))
        path.serve(batch)
    met = set(keys)
    assert len(met) > 5 and met <= enumerated, sorted(met - enumerated)
