"""A slow, obvious ViT forward in plain torch, for recomputing what a prompted model computes.

It reads the frozen weights of a timm `VisionTransformer` (pre-norm blocks, class token, learned position
embedding, CLS pooling, no dropout) and redoes every step by hand: patches cut out and projected, LayerNorm
written out, per-head attention with each sample's prefix keys and values concatenated in front of the tokens'
(a score gate applied to the prefix columns), erf GELU, prompt tokens prepended before a block. Nothing of
norga's model code is used, so a change there shows up as a difference. It runs in float64, so
the fp32 model under test is the only source of rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

Gate = Callable[[Tensor], Tensor]


class SlowPrefix(NamedTuple):
    """One block's prefix for sample b: keys[b] and values[b], each (heads, Lp, head_dim); `gate` maps the
    scaled prefix scores (None: unchanged)."""

    keys: list[Tensor]
    values: list[Tensor]
    gate: Gate | None = None


def check_plain(backbone: nn.Module) -> None:
    """The slow forward covers the plain ViT only: refuse anything it would silently compute differently."""
    assert backbone.global_pool == "token" and backbone.num_prefix_tokens == 1 and not backbone.no_embed_class
    assert isinstance(backbone.norm_pre, nn.Identity) and isinstance(backbone.fc_norm, nn.Identity)
    for block in backbone.blocks:
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            assert isinstance(getattr(block, name), nn.Identity), name
        assert isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)
        assert block.attn.attn_drop.p == 0 and block.attn.proj_drop.p == 0 and block.mlp.drop1.p == 0
        assert isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"


def like(weight: Tensor, x: Tensor) -> Tensor:
    """A frozen weight in the computation's dtype (the reference runs in float64)."""
    return weight.detach().to(x.dtype)


def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + norm.eps) * like(norm.weight, x) + like(norm.bias, x)


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def embed(backbone: nn.Module, images: Tensor) -> Tensor:
    """[CLS; patch tokens] + position embedding, (B, 1 + patches, dim)."""
    conv = backbone.patch_embed.proj
    size = conv.kernel_size[0]
    batch, channels = images.shape[:2]
    patches = images.unfold(2, size, size).unfold(3, size, size)  # (B, C, rows, cols, size, size)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, channels * size * size)
    tokens = patches @ like(conv.weight, images).reshape(conv.out_channels, -1).T + like(conv.bias, images)
    cls = like(backbone.cls_token, images).expand(batch, -1, -1)
    return torch.cat([cls, tokens], dim=1) + like(backbone.pos_embed, images)


def attention(block: nn.Module, x: Tensor, prefix: SlowPrefix | None) -> Tensor:
    """Multi-head self-attention of block `block` on x (B, N, dim): per head, softmax over the scores of
    [prefix keys; token keys] (the gate on the prefix columns), weights times [prefix values; token values]."""
    attn = block.attn
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    head_dim = dim // heads
    qkv = x @ like(attn.qkv.weight, x).T + like(attn.qkv.bias, x)  # (B, N, 3·dim): [q | k | v], heads in order
    q, k, v = (qkv[..., part * dim : (part + 1) * dim].reshape(batch, tokens, heads, head_dim).transpose(1, 2)
               for part in range(3))  # (B, H, N, d)
    scores = q @ k.transpose(2, 3) / math.sqrt(head_dim)
    values = v
    if prefix is not None:
        prefix_keys, prefix_values = torch.stack(prefix.keys), torch.stack(prefix.values)  # (B, H, Lp, d)
        prefix_scores = q @ prefix_keys.transpose(2, 3) / math.sqrt(head_dim)
        if prefix.gate is not None:
            prefix_scores = prefix.gate(prefix_scores)
        scores = torch.cat([prefix_scores, scores], dim=3)
        values = torch.cat([prefix_values, v], dim=2)
    weights = torch.exp(scores - scores.max(dim=3, keepdim=True).values.detach())
    out = (weights / weights.sum(dim=3, keepdim=True)) @ values  # (B, H, N, d)
    return out.transpose(1, 2).reshape(batch, tokens, dim) @ like(attn.proj.weight, x).T + like(attn.proj.bias, x)


def cls_features(
    backbone: nn.Module,
    images: Tensor,
    prefixes: Mapping[int, SlowPrefix] | None = None,
    tokens: Mapping[int, list[Tensor]] | None = None,
) -> Tensor:
    """The class token after the final LayerNorm (B, dim), computed in float64. `prefixes[block]` extends that block's attention;
    `tokens[block][b]` (n, dim) is prepended to sample b's sequence before the block (the CLS token then sits
    after every prepended token)."""
    prefixes, tokens = prefixes or {}, tokens or {}
    x = embed(backbone, images.double())
    prepended = 0
    for index, block in enumerate(backbone.blocks):
        if index in tokens:
            x = torch.stack([torch.cat([tokens[index][b], x[b]]) for b in range(len(x))])
            prepended += tokens[index][0].shape[0]
        x = x + attention(block, layer_norm(x, block.norm1), prefixes.get(index))
        hidden = layer_norm(x, block.norm2)
        hidden = gelu(hidden @ like(block.mlp.fc1.weight, x).T + like(block.mlp.fc1.bias, x))
        x = x + hidden @ like(block.mlp.fc2.weight, x).T + like(block.mlp.fc2.bias, x)
    return layer_norm(x, backbone.norm)[:, prepended]


def masked_cross_entropy(logits: Tensor, labels: Tensor, allowed: list[int]) -> Tensor:
    """Per-sample cross-entropy over the `allowed` classes only (every other logit left out), (B,)."""
    losses = []
    for b in range(len(labels)):
        picked = logits[b, allowed]
        top = picked.max().detach()
        log_partition = top + torch.log(torch.exp(picked - top).sum())
        losses.append(log_partition - logits[b, int(labels[b])])
    return torch.stack(losses)
