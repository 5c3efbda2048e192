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


def topk_agreement(scores: torch.Tensor, ref: torch.Tensor, counts: List[int], k: int) -> float:
    """Mean over requests of |top-k(scores) ∩ top-k(ref)| / k', k' = min(k, the request's
    candidates): how much of a ranking's head two paths share. scores, ref: [rows] (one task's
    logits), `counts` rows a request."""
    shares = []
    for s, r in zip(scores.double().split(counts), ref.double().split(counts)):
        kk = min(k, s.numel())
        if kk == 0:
            continue
        top = set(s.topk(kk).indices.tolist())
        shares.append(len(top & set(r.topk(kk).indices.tolist())) / kk)
    return sum(shares) / len(shares) if shares else 1.0
