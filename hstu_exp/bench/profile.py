"""profile=true: where the time of a point goes, kernel by kernel (torch.profiler).

Runs a few extra iterations of the timed step under the profiler after timing (so the timing
itself is never profiled), writes the kernel table beside the record and returns the top
kernels for the record itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def profile_step(step, *, device: torch.device, iters: int, out_dir: Path, top: int = 8) -> dict:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for i in range(iters):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort, row_limit=40)
    out = Path(out_dir) / "profile.txt"
    out.write_text(table)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(((e.key, getattr(e, attr, 0) or 0) for e in events), key=lambda r: -r[1])
    total = sum(t for _, t in rows) or 1
    return {
        "profile_file": str(out),
        "profile_top": [
            {"kernel": k[:80], "share": round(t / total, 4), "us_per_iter": round(t / iters, 2)}
            for k, t in rows[:top]
        ],
    }
