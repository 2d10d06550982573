"""Regional ``torch.compile`` of a ViT's blocks that leaves the prefix attention eager.

A block with `PrefixAttention` reads its prefixes from a context-bound attribute and, on CPU, runs a
custom autograd Function whose backward calls ``torch.autograd.grad``: compiling it graph-breaks and
recompiles. So only the parts around it are compiled: a plain block whole, a prefix block's norms and
MLP. `nn.Module.compile` compiles in place, so state-dict keys stay unchanged (no ``_orig_mod.``).
"""

from __future__ import annotations

import torch._dynamo
from torch import nn

from norga.nn.prefix_attention import PrefixAttention

#: The sub-modules of a timm `Block` compiled when its attention is a prefix attention.
PREFIX_BLOCK_REGIONS = ("norm1", "norm2", "mlp")
#: Graphs kept per compiled forward. A run needs up to ~8 (training, no_grad, inference_mode, bf16 autocast,
#: each static then batch-dynamic); past torch's default limit (8) the extra variants would run eager.
RECOMPILE_LIMIT = 16


def compile_block(block: nn.Module, dynamic: bool | None = None, **options) -> list[str]:
    """Compile `block` in place (whole, or around a prefix attention); returns the compiled regions' names.

    ``dynamic=None`` (torch's automatic dynamic shapes): the first graph is static; a second batch size
    (an epoch's last, smaller batch; evaluation) compiles one batch-dynamic graph instead of one per size.
    Calling it again after the block's attention became a prefix attention re-splits it into regions.
    """
    options["dynamic"] = dynamic
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)  # process-wide
    if not isinstance(block.attn, PrefixAttention):
        block.compile(**options)
        return [""]
    block._compiled_call_impl = None  # undo a whole-block compile: the prefix attention stays eager
    regions = [name for name in PREFIX_BLOCK_REGIONS if not isinstance(getattr(block, name, None), (nn.Identity, type(None)))]
    for name in regions:
        getattr(block, name).compile(**options)
    return regions


def is_compiled(module: nn.Module) -> bool:
    """True when `module` itself was compiled in place by `nn.Module.compile`."""
    return getattr(module, "_compiled_call_impl", None) is not None
