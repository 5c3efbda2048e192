"""Token rows of the ranking model: real TorchRec tables, checked row by row against a direct
lookup in the tables' weights (no KJT, no index bookkeeping in the reference)."""

import math
import random

import pytest
import torch

from hstu_exp.data.synthetic import ACTION, CONTEXT, ITEM, make_request
from hstu_exp.model.embeddings import SequenceEmbeddings


def make_module(*, hidden=8, num_context=2, position_embedding=True, max_history=40):
    torch.manual_seed(random.randrange(1 << 30))
    return SequenceEmbeddings(
        hidden=hidden,
        item_vocab=50,
        action_vocab=7,
        num_context=num_context,
        context_vocab=11,
        max_history=max_history,
        position_embedding=position_embedding,
    )


def random_request(user, *, num_context, max_history=40):
    items = random.randint(0, max_history // 2)
    actions = items - random.randint(0, 1) if items else 0
    return make_request(
        user,
        context=torch.randint(11, (num_context,)),
        items=torch.randint(50, (items,)),
        actions=torch.randint(7, (actions,)),
        candidates=torch.randint(50, (random.randint(1, 5),)),
    )


def expected_rows(emb: SequenceEmbeddings, request, start: int) -> torch.Tensor:
    tables = emb.collection.embeddings
    weight = {
        CONTEXT: tables["context_table"].weight if emb.num_context else None,
        ITEM: tables["item_table"].weight,
        ACTION: tables["action_table"].weight,
    }
    C, T = request.num_context, request.history
    rows, positions = [], []
    for s in range(start, request.seq_len):
        rows.append(weight[int(request.kinds[s])][int(request.ids[s])])
        positions.append(emb.max_history + 1 + s if s < C else s - C)
    for item in request.candidates.tolist():
        rows.append(weight[ITEM][item])
        positions.append(T)  # every candidate sits at index T
    x = torch.stack(rows)
    if emb.positions is not None:
        x = x * math.sqrt(emb.hidden) + emb.positions.weight[torch.tensor(positions)]
    return x


@pytest.mark.parametrize("num_context,position_embedding", [(0, True), (3, True), (2, False)])
def test_rows_equal_a_direct_table_lookup(num_context, position_embedding):
    emb = make_module(num_context=num_context, position_embedding=position_embedding)
    requests = [random_request(u, num_context=num_context) for u in range(5)]
    starts = [random.randint(0, r.seq_len) for r in requests]
    tokens = emb.tokens(requests, starts, "cpu")
    with torch.no_grad():
        x = emb(tokens)
        want = [expected_rows(emb, r, s) for r, s in zip(requests, starts)]
    # jagged, no padding: each user's uncached tokens then its candidates, back to back
    assert tokens.rows == [r.seq_len - s + r.candidates.numel() for r, s in zip(requests, starts)]
    torch.testing.assert_close(x, torch.cat(want), rtol=1e-6, atol=1e-6)
    cand = torch.cat([w[-r.candidates.numel() :] for w, r in zip(want, requests)])
    torch.testing.assert_close(x[tokens.candidate_rows], cand, rtol=1e-6, atol=1e-6)


def test_tables_come_from_the_sizes_and_candidates_share_the_item_table():
    emb = make_module(hidden=16, num_context=2)
    tables = emb.collection.embeddings
    assert tables["item_table"].weight.shape == (50, 16)
    assert tables["action_table"].weight.shape == (7, 16)
    assert tables["context_table"].weight.shape == (11, 16)
    assert "context_table" not in make_module(num_context=0).collection.embeddings
    assert emb.positions.weight.shape == (40 + 1 + 2, 16)
    feature_names = {t.name: t.feature_names for t in emb.collection.embedding_configs()}
    assert feature_names["item_table"] == ["item", "candidate"]


def test_the_kjt_holds_each_users_new_tokens_per_feature():
    emb = make_module(num_context=1)
    r0 = make_request(0, context=[4], items=[1, 2, 3], actions=[5, 6, 0], candidates=[9, 8])
    r1 = make_request(1, context=[7], items=[10, 11], actions=[3], candidates=[12])
    tokens = emb.tokens([r0, r1], [3, 0], "cpu")  # r0: context, i1, a1 cached
    jt = tokens.features.to_dict()
    assert tokens.features.keys() == ["context", "item", "action", "candidate"]
    assert jt["context"].lengths().tolist() == [0, 1]
    assert jt["item"].values().tolist() == [2, 3, 10, 11]
    assert jt["item"].lengths().tolist() == [2, 2]
    assert jt["action"].values().tolist() == [6, 0, 3]
    assert jt["candidate"].values().tolist() == [9, 8, 12]
    assert tokens.rows == [4 + 2, 4 + 1]
    assert tokens.candidate_rows.tolist() == [4, 5, 10]
    # positions: r0 history tokens 2..5 (i2 a2 i3 a3), candidates at T = 6; r1 context 41
    assert tokens.positions.tolist() == [2, 3, 4, 5, 6, 6, 41, 0, 1, 2, 3]


def test_a_token_keeps_its_position_as_the_history_grows():
    emb = make_module(num_context=2)
    r = random_request(0, num_context=2)
    with torch.no_grad():
        full = emb(emb.tokens([r], [0], "cpu"))
        tail = emb(emb.tokens([r], [r.seq_len // 2], "cpu"))
    torch.testing.assert_close(tail, full[r.seq_len // 2 :])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(items=[50], actions=[0], candidates=[1]),
            "item id 50 is outside the item table's vocabulary (0..49)",
        ),
        (
            dict(items=[1], actions=[-1], candidates=[1]),
            "action id -1 is outside the action table's vocabulary (0..6)",
        ),
        (
            dict(items=[1], actions=[1], candidates=[1, 77]),
            "item id 77 is outside the item table's vocabulary (0..49)",
        ),
        (
            dict(items=[1], actions=[1], candidates=[], context=[0, 1]),
            "user 3: a ranking request needs at least one candidate",
        ),
        (
            dict(items=[1], actions=[1], candidates=[1], context=[0, 11]),
            "context id 11 is outside the context table's vocabulary (0..10)",
        ),
        (
            dict(items=[1], actions=[1], candidates=[1], context=[0]),
            "user 3: 1 context tokens, the model takes model.num_context=2",
        ),
    ],
)
def test_bad_requests_get_one_clear_line(kwargs, message):
    emb = make_module(num_context=2)
    kwargs.setdefault("context", [0, 1])
    with pytest.raises(ValueError) as err:
        emb.tokens([make_request(3, **kwargs)], [0], "cpu")
    assert str(err.value) == message


def test_a_history_longer_than_the_model_takes_is_refused():
    emb = make_module(num_context=0, max_history=4)
    r = make_request(2, items=[1, 2, 3], actions=[1, 2], candidates=[1])
    with pytest.raises(
        ValueError, match="user 2: 5 history tokens, more than the model's max_history=4"
    ):
        emb.tokens([r], [0], "cpu")
