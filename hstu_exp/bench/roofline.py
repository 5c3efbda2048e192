"""The hardware floor of a point: max(flops / peak FLOP/s, min bytes / bandwidth).

Peaks come from a short calibration on the device itself (a large matmul in the model dtype and a
device copy), cached per device and dtype in $HSTU_EXP_CACHE_DIR/calibration.json (default
$XDG_CACHE_HOME/hstu-exp, else ~/.cache/hstu-exp). The cache only saves time: one that cannot be
read or written costs a calibration per point, never the point. A calibration measured while the
machine was busy (load average above half its cores) is used by its point but not cached, and a
cached one is measured again after CACHE_DAYS.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from hstu_exp.env import device_name

log = logging.getLogger(__name__)


CACHE_DAYS = 30
BUSY_LOAD_PER_CORE = 0.5


def cache_file() -> Path:
    if os.environ.get("HSTU_EXP_CACHE_DIR"):
        return Path(os.environ["HSTU_EXP_CACHE_DIR"]) / "calibration.json"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "hstu-exp" / "calibration.json"


def _busy() -> bool:
    """Whether other work competes with a calibration now (its peaks would come out low)."""
    try:
        return os.getloadavg()[0] > BUSY_LOAD_PER_CORE * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def _read_cache(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or torn: calibrate again
        return {}
    return table if isinstance(table, dict) else {}


def _fresh(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("peak_tflops"), (int, float))
        and isinstance(entry.get("peak_gbps"), (int, float))
        and time.time() - entry.get("measured_at", 0) < CACHE_DAYS * 86400
    )


def _write_cache(path: Path, table: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)  # a second process reads the old table or the new one
    except OSError as exc:
        log.warning(
            f"calibration not cached ({path}: {exc.strerror or exc}); set "
            "HSTU_EXP_CACHE_DIR to a writable dir, or calibrate=false"
        )
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _best_ms(fn, device, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _measure(device: torch.device, dtype: torch.dtype) -> dict:
    n, copy_bytes = (8192, 2 << 30) if device.type == "cuda" else (1024, 64 << 20)
    a = torch.randn(n, n, device=device).to(dtype)  # random data: zeros run faster
    b = torch.randn(n, n, device=device).to(dtype)
    reps = 10 if device.type == "cuda" else 3
    mm_ms = _best_ms(lambda: torch.mm(a, b), device, reps)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = _best_ms(lambda: dst.copy_(src), device, reps)
    return {
        "peak_tflops": 2 * n**3 / mm_ms / 1e9,
        "peak_gbps": 2 * copy_bytes / copy_ms / 1e6,
    }  # bytes read + written


def peaks(device: torch.device, dtype: torch.dtype) -> dict:
    key = f"{device_name(device)}|{dtype}"
    path = cache_file()
    table = _read_cache(path)
    if _fresh(table.get(key)):
        return {k: table[key][k] for k in ("peak_tflops", "peak_gbps")}
    busy = _busy()
    log.info(
        f"calibrating peak FLOP/s and bandwidth of {key} "
        f"({'busy machine: not cached' if busy else f'cached in {path}'})"
    )
    peak = _measure(device, dtype)
    if not busy:
        _write_cache(path, {**_read_cache(path), key: {**peak, "measured_at": time.time()}})
    return peak


def attention_pairs(*, history: int, new: int, candidates: int) -> int:
    """Visible (query, key) pairs of one user: new history token at position p sees p + 1 keys;
    each candidate sees the whole history and itself."""
    cached = history - new
    return new * cached + new * (new + 1) // 2 + candidates * (history + 1)


def block_work(
    *,
    num_layers: int,
    hidden: int,
    num_heads: int,
    head_dim: int,
    itemsize: int,
    histories: Sequence[int],
    news: Sequence[int],
    candidates: Sequence[int],
):
    """FLOPs and the fewest bytes of one block forward over a batch.

    FLOPs: the two projections per computed token plus 4*H*D per visible attention pair.
    Bytes: weights once, each history K/V read once (and the new ones written once), block input
    read and output written once; everything else could stay on chip in a perfect kernel."""
    width = num_heads * head_dim
    tokens = sum(n + c for n, c in zip(news, candidates))
    pairs = sum(
        attention_pairs(history=t, new=n, candidates=c) for t, n, c in zip(histories, news, candidates)
    )
    flops = num_layers * (2 * tokens * hidden * 5 * width + 4 * pairs * width)
    weights = hidden * 4 * width + 4 * width + width * hidden + 2 * hidden + 2 * width
    kv = 2 * width * (sum(histories) + sum(news))
    nbytes = itemsize * (num_layers * (weights + kv) + 2 * tokens * hidden)
    return flops, nbytes


def mean_block_work(model, dtype, batches) -> tuple:
    """block_work of the model config `model` per batch, averaged over `batches` (each a
    (histories, news, candidates) triple); (0, 0) for none. The floor is linear in both, so the
    floor of these means is the mean batch's floor, comparable to a mean latency."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    flops = nbytes = 0
    count = 0
    for histories, news, candidates in batches:
        f, b = block_work(
            num_layers=model.num_layers,
            hidden=model.hidden,
            num_heads=model.num_heads,
            head_dim=model.head_dim,
            itemsize=itemsize,
            histories=histories,
            news=news,
            candidates=candidates,
        )
        flops, nbytes, count = flops + f, nbytes + b, count + 1
    return flops / max(count, 1), nbytes / max(count, 1)


def floor(flops: float, nbytes: float, peak: dict) -> dict:
    compute_ms = flops / (peak["peak_tflops"] * 1e9)
    memory_ms = nbytes / (peak["peak_gbps"] * 1e6)
    return {
        "flops": flops,
        "min_bytes": nbytes,
        "floor_ms": max(compute_ms, memory_ms),
        "floor_bound": "compute" if compute_ms >= memory_ms else "memory",
        **peak,
    }
