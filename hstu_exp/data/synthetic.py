"""Ranking requests and a reproducible synthetic stream of them (docs/design.md §1.1, §2).

A request carries a user's whole sequence so far, `[context | i1, a1, i2, a2, ...]`, as two
CPU tensors (token kind, id), plus the candidate item ids to rank. The cache manager compares
that sequence against what it cached for the user; only the uncached tail is embedded.

The stream: every user owns one fixed sequence of `num_context + max_history` tokens drawn from
the seed; the k-th request of a user carries the first `history_start + k * history_step` history
tokens of it (capped at max_history), so histories grow request by request and never change.
Users are served in rounds: each round visits every user once in a random order, B at a time, so
with more users than the pool holds, evicted users come back (host tier onloads).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import List, Tuple

import numpy as np
import torch

KINDS = ("context", "item", "action")  # token kind codes 0, 1, 2
CONTEXT, ITEM, ACTION = 0, 1, 2


@dataclass
class Request:
    user: int
    kinds: torch.Tensor  # [C + T] int64 token kinds (KINDS)
    ids: torch.Tensor  # [C + T] int64 ids in the kind's table
    candidates: torch.Tensor  # [c] int64 item ids to rank
    num_context: int

    @property
    def seq_len(self) -> int:
        return self.ids.numel()

    @property
    def history(self) -> int:
        return self.ids.numel() - self.num_context

    @cached_property
    def arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kinds, ids, candidates) as numpy arrays over the tensors' memory, made once: the
        host path of a step reads them several times, and each `Tensor.numpy()` costs about a
        microsecond. A request is not changed once made."""
        return self.kinds.numpy(), self.ids.numpy(), self.candidates.numpy()

    @cached_property
    def fingerprint(self) -> Tuple[bytes, bytes]:
        """The bytes of its token kinds and ids as int64, made once: the KV-cache manager checks
        a user's next request against them (a prefix compare of bytes is a memcmp) and keeps
        them as the record of what the cached K/V came from."""
        kinds, ids, _ = self.arrays
        return (
            kinds.astype(np.int64, copy=False).tobytes(),
            ids.astype(np.int64, copy=False).tobytes(),
        )


def interleave(context: torch.Tensor, items: torch.Tensor, actions: torch.Tensor):
    """(kinds, ids) of `[context | i1, a1, i2, a2, ...]`; one action fewer than items is allowed
    (the last item's action is not known yet)."""
    n_i, n_a = items.numel(), actions.numel()
    if n_a not in (n_i, n_i - 1):
        raise ValueError(f"{n_i} items need {n_i} or {n_i - 1} actions, got {n_a}")
    history = torch.empty(n_i + n_a, dtype=torch.int64)
    history[0::2], history[1::2] = items, actions
    kinds = torch.empty(n_i + n_a, dtype=torch.int64)
    kinds[0::2], kinds[1::2] = ITEM, ACTION
    c = context.numel()
    return (
        torch.cat([torch.full((c,), CONTEXT, dtype=torch.int64), kinds]),
        torch.cat([context.long(), history]),
    )


def make_request(user: int, *, items, actions, candidates, context=()) -> Request:
    as_long = lambda v: torch.as_tensor(v, dtype=torch.int64).reshape(-1)  # noqa: E731
    context = as_long(context)
    kinds, ids = interleave(context, as_long(items), as_long(actions))
    return Request(
        user=user, kinds=kinds, ids=ids, candidates=as_long(candidates), num_context=context.numel()
    )


class SyntheticStream:
    """`num_batches` batches of `batch_size` distinct users; everything drawn from `seed`."""

    def __init__(
        self,
        *,
        num_users: int,
        batch_size: int,
        num_batches: int,
        num_candidates: int,
        history_start: int,
        history_step: int,
        max_history: int,
        num_context: int,
        item_vocab: int,
        action_vocab: int,
        context_vocab: int,
        seed: int,
    ):
        if num_users < batch_size:
            raise ValueError(
                f"workload.num_users={num_users}: fewer users than workload.batch_size={batch_size}"
            )
        gen = torch.Generator().manual_seed(seed)
        n_items = -(-max_history // 2)
        # One fixed sequence per user: requests are prefixes of it, so a history only grows.
        self.sequences = []
        for _ in range(num_users):
            context = torch.randint(context_vocab, (num_context,), generator=gen)
            items = torch.randint(item_vocab, (n_items,), generator=gen)
            actions = torch.randint(action_vocab, (n_items,), generator=gen)
            self.sequences.append(interleave(context, items, actions))
        self.num_context = num_context
        self.batches: List[List[Request]] = []
        served = [0] * num_users
        pending: List[int] = []
        for _ in range(num_batches):
            users: List[int] = []
            while len(users) < batch_size:
                if not pending:  # a new round: every user once, in a fresh random order
                    pending = torch.randperm(num_users, generator=gen).tolist()
                # The first pending user not already in this batch (rounds may straddle batches).
                pick = next((i for i, u in enumerate(pending) if u not in users), None)
                if pick is None:
                    pending += torch.randperm(num_users, generator=gen).tolist()
                    continue
                users.append(pending.pop(pick))
            batch = []
            for u in users:
                history = min(history_start + served[u] * history_step, max_history)
                served[u] += 1
                kinds, ids = self.sequences[u]
                cands = torch.randint(item_vocab, (num_candidates,), generator=gen)
                end = num_context + history
                batch.append(
                    Request(
                        user=u,
                        kinds=kinds[:end],
                        ids=ids[:end],
                        candidates=cands,
                        num_context=num_context,
                    )
                )
            self.batches.append(batch)

    @property
    def max_history(self) -> int:
        return max(r.history for b in self.batches for r in b)


def stream_for(model, workload, *, seed: int) -> SyntheticStream:
    """The stream of an e2e point (config groups `model` and `workload`)."""
    return SyntheticStream(
        num_users=workload.num_users or workload.batch_size,
        batch_size=workload.batch_size,
        num_batches=workload.num_batches,
        num_candidates=workload.num_candidates,
        history_start=workload.history_start,
        history_step=workload.history_step,
        max_history=model.max_history,
        num_context=model.num_context,
        item_vocab=model.item_vocab,
        action_vocab=model.action_vocab,
        context_vocab=model.context_vocab,
        seed=seed,
    )
