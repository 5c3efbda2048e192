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
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from hstu_exp.core.jagged import to_device
from hstu_exp.data.synthetic import ACTION, CONTEXT, ITEM, Request

# KJT keys, in the order their values are laid out. Candidates share the item table.
KEYS = ("context", "item", "action", "candidate")
_KIND_OF_KEY = {"context": CONTEXT, "item": ITEM, "action": ACTION}


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
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


def _check_requests(requests, start, seq, cands, ctx, *, num_context: int, max_history: int) -> None:
    """The first request (in batch order) that breaks a rule, by its first broken rule."""
    rules = [
        (
            ctx != num_context,
            lambda r, i: (
                f"{r.num_context} context tokens, the model takes model.num_context={num_context}"
            ),
        ),
        (
            (start < 0) | (start > seq),
            lambda r, i: f"cached prefix {start[i]} outside its sequence of {r.seq_len} tokens",
        ),
        (cands == 0, lambda r, i: "a ranking request needs at least one candidate"),
        (
            seq - ctx > max_history,
            lambda r, i: f"{r.history} history tokens, more than the model's max_history={max_history}",
        ),
    ]
    bad = np.logical_or.reduce([mask for mask, _ in rules]) if len(start) else start.astype(bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        why = next(say for mask, say in rules if mask[i])
        raise ValueError(f"user {requests[i].user}: {why(requests[i], i)}")


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

    Host-side numpy over the whole batch (the only per-request work is reading each request's
    arrays), then one copy of everything the device needs; upload=False leaves that copy to the
    caller (`jagged.upload_step`) or a graph runner."""
    B = len(requests)
    start = np.asarray(starts, dtype=np.int64).reshape(-1)
    seq = np.fromiter((r.seq_len for r in requests), np.int64, B)
    cands = np.fromiter((r.candidates.numel() for r in requests), np.int64, B)
    ctx = np.fromiter((r.num_context for r in requests), np.int64, B)
    _check_requests(requests, start, seq, cands, ctx, num_context=num_context, max_history=max_history)
    n = seq - start
    kinds = _cat([r.kinds.numpy()[s:] for r, s in zip(requests, start.tolist())])
    ids = _cat([r.ids.numpy()[s:] for r, s in zip(requests, start.tolist())])
    cand_ids = _cat([r.candidates.numpy() for r in requests])
    # The user's rows are [uncached tokens | candidates], after the previous users' rows.
    rows = n + cands
    row0 = np.zeros(B, np.int64)
    np.cumsum(rows[:-1], out=row0[1:])
    tok_user = np.repeat(np.arange(B), n)
    j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    tok_row = row0[tok_user] + j
    cand_user = np.repeat(np.arange(B), cands)
    cand_row = (
        (row0 + n)[cand_user] + np.arange(int(cands.sum())) - np.repeat(np.cumsum(cands) - cands, cands)
    )
    s = start[tok_user] + j  # sequence index of each token
    pos = np.empty(int(rows.sum()), np.int64)
    pos[tok_row] = np.where(s < num_context, max_history + 1 + s, s - num_context)
    pos[cand_row] = (seq - ctx)[cand_user]

    keys = [k for k in KEYS if k in vocab]
    if "context" not in vocab and bool((kinds == CONTEXT).any()):
        raise ValueError(
            "requests carry context tokens but the model has no context table (model.num_context=0)"
        )
    values, dest, lengths = [], [], []
    for key in keys:
        if key == "candidate":
            v, d, n_per_user = cand_ids, cand_row, cands
        else:
            m = kinds == _KIND_OF_KEY[key]
            v, d, n_per_user = ids[m], tok_row[m], np.bincount(tok_user[m], minlength=B)
        _check_vocab("item" if key == "candidate" else key, v, vocab[key])
        values.append(v)
        dest.append(d)
        lengths.append(n_per_user)
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
        rows=rows.tolist(),
        num_candidates=cands.tolist(),
        num_rows=int(rows.sum()),
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
