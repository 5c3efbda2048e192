"""CUDA-graph buckets as arithmetic (no torch): which bucket a batch falls in, and every bucket a
graph runner can meet, so that a server captures them all before its timed run and the config can
check at start-up that they fit `graph.max_graphs` (docs/serving.md, "Warm-up")."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import List, Sequence


@dataclass(frozen=True)
class Bucket:
    batch: int
    tokens: int  # rows per user (new history + candidates)
    kv: int = 0  # history keys per user in paged mode (0: full mode)
    fit: int = 0  # rows of the whole batch, where fewer than batch x tokens (0: batch x tokens)

    @property
    def name(self) -> str:
        return (
            f"b{self.batch}xt{self.tokens}"
            + (f"xkv{self.kv}" if self.kv else "")
            + (f"xr{self.fit}" if self.fit else "")
        )

    @property
    def rows(self) -> int:
        return self.fit or self.batch * self.tokens


def smallest(options: Sequence[int], need: int, key: str) -> int:
    options = sorted(options)
    i = bisect_left(options, need)
    if i == len(options):
        raise ValueError(f"{key}: no bucket holds {need} (largest is {options[-1]})")
    return options[i]


def fit_rows(need: int, smallest: int, full: int) -> int:
    """Rows of a bucket holding `need` live rows: the smallest power-of-two multiple of
    `smallest` that holds them, or 0 (batch x tokens) where that is no fewer than `full`."""
    size = smallest
    while size < need:
        size *= 2
    return size if size < full else 0


def kv_bucket(need: int, page_size: int, limit: int) -> int:
    size = page_size
    while size < need:
        size *= 2
    return min(size, max(limit, need))


def _below(options: Sequence[int], value: int) -> int:
    """The option before `value` in sorted `options` (0 for the first): a bucket holds what
    its predecessor cannot."""
    lower = [o for o in options if o < value]
    return max(lower) if lower else 0


def user_rows_at_least(page_size: int, num_context: int) -> int:
    """The fewest rows of a user: a candidate, and in full mode (page_size 0) its context
    (recomputed every time)."""
    return 1 + (0 if page_size else num_context)


def all_buckets(
    *,
    batch_buckets: Sequence[int],
    token_buckets: Sequence[int],
    page_size: int = 0,
    max_history: int = 0,
    fit: bool = False,
    max_candidates: int = 0,
    num_context: int = 0,
) -> List[Bucket]:
    """Every bucket `BucketGraphs.bucket_for` can return for a batch of valid requests, smallest
    first. page_size 0: full mode (kv 0). max_history: the longest KV of a user (context and
    history). max_candidates (0: unknown, nothing dropped on its account) bounds a request's
    candidates, and with it what cannot occur:
      - a token bucket whose predecessor already holds the longest user (max_history +
        max_candidates rows);
      - (paged) a kv bucket below the longest user's new rows: a user of more than t' rows (t'
        the token bucket's predecessor) has more than t' - max_candidates new keys, all of them in
        its KV, and below num_context (every user's KV holds its context);
      - (fit) a row count that no batch of the bucket sums to: its longest user has more than t'
        rows and each of more than b' - 1 others (b' the batch bucket's predecessor) at least
        `user_rows_at_least`; at most batch x min(tokens, kv + max_candidates) rows in all (kv:
        in full mode max_history)."""

    batches, tokens = sorted(batch_buckets), sorted(token_buckets)
    most_rows = max_history + max_candidates if max_candidates else None
    least_rows = user_rows_at_least(page_size, num_context)
    kvs = [0]
    if page_size:
        kvs = sorted({min(n, max_history) for n in _doublings(page_size, max_history)})
    out = []
    for b in batches:
        b_prev = _below(batches, b)
        for t in tokens:
            t_prev = _below(tokens, t)
            if (most_rows is not None and t_prev >= most_rows) or t < least_rows:
                continue
            for kv in kvs:
                if kv and max_candidates and kv < t_prev + 1 - max_candidates:
                    continue
                if kv and kv < num_context:
                    continue
                user_rows = min(t, (kv or max_history) + max_candidates) if max_candidates else t
                fits = [0]
                if fit:
                    low = t_prev + 1 + b_prev * least_rows
                    fits = _fits(max(low, least_rows), b * user_rows, min(tokens), b * t)
                out += [Bucket(b, t, kv, f) for f in fits]
    return out


def _doublings(page_size: int, limit: int) -> List[int]:
    """page_size, 2 x page_size, ... up to the first that reaches `limit`: the sizes
    `kv_bucket` rounds a KV of at most `limit` keys to, before capping them at `limit`."""
    sizes = [page_size]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes


def _fits(low: int, high: int, smallest_rows: int, full: int) -> List[int]:
    """The `fit_rows` values of row counts low..high (0 last: batch x tokens)."""
    if low > high:
        return []
    out, size, prev = [], smallest_rows, 0
    while size < full:
        if prev < high and size >= low:  # (prev, size] meets [low, high]
            out.append(size)
        prev, size = size, size * 2
    if high > prev:  # (prev, full]: batch x tokens
        out.append(0)
    return out
