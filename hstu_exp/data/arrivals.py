"""Request arrivals of the serving scenario (workload=serve): who comes back when, with how many
new history items and how many candidates.

Two sources, one shape (`Arrival`, in time order):
- `poisson_arrivals`: a Poisson process at `qps`; the user of each arrival drawn from a
  population of `num_users` with Zipf(`user_skew`) popularity (user 0 the most popular; skew 0 is
  uniform), or, with probability `new_user_rate`, a user never seen before. A population user's
  first arrival brings its whole history so far (uniform in 1..max_items items: the population
  has been around), every later one `items_per_return` new items; a new user starts with
  `items_per_return`. A return that would take a history past max_items starts a new user in
  that place (a new id, `items_per_return` items, the same popularity): the histories keep the
  distribution they start with, so a long run and a short one at one rate ask for the same work
  (with a cap instead, every history would climb to max_items over a run). Candidates:
  `num_candidates`, or uniform in num_candidates..candidates_max.
- `read_trace`: a CSV with exactly the columns `time,user,new_items,candidates` (seconds from
  the start, user id, history items added since that user's last request, candidates to rank).

`histories` turns the new items into each request's history length, capped at `max_items`.
Everything is drawn from the seed: the same config gives the same arrivals.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

TRACE_COLUMNS = ("time", "user", "new_items", "candidates")


class TraceError(ValueError):
    """A malformed trace: the message names the line (and column) at fault."""


@dataclass(frozen=True)
class Arrival:
    time_s: float
    user: int
    new_items: int  # history items added since the user's last request (first: all so far)
    candidates: int


def zipf_weights(num_users: int, skew: float) -> np.ndarray:
    """Popularity of users 0..num_users-1: proportional to 1 / (rank ** skew)."""
    w = 1.0 / np.arange(1, num_users + 1, dtype=np.float64) ** skew
    return w / w.sum()


def poisson_times(qps: float, horizon_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process at `qps` in [0, horizon_s)."""
    times: List[np.ndarray] = []
    t, chunk = 0.0, max(16, int(qps * horizon_s * 1.2) + 16)
    while t < horizon_s:
        block = t + np.cumsum(rng.exponential(1.0 / qps, chunk))
        times.append(block)
        t = float(block[-1])
    out = np.concatenate(times)
    return out[out < horizon_s]


class UserDraws:
    """Who sends the next requests, drawn on demand in arrival order: (user, new history items,
    candidates) per request, as `poisson_arrivals` describes. The real server draws its
    requests here one LoadGen query at a time; the arrival times come from LoadGen."""

    def __init__(
        self,
        *,
        num_users: int,
        user_skew: float,
        new_user_rate: float,
        items_per_return: int,
        max_items: int,
        num_candidates: int,
        candidates_max: Optional[int],
        rng: np.random.Generator,
    ):
        self.num_users, self.new_user_rate, self.rng = num_users, new_user_rate, rng
        self.items_per_return, self.max_items = items_per_return, max_items
        self.p = zipf_weights(num_users, user_skew)
        self.items = rng.integers(1, max_items + 1, size=num_users)  # each place's history so far
        self.ids = list(range(num_users))  # the user now in each place of the population
        self.cands = (num_candidates, candidates_max if candidates_max is not None else num_candidates)
        self.seen: set = set()  # places whose user has sent a request
        self.next_new = num_users

    def draw(self, n: int) -> List[tuple]:
        rng, step = self.rng, self.items_per_return
        popular = rng.choice(self.num_users, size=n, p=self.p)
        is_new = rng.random(n) < self.new_user_rate
        cands = rng.integers(self.cands[0], self.cands[1] + 1, size=n)
        out = []
        for place, new, c in zip(popular.tolist(), is_new.tolist(), cands.tolist()):
            if new:
                user, items = self.next_new, step
                self.next_new += 1
            elif place not in self.seen:  # the first request brings the history so far
                self.seen.add(place)
                user, items = self.ids[place], int(self.items[place])
            elif self.items[place] + step > self.max_items:  # a new user takes the place
                self.ids[place], self.items[place] = self.next_new, step
                self.next_new += 1
                user, items = self.ids[place], step
            else:
                self.items[place] += step
                user, items = self.ids[place], step
            out.append((user, items, c))
        return out


