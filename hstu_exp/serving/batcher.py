"""The batcher of the real server: its own thread, real timers.

Queries arrive on LoadGen's thread (`put`). The batcher thread forms a batch once the worker can
take one (a one-batch hand-off: the batch the worker prepares next) and either `max_batch`
requests are eligible or the oldest eligible one has waited `max_wait_s`. Eligible: the oldest
waiting request of each user with nothing in flight, so a user's requests are served one at a
time, in arrival order (each sees only its own earlier history, never a later one). The policy
(`sim.pick_batch`: fifo or length_aware) is the simulator's. The worker takes batches (`take`)
and hands their users back (`release`) once answered.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from hstu_exp.serving.sim import pick_batch


@dataclass
class Pending:
    """One query waiting for the server."""

    query_id: int  # LoadGen's id, handed back with the response
    index: int  # request number in arrival order (the population's stream)
    user: int
    bucket: int  # graph token bucket of its rows (length_aware groups by it)
    arrival: float  # clock() when it arrived


class Batcher:
    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_s: float,
        policy: str,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.max_batch, self.max_wait_s, self.policy, self.clock = max_batch, max_wait_s, policy, clock
        self._cond = threading.Condition()
        self._waiting: List[Pending] = []
        self._busy_users: set = set()  # users with a request handed off or in flight
        self._handoff: Optional[List[Pending]] = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def put(self, items: List[Pending]) -> None:
        with self._cond:
            self._waiting.extend(items)
            self._cond.notify_all()

    def take(self, block: bool = True, timeout: Optional[float] = None) -> Optional[List[Pending]]:
        """The next batch; None when closed and drained, or (block=False) when none is ready
        (within `timeout` seconds, if given)."""
        with self._cond:
            end = None if timeout is None else self.clock() + timeout
            while self._handoff is None:
                if self._closed and not self._waiting:
                    return None
                if not block and (end is None or self.clock() >= end):
                    return None
                self._cond.wait(None if end is None else max(end - self.clock(), 0))
            batch, self._handoff = self._handoff, None
            self._cond.notify_all()
            return batch

    def release(self, batch: List[Pending]) -> None:
        """The batch was answered: its users may send their next request."""
        with self._cond:
            self._busy_users.difference_update(p.user for p in batch)
            self._cond.notify_all()

    def close(self) -> None:
        """No more queries: the batcher drains what waits (without waiting for company) and
        stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def has_batch(self) -> bool:
        """A batch is formed and waits for the worker."""
        with self._cond:
            return self._handoff is not None

    def _ready(self) -> List[int]:
        seen, out = set(self._busy_users), []
        for k, p in enumerate(self._waiting):
            if p.user not in seen:
                seen.add(p.user)
                out.append(k)
        return out

    def _loop(self) -> None:
        with self._cond:
            while True:
                if self._closed and not self._waiting:
                    self._cond.notify_all()
                    return
                ready = self._ready() if self._handoff is None else []
                if not ready:  # the worker has not taken the last batch, or nothing eligible
                    self._cond.wait()
                    continue
                wait = self._waiting[ready[0]].arrival + self.max_wait_s - self.clock()
                if len(ready) < self.max_batch and wait > 0 and not self._closed:
                    self._cond.wait(wait)
                    continue
                buckets = [p.bucket for p in self._waiting]
                chosen = pick_batch(ready, buckets, self.max_batch, self.policy)
                batch = [self._waiting[k] for k in chosen]
                taken = set(chosen)
                self._waiting = [p for k, p in enumerate(self._waiting) if k not in taken]
                self._busy_users.update(p.user for p in batch)
                self._handoff = batch
                self._cond.notify_all()
