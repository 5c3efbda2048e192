"""The discrete-event simulator of one server (workload.clock=simulated): a what-if tool over
measured per-batch service times, not a measurement of a server (docs/serving.md).

Arrivals queue in front of one server. When the server is idle it takes the waiting requests it
may batch (one request in flight per user: a user's later request waits for the earlier one),
and starts a batch once `max_batch` are eligible or the oldest has waited `max_wait_s`; the
batch's service time comes from `serve_batch` (the request path, timed), and meanwhile arrivals
queue. The queueing is exact given the service times; the service times come from batches run
back to back with nothing overlapped (one serialized worker, no ingest or response cost).

Pure Python, no torch: the policies (`pick_batch`) are shared with the real batcher.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from hstu_exp.serving.stats import violations_to_miss

POLICIES = ("fifo", "length_aware")


@dataclass
class Schedule:
    """When each request started and finished, in which batch; the batches in order."""

    start: List[Optional[float]]
    finish: List[Optional[float]]
    batch: List[Optional[int]]
    batches: List[tuple] = field(default_factory=list)  # (start_s, finish_s, request indices)
    stopped_early: bool = False


def eligible(waiting: List[int], users) -> List[int]:
    """The oldest waiting request of each user (one request in flight per user)."""
    seen, out = set(), []
    for i in waiting:
        if users[i] not in seen:
            seen.add(users[i])
            out.append(i)
    return out


def pick_batch(ready: List[int], buckets, max_batch: int, policy: str) -> List[int]:
    """fifo: the oldest `max_batch`; length_aware: the oldest one (no request starves), then
    others in its graph token bucket, then ones from smaller buckets."""
    if policy == "fifo":
        return ready[:max_batch]
    head = buckets[ready[0]]
    same = [i for i in ready if buckets[i] == head]
    smaller = [i for i in ready if buckets[i] < head]
    return (same + smaller)[:max_batch]


def token_bucket(rows: int, buckets) -> int:
    """Index of the smallest graph token bucket holding `rows` (past the largest: its count)."""
    return bisect_left(sorted(buckets), rows)


def simulate(
    times,
    users,
    buckets,
    serve_batch: Callable[[List[int]], float],
    *,
    max_batch: int,
    max_wait_s: float,
    policy: str,
    give_up: Optional[Callable] = None,
) -> Schedule:
    """Serve requests arriving at `times` (sorted, seconds) on one server. serve_batch(indices)
    serves a batch and returns its service time, s. give_up(now, schedule, waiting) may end the
    run after a batch (search: the SLO is already missed)."""
    n = len(times)
    sched = Schedule([None] * n, [None] * n, [None] * n)
    waiting: List[int] = []
    nxt, now = 0, 0.0
    while nxt < n or waiting:
        while nxt < n and times[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        if not waiting:
            now = times[nxt]
            continue
        ready = eligible(waiting, users)
        # Wait for a fuller batch, up to the oldest one's max_wait (the server cannot know
        # whether more requests will come, so it waits at the end of the stream too).
        deadline = times[ready[0]] + max_wait_s
        if len(ready) < max_batch and now < deadline:
            now = min(deadline, times[nxt]) if nxt < n else deadline
            continue
        chosen = pick_batch(ready, buckets, max_batch, policy)
        service = serve_batch(chosen)
        for i in chosen:
            sched.start[i], sched.finish[i], sched.batch[i] = now, now + service, len(sched.batches)
        sched.batches.append((now, now + service, chosen))
        taken = set(chosen)
        waiting = [i for i in waiting if i not in taken]
        now += service
        if give_up is not None and give_up(now, sched, waiting):
            sched.stopped_early = True
            break
    return sched


def slo_give_up(times, counted, slo_s: float, percentile: float):
    """A give_up for `simulate`: stops once so many counted requests are over slo_s (finished,
    or still waiting past it) that the percentile cannot come back under it."""
    limit = violations_to_miss(sum(counted), percentile)
    over = [0]

    def give_up(now, sched, waiting):
        _, _, last = sched.batches[-1]
        over[0] += sum(counted[i] and sched.finish[i] - times[i] > slo_s for i in last)
        late = 0
        for i in waiting:  # in arrival order: the late ones come first
            if now - times[i] <= slo_s:
                break
            late += counted[i]
        return over[0] + late >= limit

    return give_up
