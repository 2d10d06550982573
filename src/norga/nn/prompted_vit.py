"""The host: a timm VisionTransformer that runs with whatever a method attaches to its blocks per call.

Prefixes with a score gate, prompt tokens, LoRA deltas, SSF, adapters, prompts projected by a block's own
weights: any `norga.nn.attachments.Attachment`, bound for one forward pass. Methods own what they attach.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import NamedTuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from norga.nn.attachments import BACKBONE, Attachment, Prefix, PromptTokens
from norga.nn.pooled_block import computes_row_only, pooled_row
from norga.nn.prefix_attention import ATTENTION_IMPLS, PrefixAttention
from norga.nn.regional_compile import compile_block


class PromptedOutput(NamedTuple):
    """Features (CLS token after the final norm, before ``fc_norm``; see `PromptedViT.forward_features`) and logits."""

    features: Tensor
    logits: Tensor


class PromptedViT(nn.Module):
    """Hosts what methods attach on a timm `VisionTransformer`; owns no method state.

    A method hands it attachments per call (`forward_features`): ``attachments={block: attachment}`` of any
    kind (`norga.nn.attachments`), with the shorthands ``prefixes={block: Prefix(k, v, gate)}`` (prefix tuning
    with an optional score gate, e.g. `norga.nn.TaskPrompts.prefixes`) and ``prompt_tokens={block: tokens}``
    (prompt tuning). Blocks that take prefixes get `PrefixAttention` (`install_prefix_layers`), which reuses
    the block's own weights, so the plain frozen forward (nothing attached) is the same module with no second
    backbone copy; other kinds hook timm's own modules, so the state-dict keys stay timm's. Trainable here:
    the classifier head (and ``fc_norm`` with `train_fc_norm`), and what a method `unfreeze`s.

    Features are read before ``fc_norm`` and `classify` applies it, as the official code does (its
    "pre_logits"): with a trainable fc_norm (MoCo v3) the features of the frozen pass stay frozen, and the
    class statistics and losses on features see the un-normalised class token. Without fc_norm (Identity)
    this is timm's ``forward_head(pre_logits=True)``.

    With token pooling and nothing attached to the last block (nor to the backbone itself), the last block computes
    only the pooled row (`norga.nn.pooled_block`): its keys and values need every token, nothing else does, and the
    features equal timm's full forward to rounding at ~5/6 less of that block's matmul work.
    """

    #: Whether the last block may compute only the pooled row when that is exact (`norga.nn.pooled_block`); tests and
    #: benchmarks set it False for timm's full forward.
    _last_block_row_only: bool = True

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
    def patch_inputs(self) -> int:
        """Values one patch token is made of: channels x patch height x width (768 for ViT-B/16)."""
        return self.backbone.patch_embed.proj.weight[0].numel()

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

    def unfreeze(self, names: Iterable[str]) -> list[nn.Parameter]:
        """Make the backbone parameters `names` (timm's names, e.g. ``"blocks.0.norm1.weight"``) trainable, for
        a method that trains them; returns them. They are then checkpointed with the method (`trained_parameters`).

        A parameter the frozen backbone holds in bf16 (`hold_frozen_weights_in`) is refused: its pre-trained
        value is gone, and training it would start from its rounding.
        """
        params = dict(self.backbone.named_parameters())
        names = list(names)
        for name in names:  # all checked before any changes
            if name not in params:
                raise ValueError(f"the backbone has no parameter {name!r} to train")
            if params[name].dtype != torch.float32:
                raise ValueError(f"backbone parameter {name} is held in {params[name].dtype} for autocast "
                                 "(amp=bf16) and cannot train from its pre-trained value: run with amp=none")
        return [params[name].requires_grad_(True) for name in names]

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The host's parameters a method trains, by state-dict key: exactly those with ``requires_grad`` (the
        host freezes the rest of the backbone; a method unfreezes what it trains). The frozen pre-trained
        weights are not among them: they are the backbone's file, never a method's checkpoint."""
        return {name: param for name, param in self.named_parameters() if param.requires_grad}

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
        attachments: Mapping[int | str, Attachment | Sequence[Attachment]] | None = None,
        *,
        prefixes: Mapping[int, Prefix] | None = None,
        prompt_tokens: Mapping[int, Tensor] | None = None,
    ) -> Tensor:
        """Features of images `x` with what a method attaches (nothing: the plain frozen backbone): the pooled
        token before ``fc_norm`` (timm's pre-logits, without fc_norm).

        `attachments` maps a block index to an `Attachment` (or several, bound in order) for that block: prefixes
        with a score gate, prompt tokens, LoRA deltas, SSF, adapters, projected prompts (`norga.nn.attachments`)
        or any other kind with a ``bind``; the key `BACKBONE` (``"backbone"``) binds hooked kinds to the timm model
        itself, at its sub-modules outside the blocks (e.g. SSF on ``patch_embed`` and ``norm``). Two shorthands
        for the common kinds: ``prefixes={i: Prefix(k, v, gate)}`` (block i's attention must be a prefix attention:
        `install_prefix_layers`) and ``prompt_tokens={i: tokens}``, tokens (B or 1, N, dim) prepended before
        block i. Tokens put in front of the sequence are removed after the final norm, so the pre-logits are read
        from the class token (or pool) as in the unprompted model. Everything is bound for this call only, also
        when it raises.
        """
        bound = self._attachments_by_block(attachments, prefixes, prompt_tokens)
        prepended = sum(attachment.added_tokens for block_attachments in bound.values()
                        for attachment in block_attachments)
        with ExitStack() as stack:
            for index, block_attachments in bound.items():
                block = self.backbone if index == BACKBONE else self._block_at(index)
                for attachment in block_attachments:
                    stack.enter_context(attachment.bind(block, index))
            if self._last_block_computes_row_only(bound):
                return self._pooled_features(x, prepended)
            features = self.backbone.forward_features(x)
        return self.backbone.pool(features[:, prepended:])

    def _last_block_computes_row_only(self, bound: Mapping[int | str, list[Attachment]]) -> bool:
        """Whether this call may compute the last block for the pooled row only: nothing attached to that block or
        the backbone itself (checked while bound, so any hook or prefix is seen) and `computes_row_only`."""
        attached_there = bound.keys() & {self.depth - 1, BACKBONE}
        return self._last_block_row_only and not attached_there and computes_row_only(self.backbone)

    def _pooled_features(self, x: Tensor, row: int) -> Tensor:
        """timm's ``forward_features`` then token pooling of row `row`, with the last block and the final norm
        computed for that row only (`norga.nn.pooled_block.pooled_row`)."""
        backbone = self.backbone
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))
        *earlier, last = backbone.blocks
        for block in earlier:
            x = block(x)
        return backbone.norm(pooled_row(last, x, row))[:, 0]

    @staticmethod
    def _attachments_by_block(
        attachments: Mapping[int | str, Attachment | Sequence[Attachment]] | None,
        prefixes: Mapping[int, Prefix] | None,
        prompt_tokens: Mapping[int, Tensor] | None,
    ) -> dict[int | str, list[Attachment]]:
        """Every block's attachments in binding order: those given, then the shorthands' prefix and tokens."""
        bound: dict[int | str, list[Attachment]] = {}
        for index, given in (attachments or {}).items():
            bound.setdefault(index, []).extend([given] if isinstance(given, Attachment) else given)
        for index, prefix in (prefixes or {}).items():
            bound.setdefault(index, []).append(prefix)
        for index, tokens in (prompt_tokens or {}).items():
            bound.setdefault(index, []).append(PromptTokens(tokens))
        for index, block_attachments in bound.items():
            held = Counter(getattr(attachment, "holds", None) for attachment in block_attachments)
            for part, count in held.items():
                if part is not None and count > 1:
                    raise ValueError(f"block {index} got {count} attachments that each bind the {part}: join them "
                                     f"into one (e.g. prefixes concatenated along their length)")
        return bound

    def _block_at(self, index: int) -> nn.Module:
        if not isinstance(index, int) or not 0 <= index < self.depth:
            raise ValueError(f"block {index!r} does not exist in this {self.depth}-block backbone (attachments outside "
                             f"the blocks go under {BACKBONE!r})")
        return self.backbone.blocks[index]

    def classify(self, features: Tensor) -> Tensor:
        """Logits over all classes from `forward_features`' features: fc_norm (if any), then the head."""
        return self.backbone.head(self.backbone.head_drop(self.backbone.fc_norm(features)))

    def forward(self, x: Tensor, *args, **kwargs) -> PromptedOutput:
        """Pre-logits and logits; the arguments are those of `forward_features`."""
        features = self.forward_features(x, *args, **kwargs)
        return PromptedOutput(features, self.classify(features))

