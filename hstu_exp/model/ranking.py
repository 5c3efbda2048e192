"""The HSTU ranking model (docs/design.md §1.1, §2): embeddings -> HSTU block -> candidate
outputs, L2-normalised -> one MLP per task -> per-task logits.

`rank` serves one batch of requests: cache lookup and stripping (through the manager), token
rows, then the device part of the step, `forward_rows` (embeddings, block, heads), run eagerly or
replayed per bucket by a graph runner (`graphs.GraphedRanker`) that captured exactly it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from hstu_exp.data.synthetic import Request
from hstu_exp.model.embeddings import SequenceEmbeddings
from hstu_exp.model.hstu import HSTUBlock
from hstu_exp.model.jagged import make_batch


class TaskHeads(nn.Module):
    """Per task an MLP `hidden -> widths[0] -> ... -> widths[-1]` (ReLU between layers)."""

    def __init__(self, *, hidden: int, widths: Sequence[int], num_tasks: int):
        super().__init__()

        def mlp():
            dims = [hidden, *widths]
            layers = []
            for i, (a, b) in enumerate(zip(dims, dims[1:])):
                layers.append(nn.Linear(a, b))
                if i < len(dims) - 2:
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.tasks = nn.ModuleList(mlp() for _ in range(num_tasks))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [candidates, hidden] -> logits [candidates, num_tasks * widths[-1]]."""
        h = F.normalize(h, dim=-1)
        return torch.cat([task(h) for task in self.tasks], dim=-1)


class HSTURanker(nn.Module):
    def __init__(self, *, num_layers: int, hidden: int, num_heads: int, head_dim: int,
                 scaling_length: int, kernel: str, item_vocab: int, action_vocab: int,
                 num_context: int, context_vocab: int, max_history: int,
                 position_embedding: bool, head_widths: Sequence[int], num_tasks: int,
                 autotune: bool = True):
        super().__init__()
        self.embeddings = SequenceEmbeddings(
            hidden=hidden, item_vocab=item_vocab, action_vocab=action_vocab,
            num_context=num_context, context_vocab=context_vocab, max_history=max_history,
            position_embedding=position_embedding)
        self.block = HSTUBlock(num_layers=num_layers, hidden=hidden, num_heads=num_heads,
                               head_dim=head_dim, scaling_length=scaling_length, kernel=kernel,
                               autotune=autotune)
        self.heads = TaskHeads(hidden=hidden, widths=head_widths, num_tasks=num_tasks)


def _phase(name: str):
    """A profiler label for one phase of `rank` (host time per phase in a GPU trace); a bare
    `record_function` costs microseconds even with no profiler running, this costs nothing."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def forward_rows(model: HSTURanker, tokens, batch, pool=None, on_layer=None):
    """The device part of a step: embeddings -> block -> candidate rows -> heads.
    Returns (logits, candidate hidden states). A graph runner captures exactly this."""
    with _phase("rank.embed"):
        x = model.embeddings(tokens)
    with _phase("rank.block"):
        h = model.block(x, batch, pool, on_layer)[tokens.candidate_rows]
    with _phase("rank.heads"):
        return model.heads(h), h


@torch.no_grad()
def rank(model: HSTURanker, requests: Sequence[Request], *, device, manager=None, graphs=None,
         return_hidden: bool = False):
    """Logits [sum of candidates, tasks] of a batch of requests, user by user.

    manager: a `KVCacheManager` (lookup, strip the cached prefix, plan pages, layer-wise onload
    waits) or None for a full recompute of every sequence.
    graphs: a `GraphedRanker` replaying `forward_rows` per bucket (host onloads land first), or
    None to run it eagerly.

    Nothing here waits for the device: metadata is built on the host and copied with
    non_blocking copies from pinned memory, so the host prepares this batch while the device may
    still run the previous one."""
    with _phase("rank.plan"):
        if manager is not None:
            starts, table, on_layer = manager.plan(requests)
            pool = manager.cache.pool
        else:
            starts, table, on_layer, pool = [0] * len(requests), None, None, None
    with _phase("rank.tokens"):
        tokens = model.embeddings.tokens(requests, starts, device)
        batch = make_batch(tokens.rows, tokens.num_candidates, device, table)
    if graphs is None:
        logits, h = forward_rows(model, tokens, batch, pool, on_layer)
    else:
        with _phase("rank.graph"):
            if on_layer is not None:  # one replay runs every layer: all onloads must land first
                for layer in range(len(model.block.layers)):
                    on_layer(layer)
            logits, h = graphs.run(graphs.stage_step(tokens, batch))
    return (logits, h) if return_hidden else logits
