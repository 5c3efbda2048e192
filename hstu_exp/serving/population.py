"""Who sends requests: a population of users, each with one fixed token sequence that its
requests are prefixes of (a history only grows), and the arrivals of a run (data/arrivals.py:
Poisson at `qps`, or a trace). The request a server sees is built here from (user, history,
candidates)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from hstu_exp.data.arrivals import UserDraws, histories, poisson_arrivals, read_trace, users_for_rate
from hstu_exp.data.synthetic import Request, interleave


class UserSequences:
    """One fixed sequence per user (context + max_history tokens), drawn from (seed, user) on
    first use: a user's requests are prefixes of it, so a history only grows. Candidates come
    from (seed, request index), drawn for `block` consecutive indices at once.

    `request` runs once per query on the server's critical thread (it holds the GIL), so it
    reads no config (an attribute of Hydra's config costs microseconds) and makes no generator
    a request (seeding one costs several times drawing 256 ids from it)."""

    def __init__(self, model, seed: int, *, block: int = 256):
        self.seed, self.block = seed, block
        self.num_context, self.max_history = int(model.num_context), int(model.max_history)
        self.max_candidates = int(model.max_candidates)
        self.vocab = (int(model.context_vocab), int(model.item_vocab), int(model.action_vocab))
        self._seqs: dict = {}
        self._blocks: dict = {}  # block number -> [block, max_candidates] item ids, a few kept

    def get(self, user: int):
        if user not in self._seqs:
            rng = np.random.default_rng([self.seed, 7, user])
            context_vocab, item_vocab, action_vocab = self.vocab
            n_items = -(-self.max_history // 2)
            self._seqs[user] = interleave(
                torch.from_numpy(rng.integers(context_vocab, size=self.num_context)),
                torch.from_numpy(rng.integers(item_vocab, size=n_items)),
                torch.from_numpy(rng.integers(action_vocab, size=n_items)),
            )
        return self._seqs[user]

    def candidates(self, index: int, count: int) -> np.ndarray:
        """The first `count` candidates of request `index`: row index % block of its block,
        drawn from (seed, block number) whatever order the indices come in."""
        if count > self.max_candidates:
            raise ValueError(f"{count} candidates, model.max_candidates={self.max_candidates}")
        number, row = divmod(index, self.block)
        ids = self._blocks.get(number)
        if ids is None:
            rng = np.random.default_rng([self.seed, 11, number])
            ids = rng.integers(self.vocab[1], size=(self.block, self.max_candidates))
            if len(self._blocks) >= 4:  # a run's indices only go up: old blocks are done
                del self._blocks[next(iter(self._blocks))]  # the oldest
            self._blocks[number] = ids
        return ids[row, :count]

    def request(self, user: int, history: int, candidates: int, index: int) -> Request:
        """Request number `index` of a run: `user`'s context and first `history` history
        tokens, and its `candidates` candidates."""
        kinds, ids = self.get(user)
        end = self.num_context + history
        cands = torch.from_numpy(self.candidates(index, candidates))
        return Request(
            user=user, kinds=kinds[:end], ids=ids[:end], candidates=cands, num_context=self.num_context
        )


@dataclass
class Stream:
    """The arrivals of one trial, and what each request carries."""

    times: List[float]  # arrival, s (0 for every request in mode=offline)
    users: List[int]
    history: List[int]  # history tokens
    candidates: List[int]
    counted: List[bool]  # arrived in [warmup_s, warmup_s + duration_s)
    offered_qps: float


def make_stream(cfg, qps: float) -> Stream:
    m, w = cfg.model, cfg.workload
    max_items = -(-m.max_history // 2)
    horizon = w.warmup_s + w.duration_s
    if w.trace is not None:
        arrivals = read_trace(w.trace)
    else:
        arrivals = poisson_arrivals(
            qps=qps,
            horizon_s=horizon,
            num_users=w.num_users or users_for_rate(qps, w.user_return_s),
            user_skew=w.user_skew,
            new_user_rate=w.new_user_rate,
            items_per_return=w.items_per_return,
            max_items=max_items,
            num_candidates=w.num_candidates,
            candidates_max=w.candidates_max,
            seed=cfg.seed,
        )
    counted = [w.warmup_s <= a.time_s < horizon for a in arrivals]
    offered = qps if w.trace is None else sum(counted) / w.duration_s
    items = histories(arrivals, max_items)
    times = [0.0 if w.mode == "offline" else a.time_s for a in arrivals]
    return Stream(
        times=times,
        users=[a.user for a in arrivals],
        history=[min(2 * k, m.max_history) for k in items],
        candidates=[a.candidates for a in arrivals],
        counted=counted,
        offered_qps=offered,
    )


class Population:
    """Requests drawn on demand, in arrival order (the real server: LoadGen says when, this says
    who and what). Request k: (user, history tokens, candidates); a user's history grows by
    each return until a new user takes its place (data/arrivals.UserDraws)."""

    def __init__(self, model, draws: UserDraws, *, chunk: int = 4096):
        self.max_items = -(-model.max_history // 2)
        self.max_history, self.draws, self.chunk = model.max_history, draws, chunk
        self._items: dict = {}
        self._buffer: List[tuple] = []

    def next(self) -> tuple:
        if not self._buffer:
            self._buffer = self.draws.draw(self.chunk)[::-1]
        user, new_items, candidates = self._buffer.pop()
        items = self._items[user] = min(self._items.get(user, 0) + new_items, self.max_items)
        return user, min(2 * items, self.max_history), candidates


def population_for(cfg, qps: float, seed: int) -> Population:
    """The population of a serve point: workload.num_users, or (null) sized to the rate."""
    m, w = cfg.model, cfg.workload
    num_users = w.num_users or users_for_rate(qps, w.user_return_s)
    return Population(
        m,
        UserDraws(
            num_users=num_users,
            user_skew=w.user_skew,
            new_user_rate=w.new_user_rate,
            items_per_return=w.items_per_return,
            max_items=-(-m.max_history // 2),
            num_candidates=w.num_candidates,
            candidates_max=w.candidates_max,
            rng=np.random.default_rng([seed, 17]),
        ),
    )
