"""The HSTU ranking model (docs/design.md §1.1, §2): embeddings -> HSTU block -> candidate
outputs, L2-normalised -> one MLP per task -> per-task logits.

`forward_rows` is the device part of a ranking step (embeddings, block, heads): run eagerly, or
replayed per bucket by a graph runner (`graphs.GraphedRanker`) that captured exactly it. The
request path around it (cache lookup, page planning, onloads) is `hstu_exp.serving`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from hstu_exp.model.embeddings import SequenceEmbeddings
from hstu_exp.model.hstu import HSTUBlock
from hstu_exp.ops.policy import KernelPolicy


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
    def __init__(
        self,
        *,
        num_layers: int,
        hidden: int,
        num_heads: int,
        head_dim: int,
        scaling_length: int,
        kernel: str,
        item_vocab: int,
        action_vocab: int,
        num_context: int,
        context_vocab: int,
        max_history: int,
        position_embedding: bool,
        head_widths: Sequence[int],
        num_tasks: int,
        policy: KernelPolicy = KernelPolicy(),
    ):
        super().__init__()
        self.embeddings = SequenceEmbeddings(
            hidden=hidden,
            item_vocab=item_vocab,
            action_vocab=action_vocab,
            num_context=num_context,
            context_vocab=context_vocab,
            max_history=max_history,
            position_embedding=position_embedding,
        )
        self.block = HSTUBlock(
            num_layers=num_layers,
            hidden=hidden,
            num_heads=num_heads,
            head_dim=head_dim,
            scaling_length=scaling_length,
            kernel=kernel,
            policy=policy,
        )
        self.heads = TaskHeads(hidden=hidden, widths=head_widths, num_tasks=num_tasks)


def phase(name: str):
    """A profiler label for one phase of a ranking step (host time per phase in a GPU trace); a
    bare `record_function` costs microseconds even with no profiler running, this nothing."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def forward_rows(model: HSTURanker, tokens, batch, pool=None, on_layer=None):
    """The device part of a step: embeddings -> block -> candidate rows -> heads.
    Returns (logits, candidate hidden states). A graph runner captures exactly this."""
    with phase("rank.embed"):
        x = model.embeddings(tokens)
    with phase("rank.block"):
        h = model.block(x, batch, pool, on_layer)[tokens.candidate_rows]
    with phase("rank.heads"):
        return model.heads(h), h
