"""Running the real CLI from tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["workload.warmup=1", "workload.iters=3", "workload.min_time_s=0.01"]


def hstu_exp(*args, cwd=None, timeout=300, env=None):
    """Runs `python -m hstu_exp ARGS`; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hstu_exp", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def spec_block(block, x, history: int):
    """DESIGN §2 written out in float64 with explicit loops over heads: the independent oracle
    for the block. x: one user's whole sequence [length, hidden]; rows from `history` on are
    candidates (each sees the history and itself)."""
    import math

    import torch
    import torch.nn.functional as F

    x = x.double()
    length = x.shape[0]
    mask = torch.zeros(length, length, dtype=torch.float64)
    for i in range(length):
        if i < history:
            mask[i, :i + 1] = 1
        else:
            mask[i, :history] = 1
            mask[i, i] = 1
    for layer in block.layers:
        H, D = layer.num_heads, layer.head_dim
        p = {n: t.double() for n, t in layer.named_parameters()}
        n = F.layer_norm(x, (x.shape[1],), p["norm.weight"], p["norm.bias"], 1e-5)
        u, v, q, k = F.silu(n @ p["uvqk.weight"].T + p["uvqk.bias"]).split(H * D, dim=-1)
        heads = []
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            s = F.silu(q[:, sl] @ k[:, sl].T / math.sqrt(D)) * block.inv_n
            heads.append((s * mask) @ v[:, sl])
        a = F.layer_norm(torch.cat(heads, -1), (H * D,), p["attn_norm.weight"],
                         p["attn_norm.bias"], 1e-5)
        x = x + (u * a) @ p["out.weight"].T
    return x
