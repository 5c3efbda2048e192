"""The batcher of the real server: its own thread, real timers.

Queries arrive on LoadGen's thread (`put`). The batcher thread forms a batch once the worker can
take one (a one-batch hand-off: the batch the worker prepares next) and either `max_batch`
requests are eligible or the oldest eligible one has waited `max_wait_s`. Eligible: the oldest
waiting request of each user with nothing in flight, so a user's requests are served one at a
time, in arrival order (each sees only its own earlier history, never a later one). The policy
(`sim.pick_batch`: fifo or length_aware) is the simulator's. The worker takes batches (`take`)
and hands their users back (`release`) once answered.

At saturation thousands of queries wait: the batcher keeps each user's queue and a heap of the
eligible heads (oldest first), so forming a batch costs the batch, not the queue (the worker's
host work shares the GIL with this thread, and with the condition's lock).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
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
        self._queues: dict = {}  # user -> deque of (arrival number, Pending), oldest first
        self._heads: list = []  # heap of (arrival number, Pending): each idle user's oldest
        self._waiting = 0  # queries waiting
        self._arrived = 0  # arrival numbers, in put order
        self._busy_users: set = set()  # users with a request handed off or in flight
        self._handoff: Optional[List[Pending]] = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def put(self, items: List[Pending]) -> None:
        with self._cond:
            for p in items:
                queue = self._queues.get(p.user)
                if queue is None:
                    queue = self._queues[p.user] = deque()
                queue.append((self._arrived, p))
                if len(queue) == 1 and p.user not in self._busy_users:
                    heapq.heappush(self._heads, queue[0])
                self._arrived += 1
            self._waiting += len(items)
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
            for p in batch:
                self._busy_users.discard(p.user)
                queue = self._queues.get(p.user)
                if queue:
                    heapq.heappush(self._heads, queue[0])
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

    def _pick(self) -> List[Pending]:
        """The batch from the eligible heads (`sim.pick_batch`'s policy), taken off the queues;
        its users busy."""
        if self.policy == "fifo":  # the oldest max_batch: off the heap's top
            chosen = [heapq.heappop(self._heads) for _ in range(min(self.max_batch, len(self._heads)))]
        else:
            ready = sorted(self._heads)
            picked = pick_batch(
                list(range(len(ready))), [p.bucket for _, p in ready], self.max_batch, self.policy
            )
            chosen = [ready[k] for k in picked]
            taken = set(picked)
            self._heads = [h for k, h in enumerate(ready) if k not in taken]  # sorted: a heap
        batch = []
        for _, p in chosen:
            queue = self._queues[p.user]
            queue.popleft()
            if not queue:
                del self._queues[p.user]
            self._busy_users.add(p.user)
            batch.append(p)
        self._waiting -= len(batch)
        return batch

    def _loop(self) -> None:
        with self._cond:
            while True:
                if self._closed and not self._waiting:
                    self._cond.notify_all()
                    return
                if self._handoff is not None or not self._heads:
                    # the worker has not taken the last batch, or nothing is eligible
                    self._cond.wait()
                    continue
                wait = self._heads[0][1].arrival + self.max_wait_s - self.clock()
                if len(self._heads) < self.max_batch and wait > 0 and not self._closed:
                    self._cond.wait(wait)
                    continue
                self._handoff = self._pick()
                self._cond.notify_all()
