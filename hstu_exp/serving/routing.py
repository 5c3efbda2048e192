"""Which replica serves a query, for a server of N GPU replicas behind one load generator
(workload.replicas=N): each replica has its own KV pool, so a user's cached history lives on one
replica and the user is pinned there.

Policies:
- `hash`: user -> replica by a fixed hash; never moves. Balanced over many users, blind to load.
- `least_loaded`: a new user goes to the replica with the least outstanding work (token rows of
  the queries admitted and not yet answered); a pinned user stays unless its replica's
  outstanding rows exceed the least loaded one's by more than `max_imbalance` (a fraction)
  plus `slack_rows`, and the user has nothing in flight there (its queries must be answered in
  order). A move costs the user's cache: its next query misses on the new replica, and the old
  replica's copy is dead weight until its pool evicts it. `stats()` counts moves. Without
  slack, moves on every passing difference cost more than they balance (tests/test_routing.py
  simulates it: more queued work than `hash`); a slack of a few of the largest queries' rows
  keeps moves rare and the busiest replica's queue below `hash`'s.

Pure Python and thread-safe: `route` runs on the load generator's thread, `done` on the
replicas' workers.
"""

from __future__ import annotations

import threading
import zlib

POLICIES = ("hash", "least_loaded")


class Router:
    def __init__(
        self, replicas: int, *, slack_rows: int, policy: str = "least_loaded", max_imbalance: float = 0.5
    ):
        if replicas < 1:
            raise ValueError(f"workload.replicas={replicas}: must be >= 1")
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r}: one of {', '.join(POLICIES)}")
        if not max_imbalance >= 0 or slack_rows < 0:
            raise ValueError("max_imbalance and slack_rows must be >= 0")
        self.replicas, self.policy = replicas, policy
        self.max_imbalance, self.slack_rows = max_imbalance, slack_rows
        self._lock = threading.Lock()
        self._home: dict[object, int] = {}  # user -> replica holding its cache
        self._in_flight: dict[object, int] = {}  # user -> queries admitted, not answered
        self.load: list[int] = [0] * replicas  # outstanding token rows per replica
        self.routed: list[int] = [0] * replicas
        self.moved_in: list[int] = [0] * replicas
        self.moved_out: list[int] = [0] * replicas
        self.users: list[int] = [0] * replicas  # users pinned

    def _least_loaded(self) -> int:
        return min(range(self.replicas), key=lambda r: (self.load[r], self.users[r], r))

    def _place(self, user) -> int:
        if self.policy == "hash":
            return zlib.crc32(repr(user).encode()) % self.replicas
        return self._least_loaded()

    def _overloaded(self, home: int, best: int) -> bool:
        return self.load[home] > (1 + self.max_imbalance) * self.load[best] + self.slack_rows

    def route(self, user, rows: int) -> int:
        """The replica for the user's next query of `rows` token rows; counts it outstanding
        there until `done`."""
        with self._lock:
            home = self._home.get(user)
            if home is None:
                home = self._home[user] = self._place(user)
                self.users[home] += 1
            elif self.policy == "least_loaded" and not self._in_flight.get(user):
                best = self._least_loaded()
                if best != home and self._overloaded(home, best):
                    self.moved_out[home] += 1
                    self.moved_in[best] += 1
                    self.users[home] -= 1
                    self.users[best] += 1
                    home = self._home[user] = best
            self._in_flight[user] = self._in_flight.get(user, 0) + 1
            self.load[home] += rows
            self.routed[home] += 1
            return home

    def done(self, user, replica: int, rows: int) -> None:
        """The query routed to `replica` was answered."""
        with self._lock:
            self.load[replica] -= rows
            left = self._in_flight[user] - 1
            if left:
                self._in_flight[user] = left
            else:
                del self._in_flight[user]

    def stats(self) -> dict:
        """Per replica (lists indexed by replica): queries routed, users pinned at the end,
        users moved in and out; and the moves in all."""
        with self._lock:
            return {
                "replica_queries": list(self.routed),
                "replica_users": list(self.users),
                "replica_moved_in": list(self.moved_in),
                "replica_moved_out": list(self.moved_out),
                "moves": sum(self.moved_in),
            }
