"""How far outputs are from a reference recompute, per request (e2e and serve verify with it)."""

from __future__ import annotations

from typing import List, Optional

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor, counts: List[int]) -> float:
    """Worst per-request ||out - ref|| / ||ref|| over that request's candidate rows (`counts`
    rows each, in order)."""
    worst = 0.0
    for o, r in zip(out.double().split(counts), ref.double().split(counts)):
        worst = max(worst, float((o - r).norm() / r.norm().clamp_min(1e-30)))
    return worst


def topk_agreement(
    scores: torch.Tensor, ref: torch.Tensor, counts: List[int], k: int, tol: Optional[List[float]] = None
) -> float:
    """Mean over requests of the share of top-k(scores) that `ref` also ranks in its top k', k' =
    min(k, the request's candidates): how much of a ranking's head two paths share. scores,
    ref: [rows] (one task's logits), `counts` rows a request.

    `tol` (one value a request): a candidate also counts when its ref score is within tol of
    ref's k'-th score, i.e. when ref cannot tell it from its own top k' at that precision. With
    no tol (or 0) and no exact ties this is |top-k(scores) ∩ top-k(ref)| / k'."""
    shares = []
    tols = tol if tol is not None else [0.0] * len(counts)
    for s, r, t in zip(scores.double().split(counts), ref.double().split(counts), tols):
        kk = min(k, s.numel())
        if kk == 0:
            continue
        kth = r.topk(kk).values[-1]
        shares.append(float((r[s.topk(kk).indices] >= kth - t).double().mean()))
    return sum(shares) / len(shares) if shares else 1.0


def request_error(out: torch.Tensor, ref: torch.Tensor, counts: List[int]) -> List[float]:
    """Per request, the largest |out - ref| over its rows: one path's own error (the tolerance
    topk_agreement gives ranks that path cannot resolve)."""
    return [
        float((o - r).abs().max()) if o.numel() else 0.0
        for o, r in zip(out.double().split(counts), ref.double().split(counts))
    ]


def near_kth_share(ref: torch.Tensor, counts: List[int], k: int, tol: List[float]) -> float:
    """Mean over requests of the share of candidates within tol of ref's k-th score (ties at
    that precision): near 1, any ranking passes a tolerant agreement; the record states it."""
    shares = []
    for r, t in zip(ref.double().split(counts), tol):
        kk = min(k, r.numel())
        if kk == 0:
            continue
        kth = r.topk(kk).values[-1]
        shares.append(float(((r - kth).abs() <= t).double().mean()))
    return sum(shares) / len(shares) if shares else 0.0
