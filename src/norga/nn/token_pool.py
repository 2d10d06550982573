"""Prompt-tuning pool (L2P): prompts are tokens prepended to the sequence, not prefixes of the attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class TokenPool(nn.Module):
    """`prompts` (layers, pool, Lp, dim), U(-1, 1) as the official ``EPrompt``; one parameter, shared by all
    tasks (L2P trains whichever slots a batch selects)."""

    def __init__(self, num_layers: int, pool_size: int, length: int, dim: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(num_layers, pool_size, length, dim).uniform_(-1.0, 1.0))

    @property
    def num_slots(self) -> int:
        return self.prompts.shape[1]

    def gather_top_k(self, indices: Tensor) -> list[Tensor]:
        """Per layer, the tokens (B, k·Lp, dim) of each sample's k slots ``indices[b]``, concatenated in order."""
        if indices.dim() != 2:
            raise ValueError(f"indices must be shaped (batch, top_k), got {tuple(indices.shape)}")
        picked = self.prompts[:, indices]  # (layers, B, k, Lp, dim)
        return list(picked.flatten(2, 3))

    @torch.no_grad()
    def copy_slot(self, source: int, target: int) -> None:
        """Initialise slot `target` from slot `source` (every layer): sequential init."""
        self.prompts[:, target] = self.prompts[:, source]

    def begin_slots(self, slots: Sequence[int], sources: Sequence[int] | None = None,
                    generator: torch.Generator | None = None) -> None:
        """Ready `slots` to train as `PrefixPool.begin_slots` does: copies of `sources` (sequential init) when given.
        Token slots train directly, so `generator` draws nothing."""
        for source, target in zip(sources or (), slots):
            self.copy_slot(source, target)