def poisson_arrivals(
    *,
    qps: float,
    horizon_s: float,
    num_users: int,
    user_skew: float,
    new_user_rate: float,
    items_per_return: int,
    max_items: int,
    num_candidates: int,
    candidates_max: Optional[int],
    seed: int,
) -> List[Arrival]:
    rng = np.random.default_rng(seed)
    times = poisson_times(qps, horizon_s, rng)
    users = UserDraws(
        num_users=num_users,
        user_skew=user_skew,
        new_user_rate=new_user_rate,
        items_per_return=items_per_return,
        max_items=max_items,
        num_candidates=num_candidates,
        candidates_max=candidates_max,
        rng=rng,
    )
    return [Arrival(float(t), *drawn) for t, drawn in zip(times, users.draw(times.size))]


def users_for_rate(qps: float, return_s: float) -> int:
    """A population sized to the rate: users who each come back every `return_s` seconds on
    average make `qps` together (at least 64)."""
    return max(64, math.ceil(qps * return_s))


def read_trace(path) -> List[Arrival]:
    """The arrivals of a trace CSV. Raises TraceError naming the line at fault: unknown or
    missing columns, a value that is not a number, a negative or decreasing time, a negative
    user, a decreasing history (new_items < 0), a first request with no history, no
    candidates."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read it ({exc.strerror or exc})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise TraceError("line 1: empty file (expected the header time,user,new_items,candidates)")
    header = [h.strip() for h in rows[0]]
    unknown = [h for h in header if h not in TRACE_COLUMNS]
    if unknown:
        raise TraceError(f"line 1: unknown column {unknown[0]!r} (columns: {','.join(TRACE_COLUMNS)})")
    missing = [c for c in TRACE_COLUMNS if c not in header]
    if missing:
        raise TraceError(f"line 1: missing column {missing[0]!r}")
    col = {name: header.index(name) for name in TRACE_COLUMNS}
    out: List[Arrival] = []
    seen = set()
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not v.strip() for v in row):
            continue
        if len(row) != len(header):
            raise TraceError(f"line {lineno}: {len(row)} fields, the header has {len(header)}")
        out.append(_trace_row(row, col, lineno, seen, out[-1].time_s if out else 0.0))
    if not out:
        raise TraceError("no requests after the header")
    return out


def _trace_row(row, col, lineno: int, seen: set, last_time: float) -> Arrival:
    def number(name, kind):
        value = row[col[name]].strip()
        try:
            return kind(value)
        except ValueError:
            raise TraceError(
                f"line {lineno}: {name}={value!r} is not {'a number' if kind is float else 'an integer'}"
            ) from None

    t, user = number("time", float), number("user", int)
    items, cands = number("new_items", int), number("candidates", int)
    if not math.isfinite(t):
        raise TraceError(f"line {lineno}: time={t:g} is not a finite number of seconds")
    if t < 0:
        raise TraceError(f"line {lineno}: time={t:g} is negative")
    if t < last_time:
        raise TraceError(
            f"line {lineno}: time={t:g} is before the previous line's {last_time:g} "
            "(a trace is in time order)"
        )
    if user < 0:
        raise TraceError(f"line {lineno}: user={user} is negative")
    if items < 0:
        raise TraceError(f"line {lineno}: user {user}'s history decreases (new_items={items})")
    if items == 0 and user not in seen:
        raise TraceError(f"line {lineno}: user {user}'s first request has no history (new_items=0)")
    if cands < 1:
        raise TraceError(f"line {lineno}: candidates={cands}: a request ranks at least one")
    seen.add(user)
    return Arrival(t, user, items, cands)


def histories(arrivals: List[Arrival], max_items: int) -> List[int]:
    """History items of each request (its user's items so far, capped at max_items)."""
    items: dict = {}
    out = []
    for a in arrivals:
        items[a.user] = min(items.get(a.user, 0) + a.new_items, max_items)
        out.append(items[a.user])
    return out
