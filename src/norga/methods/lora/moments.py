"""The uncentred second moment of every block's ``attn.qkv`` input over all tokens of a pass (LORA_SPEC §2.3).

The official code keeps a running mean on the CPU in float32, batch by batch; the sums here are float64, kept where
the batch is and divided once, which is the same mean to float64 rounding and independent of the batch order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from norga.nn.attachments import OutputHook
from norga.runtime.distributed import Distributed


class SecondMoments:
    """Σ x xᵀ (float64, d × d) and the number of tokens per block, filled by `hooks` during forward passes."""

    def __init__(self, depth: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(depth, dim, dim, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(depth, dtype=torch.float64, device=device)

    def hooks(self) -> dict[int, OutputHook]:
        """An attachment per block that adds its ``attn.qkv`` input to the sums and leaves the output as it is."""
        return {block: OutputHook("attn.qkv", self._recorder(block)) for block in range(len(self.sums))}

    def _recorder(self, block: int) -> Callable[[Tensor, Tensor], Tensor]:
        def record(x: Tensor, output: Tensor) -> Tensor:
            rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            self.sums[block] += rows.T @ rows
            self.tokens[block] += rows.shape[0]
            return output

        return record

    def means(self, dist: Distributed | None = None) -> Tensor:
        """(depth, d, d): Σ x xᵀ / tokens per block, summed over the processes of a distributed run first."""
        sums, tokens = self.sums, self.tokens
        if dist is not None:
            sums, tokens = dist.all_sum(sums), dist.all_sum(tokens)
        if not bool((tokens > 0).all()):
            raise RuntimeError("a block's second moment saw no tokens: the pass had no images")
        return sums / tokens[:, None, None]
