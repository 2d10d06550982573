"""Reparameterized prefixes (Le et al., ICLR 2025, *Revisiting Prefix-tuning: Statistical Benefits of
Reparameterization among Prompts*): a slot's prefix keys and values produced by a small network from embeddings of
its own rather than learned directly.

As the official code's deep-share variant (``ReparamPrefix``, ``CV/src/models/vit_prompt/vit.py``): per prompted
layer an embedding ``E`` (Lp, D) and its own MLP ``Linear(D, 48) -> Tanh -> Linear(48, 2D)``; row i's key is
``out[i, 0::2]`` and its value ``out[i, 1::2]`` (interleaved columns, not halves), both in per-head key/value
space. `PrefixPool` (``param="mlp"``) folds the output into a plain slot once the slot stops training.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

#: How a prefix slot is parameterized: its keys and values directly (``raw``), or produced by `PrefixMLP` (``mlp``).
PREFIX_PARAMS = ("raw", "mlp")
PrefixParam = Literal["raw", "mlp"]
#: The official MLP's hidden width.
MLP_HIDDEN = 48
#: Values one patch token of ViT-B/16 is made of (3 x 16 x 16): the official embedding init's fan-in.
VIT_B16_PATCH_INPUTS = 3 * 16 * 16


def embedding_bound(patch_inputs: int, dim: int) -> float:
    """The official embedding init's bound ``sqrt(6 / (patch_inputs + D))`` (VPT's: 0.0625 for ViT-B/16)."""
    return math.sqrt(6.0 / (patch_inputs + dim))


class PrefixMLP(nn.Module):
    """One slot's reparameterization over `num_layers` prompted layers: embeddings (layers, Lp, D) and one MLP per
    layer; calling it gives the slot (layers, 2 = key/value, Lp, heads, head_dim) in float32.

    Init as officially: embeddings U(-b, b) with b = `embedding_bound` (`patch_inputs`: channels x patch height x
    width of the backbone), the linears torch's default (U(±1/sqrt(fan_in)) for weights and biases).
    """

    def __init__(self, num_layers: int, length: int, num_heads: int, head_dim: int,
                 patch_inputs: int = VIT_B16_PATCH_INPUTS, hidden: int = MLP_HIDDEN,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.bound = embedding_bound(patch_inputs, dim)
        self.embeddings = nn.Parameter(torch.empty(num_layers, length, dim))
        self.mlps = nn.ModuleList(
            nn.Sequential(skip_init(nn.Linear, dim, hidden), nn.Tanh(), skip_init(nn.Linear, hidden, 2 * dim))
            for _ in range(num_layers))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A fresh official init drawn from `generator` (default: torch's global one): the embeddings, then each
        layer's linears in order, each as `nn.Linear.reset_parameters` draws it (weight, then bias)."""
        self.embeddings.uniform_(-self.bound, self.bound, generator=generator)
        for mlp in self.mlps:
            for linear in (mlp[0], mlp[2]):
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self) -> Tensor:
        """The slot's prefixes (layers, 2, Lp, heads, head_dim), in float32 under any autocast (a folded slot then
        holds exactly what training used)."""
        with torch.autocast(self.embeddings.device.type, enabled=False):
            out = torch.stack([mlp(embedding) for mlp, embedding in zip(self.mlps, self.embeddings)])
        layers, length, _ = out.shape
        pairs = out.view(layers, length, -1, 2).permute(0, 3, 1, 2)  # column 2c -> key c, column 2c+1 -> value c
        return pairs.reshape(layers, 2, length, self.num_heads, self.head_dim)

    def extra_repr(self) -> str:
        layers, length, dim = self.embeddings.shape
        return f"layers={layers}, length={length}, dim={dim}, hidden={self.mlps[0][0].out_features}"
