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
    first use: a user's requests are prefixes of it, so a history only grows."""

    def __init__(self, model, seed: int):
        self.m, self.seed, self._seqs = model, seed, {}

    def get(self, user: int):
        if user not in self._seqs:
            m, rng = self.m, np.random.default_rng([self.seed, 7, user])
            n_items = -(-m.max_history // 2)
            self._seqs[user] = interleave(
                torch.from_numpy(rng.integers(m.context_vocab, size=m.num_context)),
                torch.from_numpy(rng.integers(m.item_vocab, size=n_items)),
                torch.from_numpy(rng.integers(m.action_vocab, size=n_items)),
            )
        return self._seqs[user]

    def request(self, user: int, history: int, candidates: int, index: int) -> Request:
        """Request number `index` of a run: `user`'s context and first `history` history
        tokens, and `candidates` candidates drawn from (seed, index)."""
        kinds, ids = self.get(user)
        end = self.m.num_context + history
        # default_rng([seed, 11, index]) spelt out: the same stream, less Python a request
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 11, index])))
        cands = torch.from_numpy(rng.integers(self.m.item_vocab, size=candidates))
        return Request(
            user=user, kinds=kinds[:end], ids=ids[:end], candidates=cands, num_context=self.m.num_context
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
