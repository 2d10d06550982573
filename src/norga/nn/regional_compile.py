"""Regional ``torch.compile`` of a ViT's blocks that leaves the prefix attention eager.

A block with `PrefixAttention` reads its prefixes from a scoped binding and, on CPU, runs a custom
autograd Function whose backward calls ``torch.autograd.grad``: compiling it graph-breaks and recompiles.
So every block is compiled by region (norms, MLP, and the attention while it is timm's own), never whole:
a block whose attention later becomes a prefix attention keeps its compiled norms and MLP, and the new
attention stays eager. `nn.Module.compile` compiles in place, so state-dict keys stay unchanged (no
``_orig_mod.``), and nothing here touches private torch or timm attributes.
"""

from __future__ import annotations

import copy

import torch._dynamo
from torch import nn

from norga.nn.prefix_attention import PrefixAttention

#: The sub-modules of a timm `Block` compiled in place (``attn`` only while it is not a prefix attention).
BLOCK_REGIONS = ("norm1", "attn", "norm2", "mlp")
#: Graphs kept per compiled forward. A run needs up to ~8 (training, no_grad, inference_mode, bf16 autocast,
#: each static then batch-dynamic); past torch's default limit (8) the extra variants would run eager.
RECOMPILE_LIMIT = 16
_COMPILED_MARK = "norga_compiled"


def compile_block(block: nn.Module, dynamic: bool | None = None, **options) -> list[str]:
    """Compile `block`'s regions in place; returns the compiled regions' names.

    ``dynamic=None`` (torch's automatic dynamic shapes): the first graph is static; a second batch size
    (an epoch's last, smaller batch; evaluation) compiles one batch-dynamic graph instead of one per size.
    """
    options["dynamic"] = dynamic
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)  # process-wide
    regions = []
    for name in BLOCK_REGIONS:
        region = getattr(block, name, None)
        if region is None or isinstance(region, (nn.Identity, PrefixAttention)):
            continue
        if not is_compiled(region):
            region.compile(**options)
            object.__setattr__(region, _COMPILED_MARK, True)
        regions.append(name)
    return regions


def is_compiled(module: nn.Module) -> bool:
    """True when `compile_block` compiled `module` itself in place."""
    return bool(getattr(module, _COMPILED_MARK, False))


def uncompiled(module: nn.Module) -> nn.Module:
    """An eager twin of a module `compile_block` compiled: the same class, sub-modules and parameters (so the
    same state-dict keys), without the compiled forward. `nn.Module`'s pickling state leaves the compiled call
    out, so a shallow copy is that twin; put it where `module` was."""
    twin = copy.copy(module)
    vars(twin).pop(_COMPILED_MARK, None)
    return twin
