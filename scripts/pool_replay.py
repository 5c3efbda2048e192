"""How often a serving run's requests would miss the KV cache with a pool of another size: each
point's requests (`requests.csv`, in the order its batches started) replayed through the paged
cache's own page bookkeeping (`PagedKVCache.plan`, user-level LRU; no K/V stored, no model run).

    python scripts/pool_replay.py <sweep dir> [--pages 64344,126708] [--fp8]

Per point: the share of its requests that found none of their history in the GPU pool as
recorded (tier `miss`, or `host` where a host tier onloaded it), then the same share replayed
for the run's own pool (a check that the replay is the cache: they should agree) and for each
other pool asked for. `--fp8` adds the pool the same bytes make in e4m3 (a float32 scale a
token-head: (D + 4) / 2D of bf16's bytes), for a run whose pool was bf16 or fp16. The replay
starts from an empty pool while the run's pool was warm, so the rates compared are those of the
run's second half (requests that started after its median start). The replayed rates are
**simulated** (page bookkeeping only): they say what a pool would hold, not how fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hstu_exp.kvcache.paged import CacheFullError, PagedKVCache  # noqa: E402
from hstu_exp.report.compare import OneLineParser  # noqa: E402
from hstu_exp.tracking.records import read_records  # noqa: E402


def replay_misses(requests: pd.DataFrame, pages: int, page_size: int) -> pd.Series:
    """Whether each request (index of `requests`) would find none of its history cached, with
    `pages` pages of `page_size` tokens a replica (each replica has its own pool; batch numbers
    count per replica), its batches replayed in the order they started."""
    replica = requests["replica"].fillna(0) if "replica" in requests else pd.Series(0, requests.index)
    missed = {}
    for _, part in requests.groupby(replica):
        cache = PagedKVCache(
            num_layers=1, num_pages=pages, page_size=page_size, num_heads=1, head_dim=1,
            dtype=torch.bfloat16, device="cpu",
        )  # fmt: skip
        batches = sorted(part.groupby("batch"), key=lambda kv: kv[1].start_s.min())
        for _, b in batches:
            users, history = b.user.tolist(), b.history.tolist()
            starts = [cache.cached_length(u) for u in users]
            new = [h - s for h, s in zip(history, starts)]
            cache.plan(users, new, b.candidates.tolist(), upload=False)
            missed.update((i, s == 0) for i, s in zip(b.index, starts))
    return pd.Series(missed).reindex(requests.index)


def fp8_pages(rec: dict) -> int:
    """The pages the run's pool bytes make with e4m3 K/V and a float32 scale a token-head."""
    d = int(rec["head_dim"])
    fp8_token_bytes = rec["kv_token_bytes"] * (d + 4) / (2 * d)
    return int(rec["kv_pool_bytes"] // (fp8_token_bytes * rec["page_size"]))


def describe(rec: dict, requests: pd.DataFrame, pools: list) -> list:
    """The recorded and replayed shares of requests that missed the GPU pool, per pool."""
    served = requests[requests.batch.notna()]  # a stopped run answers the rest without the model
    late = served.start_s > served.start_s.median()
    recorded = served.tier.ne("gpu")
    lines = [
        f"  recorded: missed the GPU pool {recorded[late].mean():.2%} (second half), "
        f"{recorded.mean():.2%} (all)"
    ]
    for label, pages in pools:
        try:
            missed = replay_misses(served, pages, int(rec["page_size"]))
        except CacheFullError:
            lines.append(f"  replayed (simulated), {label}: a batch needs more pages than that")
            continue
        lines.append(
            f"  replayed (simulated), {label}: missed the GPU pool {missed[late].mean():.2%} "
            f"(second half), {missed.mean():.2%} (all, from an empty pool)"
        )
    return lines


def _pages(text: str) -> list:
    try:
        pages = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected whole numbers, e.g. 64344,126708"
        ) from None
    if any(p < 1 for p in pages):
        raise argparse.ArgumentTypeError(f"{text!r}: a pool holds at least one page")
    return pages


def main(argv=None) -> int:
    ap = OneLineParser(prog="pool_replay.py", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--pages", type=_pages, default=[], help="other pool sizes, in pages")
    ap.add_argument("--fp8", action="store_true", help="also the run's pool bytes in e4m3")
    args = ap.parse_args(argv)
    seen = 0
    for rec in read_records(args.sweep_dir):
        job = Path(rec.get("job_dir") or "")
        if not job.exists():  # a sweep copied off the machine that ran it: its own job dirs
            job = args.sweep_dir / job.name
        if (
            rec.get("status") != "ok"
            or not rec.get("kv_pool_pages")
            or not (job / "requests.csv").exists()
        ):
            continue
        seen += 1
        own = int(rec["kv_pool_pages"])
        pools = [(f"the run's pool ({own} pages)", own)]
        if args.fp8 and rec.get("kv_dtype") in ("bfloat16", "float16"):  # 2 bytes a value
            fp8 = fp8_pages(rec)
            pools.append((f"fp8 in the same bytes ({fp8} pages)", fp8))
        pools += [(f"{p} pages", p) for p in args.pages]
        print(f"{job.name}: {rec.get('name')}, {rec.get('target_qps')} qps, {rec.get('kv_dtype')} pool")
        print("\n".join(describe(rec, pd.read_csv(job / "requests.csv"), pools)))
    if not seen:
        print(
            f"pool_replay.py: error: no ok serve point with a paged pool and requests.csv "
            f"in {args.sweep_dir}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
