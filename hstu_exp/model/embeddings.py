"""Token embeddings of a ranking request: TorchRec tables + learned absolute positions
(docs/design.md §2).

`make_tokens` turns requests into the jagged rows the block consumes: for each user the uncached
tail of its sequence, then its candidates, back to back, no padding. It is host-side bookkeeping
in numpy on the requests' CPU tensors, moved to the device in one non_blocking copy. Only the
`EmbeddingCollection` forward touches device tensors: the GPU test machine carries the CPU build of
fbgemm, so KeyedJaggedTensor.permute, to_padded_dense and torch.ops.fbgemm.* would fail on CUDA
tensors.
Rows are placed by index (`x[dest] = values`), not by any KJT reshuffling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from hstu_exp.data.synthetic import ACTION, CONTEXT, ITEM, Request
from hstu_exp.model.jagged import to_device

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
    num_rows: int  # rows of the output; a graph's padded values land in a spare row past them
    # What the device tensors were made from, for a graph runner that pads them to its bucket:
    # keys; per key its values, dest rows and per-user lengths; positions; candidate rows.
    host: Optional[dict] = None


def _check_vocab(key: str, ids: np.ndarray, vocab: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise ValueError(f"{key} id {int(bad)} is outside the {key} table's vocabulary "
                         f"(0..{vocab - 1})")


def _cat(parts: List[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


def make_tokens(requests: Sequence[Request], starts: Sequence[int], *, vocab: dict,
                num_context: int, max_history: int, device) -> Tokens:
    """Rows for `request.ids[start:]` + candidates of each request, checked against the tables.

    vocab: rows of each KJT key's table (`SequenceEmbeddings.vocab`; no "context" key when the
    model has no context table). Positions count from the start of the history, so a token keeps
    its position as the history grows; candidates share index T (the history length); context
    token j gets its own index max_history + 1 + j.

    Host-side numpy (a few vectorised ops per request, far cheaper than small torch CPU ops),
    then one copy of everything the device needs."""
    B = len(requests)
    kinds, ids, pos, cand_ids, tok_row, cand_row, rows, cands = [], [], [], [], [], [], [], []
    row = 0
    for r, start in zip(requests, starts):
        if r.num_context != num_context:
            raise ValueError(f"user {r.user}: {r.num_context} context tokens, the model takes "
                             f"model.num_context={num_context}")
        if not 0 <= start <= r.seq_len:
            raise ValueError(f"user {r.user}: cached prefix {start} outside its sequence of "
                             f"{r.seq_len} tokens")
        c = r.candidates.numel()
        if c == 0:
            raise ValueError(f"user {r.user}: a ranking request needs at least one candidate")
        if r.history > max_history:
            raise ValueError(f"user {r.user}: {r.history} history tokens, more than the model's "
                             f"max_history={max_history}")
        n = r.seq_len - start
        s = np.arange(start, r.seq_len)
        pos.append(np.where(s < num_context, max_history + 1 + s, s - num_context))
        pos.append(np.full(c, r.history))
        kinds.append(r.kinds.numpy()[start:])
        ids.append(r.ids.numpy()[start:])
        cand_ids.append(r.candidates.numpy())
        # The user's rows are [uncached tokens | candidates], after the previous users' rows.
        tok_row.append(np.arange(row, row + n))
        cand_row.append(np.arange(row + n, row + n + c))
        rows.append(n + c)
        cands.append(c)
        row += n + c
    tok_user = np.repeat(np.arange(B), [r - c for r, c in zip(rows, cands)])
    kinds, ids, tok_row = _cat(kinds), _cat(ids), _cat(tok_row)

    keys = [k for k in KEYS if k in vocab]
    if "context" not in vocab and bool((kinds == CONTEXT).any()):
        raise ValueError("requests carry context tokens but the model has no context table "
                         "(model.num_context=0)")
    values, dest, lengths = [], [], []
    for key in keys:
        if key == "candidate":
            v, d, n_per_user = _cat(cand_ids), _cat(cand_row), np.asarray(cands)
        else:
            m = kinds == _KIND_OF_KEY[key]
            v, d, n_per_user = ids[m], tok_row[m], np.bincount(tok_user[m], minlength=B)
        _check_vocab("item" if key == "candidate" else key, v, vocab[key])
        values.append(v)
        dest.append(d)
        lengths.append(n_per_user)
    # One host->device copy for everything the device needs.
    packed = to_device({"values": _cat(values), "dest": _cat(dest), "positions": _cat(pos),
                        "lengths": _cat(lengths), "candidate_rows": _cat(cand_row)}, device)
    # length_per_key given: the KJT never reads lengths back from the device (no sync, no fbgemm).
    features = KeyedJaggedTensor(keys=keys, values=packed["values"], lengths=packed["lengths"],
                                 stride=B, length_per_key=[v.size for v in values])
    host = {"keys": keys, "values": values, "dest": dest, "lengths": lengths,
            "positions": _cat(pos), "candidate_rows": _cat(cand_row)}
    return Tokens(features=features, dest=packed["dest"], positions=packed["positions"],
                  candidate_rows=packed["candidate_rows"], rows=rows, num_candidates=cands,
                  num_rows=sum(rows), host=host)


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
        self.keys = [k for k in KEYS if k in self.vocab]  # the KJT's keys, in value order
        self.num_context, self.max_history, self.hidden = num_context, max_history, hidden
        # Positions 0..T (T: candidates), then one per context token.
        self.positions = (nn.Embedding(max_history + 1 + num_context, hidden)
                          if position_embedding else None)
        self.scale = math.sqrt(hidden)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """[tokens.num_rows, hidden] in the module's dtype."""
        kjt = tokens.features
        out = self.collection(kjt)
        weight = next(iter(self.collection.parameters()))
        values = torch.cat([out[k].values() for k in kjt.keys()]).to(weight.dtype)
        # Zeros: a graph bucket's dead rows (past the last user) get no value, and stay finite.
        x = torch.zeros(tokens.positions.numel(), self.hidden, dtype=weight.dtype,
                        device=weight.device)
        x[tokens.dest] = values  # every live row is exactly one token or candidate
        if self.positions is not None:
            x = x * self.scale + self.positions(tokens.positions)
        return x[:tokens.num_rows]

    def tokens(self, requests: Sequence[Request], starts: Sequence[int], device) -> Tokens:
        """`make_tokens` with this module's tables and sizes."""
        return make_tokens(requests, starts, vocab=self.vocab, num_context=self.num_context,
                           max_history=self.max_history, device=device)
