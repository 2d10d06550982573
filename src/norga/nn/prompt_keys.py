"""Key–query prompt selection (L2P, DualPrompt, S-Prompt++): learnable keys matched to the frozen CLS feature.

As the official code (``peft/prompt/dp_prompt.py: EPrompt``): keys ``(pool, dim)`` initialised U(-1, 1);
the query is the frozen backbone's CLS pre-logits; both are L2-normalised and a sample takes the top-k
keys by cosine similarity. While training, DualPrompt / S-Prompt++ force the current task's slots (task
mask); the pull constraint ``mean_b Σ_k cos(query_b, key_selected)`` is what the loss subtracts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Selection(NamedTuple):
    """Slots chosen per sample, (B, top_k), and each sample's pull-constraint similarity Σ_k cos (B,)."""

    indices: Tensor
    per_sample_pull: Tensor

    @property
    def pull(self) -> Tensor:
        """The pull constraint of the batch, ``mean_b Σ_k cos(query_b, key_selected)`` (to be maximised)."""
        return self.per_sample_pull.mean()


def l2_normalize(x: Tensor, dim: int = -1, epsilon: float = 1e-12) -> Tensor:
    """``x / max(‖x‖, sqrt(ε))`` as the official ``l2_normalize`` (rsqrt of the clamped square sum)."""
    square_sum = (x * x).sum(dim=dim, keepdim=True)
    return x * torch.rsqrt(square_sum.clamp_min(epsilon))


def majority_vote(indices: Tensor, top_k: int) -> Tensor:
    """The batch's `top_k` most often selected slots, given to every sample (official ``batchwise_prompt``).

    Ties go to the lower slot index. Only a compatibility switch: with task-homogeneous test batches it
    leaks task identity between samples (NORGA_SPEC P2).
    """
    counts = torch.bincount(indices.flatten(), minlength=int(indices.max()) + 1)
    order = torch.sort(counts, descending=True, stable=True).indices[:top_k]
    return order.unsqueeze(0).expand(indices.shape[0], -1).contiguous()


class PromptKeys(nn.Module):
    """One learnable key per pool slot and top-k selection by cosine similarity to a query."""

    def __init__(self, pool_size: int, dim: int) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"a prompt pool needs at least one slot, got pool_size={pool_size}")
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1.0, 1.0))

    @property
    def pool_size(self) -> int:
        return self.keys.shape[0]

    def similarity(self, query: Tensor) -> Tensor:
        """Cosine similarity (B, pool) of every query with every key."""
        return l2_normalize(query.float()) @ l2_normalize(self.keys).T

    def select(self, query: Tensor, top_k: int, forced: Tensor | None = None, batchwise: bool = False) -> Selection:
        """Top-k keys per query; `forced` (B, top_k) overrides the choice (the training task mask).

        `batchwise` replaces each sample's choice by the batch's majority (official compat, off by default).
        """
        if not 1 <= top_k <= self.pool_size:
            raise ValueError(f"top_k must be in [1, {self.pool_size}] (the pool size), got {top_k}")
        similarity = self.similarity(query)
        indices = similarity.topk(top_k, dim=1).indices
        if batchwise:
            indices = majority_vote(indices, top_k)
        if forced is not None:
            indices = forced.to(indices.device).expand(len(query), -1)
        return Selection(indices, similarity.gather(1, indices).sum(dim=1))

