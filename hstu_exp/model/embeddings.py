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
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from hstu_exp.core.jagged import per_user, to_device
from hstu_exp.data.synthetic import ACTION, CONTEXT, ITEM, Request

# KJT keys, in the order their values are laid out. Candidates share the item table.
KEYS = ("context", "item", "action", "candidate")
_KIND_OF_KEY = {"context": CONTEXT, "item": ITEM, "action": ACTION}
_KEY_OF_KIND = sorted(_KIND_OF_KEY, key=_KIND_OF_KEY.get)  # by kind code


@dataclass
class Tokens:
    """Rows of one batch for `SequenceEmbeddings.forward`: device tensors once uploaded (None
    while the rows exist on the host alone: `make_tokens(upload=False)`)."""

    features: Optional[KeyedJaggedTensor]  # keys KEYS, one bag per (key, user)
    dest: Optional[torch.Tensor]  # [values] int64: row of each KJT value, in KJT value order
    positions: Optional[torch.Tensor]  # [rows] int64: position-table index of each row
    candidate_rows: Optional[torch.Tensor]  # [sum c] int64: rows of the candidates, by user
    rows: Sequence[int]  # host-side: rows per user (uncached tokens + candidates)
    num_candidates: Sequence[int]
    num_rows: int  # rows of the output; a graph's padded values land in a spare row past them
    # What the device tensors are made from, for an upload or a graph runner that pads them to
    # its bucket: keys; per key its values, dest rows and per-user lengths; positions;
    # candidate rows.
    host: Optional[dict] = None

    def device_arrays(self) -> Dict[str, np.ndarray]:
        """The host arrays the device needs, flat (`with_views` takes them back as tensors)."""
        h = self.host
        return {
            "values": _cat(h["values"]),
            "dest": _cat(h["dest"]),
            "positions": h["positions"],
            "lengths": _cat(h["lengths"]),
            "candidate_rows": h["candidate_rows"],
        }

    def with_views(self, views: Dict[str, torch.Tensor]) -> "Tokens":
        # length_per_key given: the KJT never reads lengths back from the device (no sync, no
        # fbgemm).
        features = KeyedJaggedTensor(
            keys=self.host["keys"],
            values=views["values"],
            lengths=views["lengths"],
            stride=len(self.rows),
            length_per_key=[v.size for v in self.host["values"]],
        )
        return replace(
            self,
            features=features,
            dest=views["dest"],
            positions=views["positions"],
            candidate_rows=views["candidate_rows"],
        )

    def upload(self, device) -> "Tokens":
        return self.with_views(to_device(self.device_arrays(), device))


