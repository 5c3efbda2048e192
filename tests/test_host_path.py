"""The host path of a ranking step, vectorised over the batch, against plain per-user and
per-token reference loops written here (the planner's page lists and LRU, the token rows), on
fresh random batches: odd lengths, page boundaries, empty histories, users with no candidates,
evictions."""

import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from hstu_exp.core.jagged import make_batch, upload_step
from hstu_exp.data.synthetic import make_request
from hstu_exp.kvcache.paged import CacheFullError, PagedKVCache
from hstu_exp.model.embeddings import KEYS, make_tokens


class ListPlanner:
    """The planner's contract, one user and one token at a time: pages handed out low ids
    first, a dropped user's pages reused first-page-first, least-recent users outside the batch
    evicted until the batch fits."""

    def __init__(self, num_pages, page_size):
        self.size, self.free = page_size, list(range(num_pages - 1, -1, -1))
        self.users = OrderedDict()  # user -> [pages, length]

    def plan(self, users, news, cands):
        for u in users:
            self.users.setdefault(u, [[], 0])
            self.users.move_to_end(u)

        def grow(u, n):
            pages, length = self.users[u]
            return max(0, -(-(length + n) // self.size) - len(pages))

        need = sum(grow(u, n) for u, n in zip(users, news))
        while len(self.free) < need:
            victim = next((u for u in self.users if u not in users), None)
            if victim is None:
                raise CacheFullError("full")
            self.free.extend(reversed(self.users.pop(victim)[0]))
        out = {
            k: []
            for k in (
                "page_indptr",
                "page_ids",
                "cached_lengths",
                "last_page_len",
                "new_rows",
                "new_page",
                "new_slot",
            )
        }
        out["page_indptr"].append(0)
        row = 0
        for u, n, c in zip(users, news, cands):
            entry = self.users[u]
            for _ in range(grow(u, n)):
                entry[0].append(self.free.pop())
            start = entry[1]
            for j in range(n):
                p = start + j
                out["new_rows"].append(row + j)
                out["new_page"].append(entry[0][p // self.size])
                out["new_slot"].append(p % self.size)
            entry[1] = start + n
            out["cached_lengths"].append(start)
            out["last_page_len"].append(entry[1] - (len(entry[0]) - 1) * self.size if entry[0] else 0)
            out["page_ids"].extend(entry[0])
            out["page_indptr"].append(len(out["page_ids"]))
            row += n + c
        return out


@pytest.mark.parametrize("page_size,num_pages", [(1, 40), (3, 17), (4, 12), (8, 30)])
def test_planner_equals_per_token_reference(page_size, num_pages):
    rng = random.Random(page_size * 1000 + num_pages)
    cache = PagedKVCache(
        num_layers=1,
        num_pages=num_pages,
        page_size=page_size,
        num_heads=1,
        head_dim=1,
        dtype=torch.float32,
        device="cpu",
    )
    ref = ListPlanner(num_pages, page_size)
    planned = evicted = 0
    for _ in range(60):
        users = rng.sample(range(9), rng.randint(0, 4))
        news = [
            rng.choice([0, 1, page_size - 1, page_size, page_size + 1, rng.randint(0, 9)]) for _ in users
        ]
        cands = [rng.choice([0, 1, rng.randint(0, 5)]) for _ in users]
        try:
            want = ref.plan(users, news, cands)
        except CacheFullError:
            with pytest.raises(CacheFullError):
                cache.plan(users, news, cands)
            cache.reset()
            ref = ListPlanner(num_pages, page_size)
            continue
        before = cache.evictions
        table = cache.plan(users, news, cands, upload=False)
        evicted += cache.evictions - before
        planned += 1
        assert table.page_ids is None  # host only: nothing uploaded
        for key, values in want.items():
            assert table.host[key].tolist() == values, key
        assert table.max_kv_len == max((ref.users[u][1] for u in users), default=0)
        assert list(cache.users) == list(ref.users)  # the same LRU order
        held = np.concatenate([e.pages for e in cache.users.values()] + [cache.free])
        assert sorted(held.tolist()) == list(range(num_pages))  # no page lost or shared
        uploaded = cache.plan([], [], []).upload("cpu")  # an empty batch uploads too
        assert uploaded.page_indptr.tolist() == [0]
    assert planned > 30 and evicted > 0


def reference_rows(requests, starts, num_context, max_history):
    """Per request, per token: (KJT values and dest rows per key, per-user lengths, positions,
    candidate rows)."""
    kind_of = {"context": 0, "item": 1, "action": 2}
    values = {k: [] for k in KEYS}
    dest = {k: [] for k in KEYS}
    lengths = {k: [] for k in KEYS}
    positions, cand_rows, row = [], [], 0
    for r, s0 in zip(requests, starts):
        counts = dict.fromkeys(KEYS, 0)
        for s in range(s0, r.seq_len):
            key = next(k for k, v in kind_of.items() if v == int(r.kinds[s]))
            values[key].append(int(r.ids[s]))
            dest[key].append(row)
            counts[key] += 1
            positions.append(max_history + 1 + s if s < num_context else s - num_context)
            row += 1
        for item in r.candidates.tolist():
            values["candidate"].append(item)
            dest["candidate"].append(row)
            cand_rows.append(row)
            positions.append(r.history)
            counts["candidate"] += 1
            row += 1
        for k in KEYS:
            lengths[k].append(counts[k])
    return values, dest, lengths, positions, cand_rows


@pytest.mark.parametrize("num_context", [0, 1, 3])
def test_token_rows_equal_per_token_reference(num_context):
    rng = random.Random(num_context)
    vocab = {"item": 50, "action": 7, "candidate": 50}
    if num_context:
        vocab["context"] = 11
    for _ in range(20):
        requests, starts = [], []
        for u in range(rng.randint(0, 9)):  # an empty batch too
            items = rng.choice([0, 1, rng.randint(0, 12)])
            actions = items - rng.randint(0, 1) if items else 0
            r = make_request(
                u,
                context=torch.randint(11, (num_context,)),
                items=torch.randint(50, (items,)),
                actions=torch.randint(7, (actions,)),
                candidates=torch.randint(50, (rng.randint(1, 4),)),
            )
            requests.append(r)
            starts.append(rng.choice([0, r.seq_len, rng.randint(0, r.seq_len)]))
        tokens = make_tokens(
            requests,
            starts,
            vocab=vocab,
            num_context=num_context,
            max_history=30,
            device="cpu",
            upload=False,
        )
        values, dest, lengths, positions, cand_rows = reference_rows(requests, starts, num_context, 30)
        keys = tokens.host["keys"]
        assert keys == [k for k in KEYS if k in vocab]
        for i, k in enumerate(keys):
            assert tokens.host["values"][i].tolist() == values[k]
            assert tokens.host["dest"][i].tolist() == dest[k]
            assert tokens.host["lengths"][i].tolist() == lengths[k]
        assert tokens.host["positions"].tolist() == positions
        assert tokens.host["candidate_rows"].tolist() == cand_rows
        assert tokens.num_rows == len(positions) and tokens.features is None


def test_one_upload_equals_separate_uploads():
    """upload_step: page table, batch and token rows in one buffer, the same tensors as the
    three separate uploads."""
    cache = PagedKVCache(
        num_layers=1,
        num_pages=20,
        page_size=4,
        num_heads=1,
        head_dim=1,
        dtype=torch.float32,
        device="cpu",
    )
    requests = [
        make_request(
            u,
            items=torch.randint(50, (n,)),
            actions=torch.randint(7, (n,)),
            candidates=torch.randint(50, (c,)),
        )
        for u, n, c in [(0, 5, 2), (1, 0, 1), (2, 9, 3)]
    ]
    vocab = {"item": 50, "action": 7, "candidate": 50}
    news = [r.seq_len for r in requests]
    host = cache.plan([0, 1, 2], news, [2, 1, 3], upload=False)
    tokens = make_tokens(
        requests, [0, 0, 0], vocab=vocab, num_context=0, max_history=30, device="cpu", upload=False
    )
    batch, up = upload_step(
        make_batch(tokens.rows, tokens.num_candidates, "cpu", host, upload=False), tokens, "cpu"
    )
    separate = make_batch(tokens.rows, tokens.num_candidates, "cpu", host.upload("cpu"))
    alone = tokens.upload("cpu")
    for name in ("offsets", "num_candidates"):
        assert torch.equal(getattr(batch, name), getattr(separate, name))
    for name in (
        "page_indptr",
        "page_ids",
        "cached_lengths",
        "last_page_len",
        "new_rows",
        "new_page",
        "new_slot",
    ):
        assert torch.equal(getattr(batch.pages, name), getattr(separate.pages, name)), name
    for name in ("dest", "positions", "candidate_rows"):
        assert torch.equal(getattr(up, name), getattr(alone, name))
    assert torch.equal(up.features.values(), alone.features.values())
    assert torch.equal(up.features.lengths(), alone.features.lengths())


def test_bad_request_names_the_first_offender():
    vocab = {"item": 50, "action": 7, "candidate": 50}
    ok = make_request(0, items=[1, 2], actions=[1, 2], candidates=[3])
    none = make_request(1, items=[1], actions=[1], candidates=[])
    long = make_request(2, items=list(range(20)), actions=[1] * 20, candidates=[3])
    with pytest.raises(ValueError, match="user 1: a ranking request needs at least one"):
        make_tokens(
            [ok, none, long], [0, 0, 0], vocab=vocab, num_context=0, max_history=30, device="cpu"
        )
    with pytest.raises(ValueError, match="user 2: 40 history tokens, more than"):
        make_tokens([ok, long], [0, 0], vocab=vocab, num_context=0, max_history=30, device="cpu")
    with pytest.raises(ValueError, match="user 0: cached prefix 5 outside its sequence of 4"):
        make_tokens([ok], [5], vocab=vocab, num_context=0, max_history=30, device="cpu")


def test_pages_the_record_does_not_cover_are_not_served():
    """The manager compares a request with the bytes of the one that left its user's K/V
    cached: where the pages hold more tokens than that record, the extra ones were never checked
    and are dropped, not served."""
    from hstu_exp.kvcache.manager import KVCacheManager

    cache = PagedKVCache(
        num_layers=1,
        num_pages=8,
        page_size=4,
        num_heads=1,
        head_dim=1,
        dtype=torch.float32,
        device="cpu",
    )
    manager = KVCacheManager(cache)
    first = make_request(0, items=[1, 2, 3], actions=[4, 5, 6], candidates=[7])
    longer = make_request(0, items=[1, 2, 3, 8], actions=[4, 5, 6, 9], candidates=[7])
    manager.plan([first], upload=False)
    assert manager.lookup(longer) == 6  # the record covers the 6 cached tokens
    cache.users[0].length += 2  # pages now claim 8 tokens; the record holds 6
    assert manager.lookup(longer) == 0
    assert cache.cached_length(0) == 0  # dropped
