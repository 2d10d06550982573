"""The last block of a timm ViT computed for the one token that pooling reads.

With timm's ``global_pool="token"`` the features are one row (the class token) of the final norm's output, so the
last block's queries, attention output, output projection, ``norm2`` and MLP matter on that row only; its keys and
values still need every token. Computing just that row removes ~5/6 of the block's matmul work, forward and backward
(~7 % of a 12-block ViT's step). `pooled_row` computes it with the block's own modules; `computes_row_only` says
when that equals timm's full block to rounding, i.e. when nothing could see the block's other rows.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from norga.nn.prefix_attention import PrefixAttention

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def pooled_row(block: Block, x: Tensor, row: int) -> Tensor:
    """``block(x)[:, row:row + 1]`` for x (B, N, D), computed for that row only (keys and values from all N).

    The block's modules are called (norms, MLP, projections, layer scales, drop paths), so a compiled region keeps
    its compiled forward; only the fused ``qkv`` is read as a weight, split into its query and key/value rows.
    """
    x_row = x[:, row : row + 1]
    x_row = x_row + block.drop_path1(block.ls1(_attention_row(block.attn, block.norm1(x), row)))
    return x_row + block.drop_path2(block.ls2(block.mlp(block.norm2(x_row))))


def _attention_row(attention: Attention | PrefixAttention, y: Tensor, row: int) -> Tensor:
    """Attention output (B, 1, D) of query `row` of the normed tokens y (B, N, D) over all N keys."""
    batch, tokens, _ = y.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    width = heads * head_dim
    weight, bias = attention.qkv.weight, attention.qkv.bias  # timm's layout: rows [q; k; v], `width` each
    query = F.linear(y[:, row : row + 1], weight[:width], None if bias is None else bias[:width])
    keys_values = F.linear(y, weight[width:], None if bias is None else bias[width:])
    query = query.reshape(batch, 1, heads, head_dim).transpose(1, 2)
    key, value = keys_values.reshape(batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = _attend(attention, attention.q_norm(query), attention.k_norm(key), value)
    out = attention.norm(out.transpose(1, 2).reshape(batch, 1, width))
    return attention.proj_drop(attention.proj(out))


def _attend(attention: Attention | PrefixAttention, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """The attention's own kernel: a `PrefixAttention`'s (in bf16 on CPU an explicit one, not the flash kernel),
    else scaled dot-product attention as timm's."""
    if isinstance(attention, PrefixAttention):
        return attention.attend(query, key, value)
    dropout_p = attention.attn_drop.p if attention.training else 0.0
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=attention.scale)


def computes_row_only(backbone: VisionTransformer) -> bool:
    """Whether the backbone's features are its last block's pooled row after the final norm and nothing else sees
    that block's output: token pooling with timm's own forward, no gradient checkpointing, a plain timm `Block` with
    timm's attention (or a `PrefixAttention` with no prefix bound) and a fused ``qkv`` Linear, and no hooks on the
    block, its sub-modules, the final norm or the block list (nor global module hooks)."""
    blocks = backbone.blocks
    return (
        len(blocks) > 0
        and backbone.global_pool == "token"
        and backbone.attn_pool is None
        and not getattr(backbone, "grad_checkpointing", False)
        and type(backbone).forward_features is VisionTransformer.forward_features
        and type(backbone).pool is VisionTransformer.pool
        and _is_plain_block(blocks[-1])
        and not any(_has_hooks(module) for module in (blocks, *blocks[-1].modules(), *backbone.norm.modules()))
        and not any(getattr(torch_module, name) for name in _GLOBAL_HOOK_DICTS)
    )


def _is_plain_block(block: nn.Module) -> bool:
    """A timm `Block` whose attention `_attention_row` computes exactly: timm's or an unbound `PrefixAttention`,
    without timm's optional output gate, with a plain fused ``qkv``."""
    if type(block) is not Block:
        return False
    attention = block.attn
    if type(attention) is PrefixAttention:
        plain_attention = not attention.has_prefix
    else:
        plain_attention = type(attention) is Attention
    return plain_attention and getattr(attention, "gate", None) is None and type(attention.qkv) is nn.Linear


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOK_DICTS)
