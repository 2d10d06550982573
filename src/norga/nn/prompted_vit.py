"""The prompt host: a timm VisionTransformer that runs with whatever prompts a method hands it per call.

Per-layer prefixes (`Prefix`: keys, values and an optional score gate; any prefix method) and prompt tokens
prepended to the sequence before a block (prompt tuning, as L2P). Methods own their prompts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from norga.nn.gates import IdentityGate, ScoreGate
from norga.nn.prefix_attention import ATTENTION_IMPLS, PrefixAttention
from norga.nn.regional_compile import compile_block


class Prefix(NamedTuple):
    """One layer's prefix: keys and values, each (B or 1, heads, Lp, head_dim), and its score gate (None: none)."""

    key: Tensor
    value: Tensor
    gate: ScoreGate | None = None


_NO_GATE = IdentityGate()


class PromptedOutput(NamedTuple):
    """Features (CLS token after the final norm, before ``fc_norm``; see `PromptedViT.forward_features`) and logits."""

    features: Tensor
    logits: Tensor


class PromptedViT(nn.Module):
    """Hosts prompts on a timm `VisionTransformer`; owns no method state.

    A method hands it prompts per call: ``prefixes={block: Prefix(k, v, gate)}`` (prefix tuning with an
    optional score gate, e.g. `norga.nn.TaskPrompts.prefixes`) and ``prompt_tokens={block: tokens}``
    (prompt tuning). Blocks that take prefixes get `PrefixAttention` (`install_prefix_layers`), which reuses
    the block's own weights, so the plain frozen forward (no prompts) is the same module with no second
    backbone copy. Trainable here: the classifier head (and ``fc_norm`` with `train_fc_norm`).

    Features are read before ``fc_norm`` and `classify` applies it, as the official code does (its
    "pre_logits"): with a trainable fc_norm (MoCo v3) the features of the frozen pass stay frozen, and the
    class statistics and losses on features see the un-normalised class token. Without fc_norm (Identity)
    this is timm's ``forward_head(pre_logits=True)``.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        *,
        num_classes: int | None = None,
        attention_impl: str = "fused",
        train_fc_norm: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"PromptedViT needs a timm VisionTransformer, got {type(backbone).__name__}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if num_classes is not None:
            backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.train_fc_norm = train_fc_norm
        self._attention_impl = attention_impl
        self.freeze_backbone()

    @classmethod
    def from_timm(cls, model_name: str, *, pretrained: bool = False, timm_kwargs: dict | None = None, **kwargs):
        """Build the backbone with ``timm.create_model(model_name, ...)`` and wrap it."""
        backbone = timm.create_model(model_name, pretrained=pretrained, **(timm_kwargs or {}))
        return cls(backbone, **kwargs)

    def install_prefix_layers(self, layers: Sequence[int]) -> None:
        """Give blocks `layers` prefix attention (idempotent).

        Without a prefix passed for the block it computes exactly the block's original attention, so this
        changes nothing until a method passes one.
        """
        for index in layers:
            block = self._block_at(index)
            if not isinstance(block.attn, PrefixAttention):
                block.attn = PrefixAttention(block.attn, impl=self._attention_impl)

    def compile_blocks(self, **options) -> dict[int, list[str]]:
        """Regional ``torch.compile`` of the backbone blocks in place (`norga.nn.regional_compile`).

        Norms, MLPs and timm's own attentions are compiled; prefix attentions stay eager, also those
        installed later. State-dict keys are unchanged. `options` go to `nn.Module.compile`. Returns the
        compiled regions per block.
        """
        return {index: compile_block(block, **options) for index, block in enumerate(self.backbone.blocks)}

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def num_heads(self) -> int:
        return self.backbone.blocks[0].attn.num_heads

    @property
    def head_dim(self) -> int:
        return self.backbone.blocks[0].attn.head_dim

    @property
    def embed_dim(self) -> int:
        return self.backbone.num_features

    @property
    def has_fc_norm(self) -> bool:
        """Whether a norm sits between the features and the head (timm ``fc_norm``, e.g. MoCo v3's)."""
        return not isinstance(self.backbone.fc_norm, nn.Identity)

    @property
    def attention_impl(self) -> str:
        return self._attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        for block in self.backbone.blocks:
            if isinstance(block.attn, PrefixAttention):
                block.attn.impl = value
        self._attention_impl = value

    def freeze_backbone(self) -> None:
        """Only the head (plus fc_norm if `train_fc_norm`) keeps ``requires_grad``."""
        trainable = ("head.", "fc_norm.") if self.train_fc_norm else ("head.",)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name.startswith(trainable))

    def hold_frozen_weights_in(self, dtype: torch.dtype) -> int:
        """Hold the frozen backbone's matmul weights (``Linear`` and ``Conv2d`` weights and biases without
        ``requires_grad``) in `dtype`, for autocast to that dtype; returns how many tensors were converted.

        Autocast casts a layer's fp32 weight on every call and caches only casts of trainable leaves, so a
        frozen fp32 backbone is re-cast at each forward. Converted once, the layers compute exactly what
        autocast computed (the same rounding of the same weights) and copy nothing; their memory halves.
        Norms, position embeddings, the class token and every trainable parameter stay fp32, so the residual
        stream, the prompts and the head are as before. The model then needs autocast: outside it, an fp32
        input meets a bf16 weight and torch refuses the product.
        """
        converted = 0
        for param in self.frozen_matmul_parameters():
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
                converted += 1
        return converted

    def frozen_matmul_parameters(self) -> list[nn.Parameter]:
        """The backbone's ``Linear`` and ``Conv2d`` weights and biases without ``requires_grad``."""
        return [param for module in self.backbone.modules() if isinstance(module, (nn.Linear, nn.Conv2d))
                for param in module.parameters(recurse=False) if not param.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """The host's trainable parameters: the classifier head (and fc_norm when trained)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def forward_features(
        self,
        x: Tensor,
        *,
        prefixes: Mapping[int, Prefix] | None = None,
        prompt_tokens: Mapping[int, Tensor] | None = None,
    ) -> Tensor:
        """Features of images `x` with the prompts given (none: the plain frozen backbone): the pooled token
        before ``fc_norm`` (timm's pre-logits, without fc_norm).

        `prefixes` maps a block index to a `Prefix` for that block (its attention must be a prefix attention:
        `install_prefix_layers`); `prompt_tokens` maps a block index to tokens (B or 1, N, dim) prepended to
        the sequence before that block (prompt tuning). Prompt tokens sit in front of the class token and are
        removed after the final norm, so the pre-logits are read from the class token (or pool) as in the
        unprompted model. Prompts are bound for this call only, also when it raises.
        """
        tokens = dict(prompt_tokens or {})
        with ExitStack() as stack:
            for index, prefix in (prefixes or {}).items():
                attention = self._attention_at(index)
                stack.enter_context(attention.bound(prefix.key, prefix.value, prefix.gate or _NO_GATE))
            for index, prompt in tokens.items():
                stack.enter_context(_prepended(self._block_at(index), prompt))
            features = self.backbone.forward_features(x)
        prepended = sum(prompt.shape[1] for prompt in tokens.values())
        return self.backbone.pool(features[:, prepended:])

    def _block_at(self, index: int) -> nn.Module:
        if not 0 <= index < self.depth:
            raise ValueError(f"block {index} does not exist in this {self.depth}-block backbone")
        return self.backbone.blocks[index]

    def _attention_at(self, index: int) -> PrefixAttention:
        attention = self._block_at(index).attn
        if not isinstance(attention, PrefixAttention):
            raise TypeError(
                f"block {index} has no prefix attention: call model.install_prefix_layers([{index}]) first")
        return attention

    def classify(self, features: Tensor) -> Tensor:
        """Logits over all classes from `forward_features`' features: fc_norm (if any), then the head."""
        return self.backbone.head(self.backbone.head_drop(self.backbone.fc_norm(features)))

    def forward(self, x: Tensor, *args, **kwargs) -> PromptedOutput:
        """Pre-logits and logits; the arguments are those of `forward_features`."""
        features = self.forward_features(x, *args, **kwargs)
        return PromptedOutput(features, self.classify(features))


@contextmanager
def _prepended(block: nn.Module, prompt: Tensor) -> Iterator[None]:
    """While active, `block` receives ``[prompt; x]`` instead of its input tokens x (a forward pre-hook)."""
    if prompt.dim() != 3:
        raise ValueError(f"prompt tokens must be shaped (batch or 1, length, dim), got {tuple(prompt.shape)}")

    def prepend(_module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (torch.cat([prompt.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1), *rest)

    handle = block.register_forward_pre_hook(prepend)
    try:
        yield
    finally:
        handle.remove()