def _check_vocab(key: str, ids: np.ndarray, vocab: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise ValueError(f"{key} id {int(bad)} is outside the {key} table's vocabulary (0..{vocab - 1})")


def _cat(parts: List[np.ndarray]) -> np.ndarray:
    """One int64 array of the parts (a single part as it is: nothing writes into these)."""
    if len(parts) == 1:
        return parts[0].astype(np.int64, copy=False)
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


def _check_requests(requests, starts, *, num_context: int, max_history: int) -> None:
    """The first request (in batch order) that breaks a rule, by its first broken rule."""
    for r, start in zip(requests, starts):
        _, ids, cands = r.arrays
        if r.num_context != num_context:
            why = f"{r.num_context} context tokens, the model takes model.num_context={num_context}"
        elif not 0 <= start <= ids.size:
            why = f"cached prefix {start} outside its sequence of {ids.size} tokens"
        elif cands.size == 0:
            why = "a ranking request needs at least one candidate"
        elif ids.size - r.num_context > max_history:
            why = f"{r.history} history tokens, more than the model's max_history={max_history}"
        else:
            continue
        raise ValueError(f"user {r.user}: {why}")


def make_tokens(
    requests: Sequence[Request],
    starts: Sequence[int],
    *,
    vocab: dict,
    num_context: int,
    max_history: int,
    device,
    upload: bool = True,
) -> Tokens:
    """Rows for `request.ids[start:]` + candidates of each request, checked against the tables.

    vocab: rows of each KJT key's table (`SequenceEmbeddings.vocab`; no "context" key when the
    model has no context table). Positions count from the start of the history, so a token keeps
    its position as the history grows; candidates share index T (the history length); context
    token j gets its own index max_history + 1 + j.

    Host-side: per-user sizes as Python ints (a batch has a few users), per-token arrays with a
    fixed number of numpy calls whatever the batch size (each costs about a microsecond, the
    step's host time at batch 1 is mostly such calls), then one copy of everything the device
    needs; upload=False leaves that copy to the caller (`jagged.upload_step`) or a graph
    runner."""
    B = len(requests)
    starts = [int(s) for s in starts]
    _check_requests(requests, starts, num_context=num_context, max_history=max_history)
    arrays = [r.arrays for r in requests]
    n = [ids.size - s for (_, ids, _), s in zip(arrays, starts)]  # uncached tokens per user
    c = [cands.size for _, _, cands in arrays]
    kinds = _cat([k[s:] for (k, _, _), s in zip(arrays, starts)])
    ids = _cat([i[s:] for (_, i, _), s in zip(arrays, starts)])
    cand_ids = _cat([cands for _, _, cands in arrays])
    # The user's rows are [uncached tokens | candidates], after the previous users' rows. Token
    # k of the batch (user u's) sits in row k + (candidates before u) and is token
    # k + start_u - (tokens before u) of u's sequence; candidate i (user u's) sits in row
    # i + (tokens up to and with u's), at position history_u.
    tokens_before = list(accumulate(n, initial=0))
    cands_before = list(accumulate(c, initial=0))
    k = np.arange(tokens_before[-1])
    tok_row = k + per_user(cands_before[:-1], n)
    seq_index = k + per_user([s - t for s, t in zip(starts, tokens_before)], n)
    cand_row = np.arange(cands_before[-1]) + per_user(tokens_before[1:], c)
    rows = [a + b for a, b in zip(n, c)]
    pos = np.empty(tokens_before[-1] + cands_before[-1], np.int64)
    pos[cand_row] = per_user([r.history for r in requests], c)
    if num_context:
        seq_index = np.where(
            seq_index < num_context, max_history + 1 + seq_index, seq_index - num_context
        )
    pos[tok_row] = seq_index

    # Tokens grouped by kind (a stable sort keeps each kind's in batch order): each KJT key's
    # values are one slice of them.
    # (int8 kinds: numpy sorts them by radix, in linear time; array methods, not np.argsort
    # and the like: numpy's function wrappers cost about a microsecond a call)
    order = kinds.astype(np.int8).argsort(kind="stable")
    by_kind, rows_by_kind = ids[order], tok_row[order]
    per_kind = np.bincount(kinds, minlength=len(_KIND_OF_KEY))
    if B == 1:  # the one user's tokens of each kind
        counts = per_kind.reshape(len(_KIND_OF_KEY), 1)
    else:
        user = np.arange(B).repeat(n)
        counts = np.bincount(kinds * B + user, minlength=len(_KIND_OF_KEY) * B)
        counts = counts.reshape(len(_KIND_OF_KEY), B)
    bounds = list(accumulate(per_kind.tolist(), initial=0))
    if "context" not in vocab and bounds[CONTEXT + 1] > bounds[CONTEXT]:
        raise ValueError(
            "requests carry context tokens but the model has no context table (model.num_context=0)"
        )
    keys = [k for k in KEYS if k in vocab]
    values, dest, lengths = [], [], []
    for key in keys:
        if key == "candidate":
            values.append(cand_ids)
            dest.append(cand_row)
            lengths.append(np.asarray(c, np.int64))
        else:
            kind = _KIND_OF_KEY[key]
            values.append(by_kind[bounds[kind] : bounds[kind + 1]])
            dest.append(rows_by_kind[bounds[kind] : bounds[kind + 1]])
            lengths.append(counts[kind])
    # Viewed as unsigned, a negative id is larger than any table: one compare checks both ends.
    # Only when some id is out of range are the keys checked one by one, for the message.
    limits = np.array([vocab.get(key, 0) for key in _KEY_OF_KIND], np.uint64)  # 0: no table
    if np.count_nonzero(ids.view(np.uint64) >= limits[kinds]) or np.count_nonzero(
        cand_ids.view(np.uint64) >= vocab["candidate"]
    ):
        for key, v in zip(keys, values):
            _check_vocab("item" if key == "candidate" else key, v, vocab[key])
    host = {
        "keys": keys,
        "values": values,
        "dest": dest,
        "lengths": lengths,
        "positions": pos,
        "candidate_rows": cand_row,
    }
    tokens = Tokens(
        features=None,
        dest=None,
        positions=None,
        candidate_rows=None,
        rows=rows,
        num_candidates=c,
        num_rows=int(pos.size),
        host=host,
    )
    return tokens.upload(device) if upload else tokens


class SequenceEmbeddings(nn.Module):
    def __init__(
        self,
        *,
        hidden: int,
        item_vocab: int,
        action_vocab: int,
        num_context: int,
        context_vocab: int,
        max_history: int,
        position_embedding: bool,
    ):
        super().__init__()
        # Table names must not clash with ModuleDict attributes ("items", "values", ...).
        tables = [
            EmbeddingConfig(
                name="item_table",
                embedding_dim=hidden,
                num_embeddings=item_vocab,
                feature_names=["item", "candidate"],
            ),
            EmbeddingConfig(
                name="action_table",
                embedding_dim=hidden,
                num_embeddings=action_vocab,
                feature_names=["action"],
            ),
        ]
        if num_context:
            tables.append(
                EmbeddingConfig(
                    name="context_table",
                    embedding_dim=hidden,
                    num_embeddings=context_vocab,
                    feature_names=["context"],
                )
            )
        self.collection = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
        self.vocab = {"item": item_vocab, "action": action_vocab, "candidate": item_vocab}
        if num_context:
            self.vocab["context"] = context_vocab
        self.keys = [k for k in KEYS if k in self.vocab]  # the KJT's keys, in value order
        self.num_context, self.max_history, self.hidden = num_context, max_history, hidden
        # Positions 0..T (T: candidates), then one per context token.
        self.positions = (
            nn.Embedding(max_history + 1 + num_context, hidden) if position_embedding else None
        )
        self.scale = math.sqrt(hidden)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """[tokens.num_rows, hidden] in the module's dtype."""
        kjt = tokens.features
        out = self.collection(kjt)
        weight = next(iter(self.collection.parameters()))
        values = torch.cat([out[k].values() for k in kjt.keys()]).to(weight.dtype)
        # Zeros: a graph bucket's dead rows (past the last user) get no value, and stay finite.
        x = torch.zeros(tokens.positions.numel(), self.hidden, dtype=weight.dtype, device=weight.device)
        x[tokens.dest] = values  # every live row is exactly one token or candidate
        if self.positions is not None:
            x = x * self.scale + self.positions(tokens.positions)
        return x[: tokens.num_rows]

    def tokens(
        self, requests: Sequence[Request], starts: Sequence[int], device, *, upload: bool = True
    ) -> Tokens:
        """`make_tokens` with this module's tables and sizes."""
        return make_tokens(
            requests,
            starts,
            vocab=self.vocab,
            num_context=self.num_context,
            max_history=self.max_history,
            device=device,
            upload=upload,
        )
