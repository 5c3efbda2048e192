"""How far outputs are from a reference recompute, per request (e2e and serve verify with it)."""
from __future__ import annotations

from typing import List

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor, counts: List[int]) -> float:
    """Worst per-request ||out - ref|| / ||ref|| over that request's candidate rows (`counts`
    rows each, in order)."""
    worst = 0.0
    for o, r in zip(out.double().split(counts), ref.double().split(counts)):
        worst = max(worst, float((o - r).norm() / r.norm().clamp_min(1e-30)))
    return worst
