"""Token embeddings of a ranking request: TorchRec tables + learned absolute positions (DESIGN §2).

`make_tokens` turns requests into the jagged rows the block consumes: for each user the uncached
tail of its sequence, then its candidates, back to back, no padding. It is host-side bookkeeping
in plain torch on CPU tensors, moved to the device in one copy. Only the `EmbeddingCollection`
forward touches device tensors: the GPU test machine carries the CPU build of fbgemm, so
KeyedJaggedTensor.permute, to_padded_dense and torch.ops.fbgemm.* would fail on CUDA tensors.
Rows are placed by index (`x[dest] = values`), not by any KJT reshuffling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from hstu_exp.data.synthetic import ACTION, CONTEXT, ITEM, Request

# KJT keys, in the order their values are laid out. Candidates share the item table.
KEYS = ("context", "item", "action", "candidate")
_KIND_OF_KEY = {"context": CONTEXT, "item": ITEM, "action": ACTION}


@dataclass
class Tokens:
    """Rows of one batch, ready for `SequenceEmbeddings.forward` (device tensors)."""

    features: KeyedJaggedTensor  # keys KEYS, one bag per (key, user)
    dest: torch.Tensor  # [values] int64: row of each KJT value, in KJT value order
    positions: torch.Tensor  # [rows] int64: position-table index of each row
    candidate_rows: torch.Tensor  # [sum c] int64: rows of the candidates, user by user
    rows: List[int]  # host-side: rows per user (uncached tokens + candidates)
    num_candidates: List[int]


def _check_vocab(key: str, ids: torch.Tensor, vocab: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise ValueError(f"{key} id {int(bad)} is outside the {key} table's vocabulary "
                         f"(0..{vocab - 1})")


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.new_zeros(1), t.cumsum(0)[:-1]])


def make_tokens(requests: Sequence[Request], starts: Sequence[int], *, vocab: dict,
                num_context: int, max_history: int, device) -> Tokens:
    """Rows for `request.ids[start:]` + candidates of each request, checked against the tables.

    vocab: rows of each KJT key's table (`SequenceEmbeddings.vocab`; no "context" key when the
    model has no context table). Positions count from the start of the history, so a token keeps
    its position as the history grows; candidates share index T (the history length); context
    token j gets its own index max_history + 1 + j."""
    B = len(requests)
    kinds, ids, pos, cand_ids, news, cands = [], [], [], [], [], []
    for r, start in zip(requests, starts):
        if r.num_context != num_context:
            raise ValueError(f"user {r.user}: {r.num_context} context tokens, the model takes "
                             f"model.num_context={num_context}")
        if not 0 <= start <= r.seq_len:
            raise ValueError(f"user {r.user}: cached prefix {start} outside its sequence of "
                             f"{r.seq_len} tokens")
        if r.candidates.numel() == 0:
            raise ValueError(f"user {r.user}: a ranking request needs at least one candidate")
        if r.history > max_history:
            raise ValueError(f"user {r.user}: {r.history} history tokens, more than the model's "
                             f"max_history={max_history}")
        s = torch.arange(start, r.seq_len)
        pos.append(torch.where(s < num_context, max_history + 1 + s, s - num_context))
        pos.append(torch.full((r.candidates.numel(),), r.history, dtype=torch.int64))
        kinds.append(r.kinds[start:])
        ids.append(r.ids[start:])
        cand_ids.append(r.candidates)
        news.append(r.seq_len - start)
        cands.append(r.candidates.numel())
    rows = [n + c for n, c in zip(news, cands)]
    offsets = _exclusive_cumsum(torch.tensor(rows, dtype=torch.int64))
    news_t, cands_t = torch.tensor(news, dtype=torch.int64), torch.tensor(cands, dtype=torch.int64)
    # Row of each uncached token and candidate, and its user (for the per-bag lengths).
    tok_user = torch.repeat_interleave(torch.arange(B), news_t)
    tok_row = offsets[tok_user] + torch.arange(tok_user.numel()) - \
        _exclusive_cumsum(news_t)[tok_user]
    cand_user = torch.repeat_interleave(torch.arange(B), cands_t)
    cand_row = offsets[cand_user] + news_t[cand_user] + torch.arange(cand_user.numel()) - \
        _exclusive_cumsum(cands_t)[cand_user]
    kinds, ids, cand_ids = torch.cat(kinds), torch.cat(ids), torch.cat(cand_ids)

    keys = [k for k in KEYS if k in vocab]
    if "context" not in vocab and bool((kinds == CONTEXT).any()):
        raise ValueError("requests carry context tokens but the model has no context table "
                         "(model.num_context=0)")
    values, dest, lengths = [], [], []
    for key in keys:
        if key == "candidate":
            v, d, u = cand_ids, cand_row, cand_user
        else:
            m = kinds == _KIND_OF_KEY[key]
            v, d, u = ids[m], tok_row[m], tok_user[m]
        _check_vocab("item" if key == "candidate" else key, v, vocab[key])
        values.append(v)
        dest.append(d)
        lengths.append(torch.bincount(u, minlength=B))
    length_per_key = [v.numel() for v in values]
    # One host->device copy for everything the device needs.
    packed = torch.cat(values + dest + pos + lengths + [cand_row]).to(device)
    n_val, n_rows = sum(length_per_key), sum(rows)
    values_d, dest_d, pos_d, len_d, cand_d = packed.split(
        [n_val, n_val, n_rows, len(keys) * B, cand_row.numel()])
    # length_per_key given: the KJT never reads lengths back from the device (no sync, no fbgemm).
    features = KeyedJaggedTensor(keys=keys, values=values_d, lengths=len_d, stride=B,
                                 length_per_key=length_per_key)
    return Tokens(features=features, dest=dest_d, positions=pos_d, candidate_rows=cand_d,
                  rows=rows, num_candidates=cands)


class SequenceEmbeddings(nn.Module):
    def __init__(self, *, hidden: int, item_vocab: int, action_vocab: int, num_context: int,
                 context_vocab: int, max_history: int, position_embedding: bool):
        super().__init__()
        # Table names must not clash with ModuleDict attributes ("items", "values", ...).
        tables = [EmbeddingConfig(name="item_table", embedding_dim=hidden,
                                  num_embeddings=item_vocab, feature_names=["item", "candidate"]),
                  EmbeddingConfig(name="action_table", embedding_dim=hidden,
                                  num_embeddings=action_vocab, feature_names=["action"])]
        if num_context:
            tables.append(EmbeddingConfig(name="context_table", embedding_dim=hidden,
                                          num_embeddings=context_vocab,
                                          feature_names=["context"]))
        self.collection = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
        self.vocab = {"item": item_vocab, "action": action_vocab, "candidate": item_vocab}
        if num_context:
            self.vocab["context"] = context_vocab
        self.num_context, self.max_history, self.hidden = num_context, max_history, hidden
        # Positions 0..T (T: candidates), then one per context token.
        self.positions = (nn.Embedding(max_history + 1 + num_context, hidden)
                          if position_embedding else None)
        self.scale = math.sqrt(hidden)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """[rows, hidden] in the module's dtype."""
        kjt = tokens.features
        out = self.collection(kjt)
        weight = next(iter(self.collection.parameters()))
        values = torch.cat([out[k].values() for k in kjt.keys()]).to(weight.dtype)
        x = torch.empty(tokens.positions.numel(), self.hidden, dtype=weight.dtype,
                        device=weight.device)
        x[tokens.dest] = values  # every row is exactly one token or candidate
        if self.positions is not None:
            x = x * self.scale + self.positions(tokens.positions)
        return x

    def tokens(self, requests: Sequence[Request], starts: Sequence[int], device) -> Tokens:
        """`make_tokens` with this module's tables and sizes."""
        return make_tokens(requests, starts, vocab=self.vocab, num_context=self.num_context,
                           max_history=self.max_history, device=device)
