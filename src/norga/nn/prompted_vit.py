"""A timm VisionTransformer with per-task prefix prompts and score gates in its first blocks.

Besides its own per-task slots (HiDe-Prompt / NoRGa), the model runs with prompts a method supplies:
explicit per-layer prefixes (`Prefix`, any prefix method) and prompt tokens prepended to the sequence
before a block (prompt tuning, as L2P).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from norga.nn.gates import GateSchedule, IdentityGate, ScoreGate, apply_gate_schedule, make_gate
from norga.nn.prefix_attention import ATTENTION_IMPLS, PrefixAttention
from norga.nn.prefix_pool import PREFIX_LAYOUTS, PrefixPool
from norga.nn.regional_compile import compile_block

DEFAULT_PROMPT_LAYERS = (0, 1, 2, 3, 4)


class Prefix(NamedTuple):
    """One layer's prefix: keys and values, each (B or 1, heads, Lp, head_dim), and its score gate (None: none)."""

    key: Tensor
    value: Tensor
    gate: ScoreGate | None = None


_NO_GATE = IdentityGate()


class PromptedOutput(NamedTuple):
    """Pre-logits (CLS token after the final norm, as timm's ``forward_head(pre_logits=True)``) and logits."""

    features: Tensor
    logits: Tensor


class PromptedViT(nn.Module):
    """Wraps a timm `VisionTransformer`: prefix prompts (one slot per task) plus a score gate per prompted layer.

    The prompted blocks' attention is replaced in place by `PrefixAttention` reusing the block's own
    weights, so the plain frozen forward (``slots=None``) is the same module with no second backbone copy.
    Trainable: the prompt pool, the gate scalars and the classifier head (optionally ``fc_norm``).
    ``gate=None`` gives HiDe-Prompt (plain prefix tuning); an activation name gives NoRGa. ``num_slots=0``
    builds no slots (no pool, gates or prefix layers of its own) for methods that bring their own prompts.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        *,
        num_slots: int,
        prompt_length: int,
        prompt_layers: Sequence[int] = DEFAULT_PROMPT_LAYERS,
        gate: str | None = "tanh",
        num_classes: int | None = None,
        attention_impl: str = "fused",
        prefix_layout: str = "correct",
        train_fc_norm: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"PromptedViT needs a timm VisionTransformer, got {type(backbone).__name__}")
        depth = len(backbone.blocks)
        layers = tuple(sorted(set(prompt_layers))) if num_slots else ()
        if num_slots and (not layers or layers[0] < 0 or layers[-1] >= depth):
            raise ValueError(f"prompt_layers must be block indices in [0, {depth}), got {list(prompt_layers)}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if prefix_layout not in PREFIX_LAYOUTS:
            raise ValueError(f"unknown prefix layout {prefix_layout!r}; choose one of {PREFIX_LAYOUTS}")
        if num_classes is not None:
            backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.prompt_layers = layers
        self.prefix_layout = prefix_layout
        self.train_fc_norm = train_fc_norm
        self._attention_impl = attention_impl
        self._compile_options: dict | None = None  # set by `compile_blocks`
        self.install_prefix_layers(layers)
        self.pool: PrefixPool | None = None  # num_slots=0: no per-task slots (methods that bring their own prompts)
        if num_slots:
            first = self._prefix_attentions()[0]
            self.pool = PrefixPool(len(layers), num_slots, prompt_length, first.num_heads, first.head_dim)
        self.gates = nn.ModuleList(make_gate(gate) for _ in layers)
        self.freeze_backbone()

    @classmethod
    def from_timm(cls, model_name: str, *, pretrained: bool = False, timm_kwargs: dict | None = None, **kwargs):
        """Build the backbone with ``timm.create_model(model_name, ...)`` and wrap it."""
        backbone = timm.create_model(model_name, pretrained=pretrained, **(timm_kwargs or {}))
        return cls(backbone, **kwargs)

    def _prefix_attentions(self) -> list[PrefixAttention]:
        return [self.backbone.blocks[index].attn for index in self.prompt_layers]

    def install_prefix_layers(self, layers: Sequence[int]) -> None:
        """Give blocks `layers` prefix attention too (a method's prompts may live in other blocks than the slots').

        Without a bound prefix it computes exactly the block's original attention, so this changes nothing
        until a prefix is passed for the layer.
        """
        depth = len(self.backbone.blocks)
        for index in layers:
            if not 0 <= index < depth:
                raise ValueError(f"prompt layer {index} is not a block index of this {depth}-block backbone")
            block = self.backbone.blocks[index]
            if not isinstance(block.attn, PrefixAttention):
                block.attn = PrefixAttention(block.attn, impl=self._attention_impl)
                if self._compile_options is not None:  # compiled whole before: now only around the prefix attention
                    compile_block(block, **self._compile_options)

    def compile_blocks(self, **options) -> dict[int, list[str]]:
        """Regional ``torch.compile`` of the backbone blocks in place (`norga.nn.regional_compile`).

        Plain blocks are compiled whole, prefix-attention blocks only in their norms and MLP; state-dict
        keys are unchanged. `options` go to `nn.Module.compile`. Returns the compiled regions per block.
        """
        self._compile_options = dict(options)
        return {index: compile_block(block, **options) for index, block in enumerate(self.backbone.blocks)}

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

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
        """Only prompts, gates and the head (plus fc_norm if `train_fc_norm`) keep ``requires_grad``."""
        trainable = ("head.", "fc_norm.") if self.train_fc_norm else ("head.",)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name.startswith(trainable))

    def set_gate_schedule(self, schedule: GateSchedule | str, task: int) -> None:
        """Make the gate scalars trainable or not for training `task` (official: task 0 only)."""
        apply_gate_schedule(self.gates, schedule, task)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: ``prompts`` (the trainable slots), ``gates`` (α, τ) and ``head``."""
        def trainable(params):
            return [p for p in params if p.requires_grad]

        return {
            "prompts": trainable(self.pool.slots) if self.pool is not None else [],
            "gates": trainable(self.gates.parameters()),
            "head": trainable(self.backbone.parameters()),
        }

    def forward_features(
        self,
        x: Tensor,
        slots: Tensor | int | None = None,
        momentum: float = 0.0,
        *,
        prefixes: Mapping[int, Prefix] | None = None,
        prompt_tokens: Mapping[int, Tensor] | None = None,
    ) -> Tensor:
        """Pre-logits of images `x` with prefix slot ``slots[b]`` for sample b (an int: one slot for all).

        ``slots=None`` (and no other prompts) is the plain, unprompted forward of the frozen backbone.
        `momentum` blends the (single, int) training slot with the mean of earlier slots (HiDe-Prompt's
        prompt ensemble). `prefixes` maps a block index to a `Prefix` for that block (its attention must be
        a prefix attention: `install_prefix_layers`); `prompt_tokens` maps a block index to tokens
        (B or 1, N, dim) prepended to the sequence before that block (prompt tuning). Prompt tokens sit
        in front of the class token and are removed after the final norm, so the pre-logits are read
        from the class token (or pool) as in the unprompted model.
        """
        bound: dict[int, Prefix] = {}
        if slots is not None:
            if self.pool is None:
                raise ValueError("this model has no per-task prompt slots (num_slots=0): pass prefixes= or prompt_tokens=")
            gathered = self.pool.gather(slots, self.prefix_layout, momentum=momentum, batch_size=x.shape[0])
            bound = {index: Prefix(k, v, gate) for index, gate, (k, v) in zip(self.prompt_layers, self.gates, gathered)}
        for index, prefix in (prefixes or {}).items():
            if index in bound:
                raise ValueError(f"block {index} got a prefix from both the slots and `prefixes`; concatenate them")
            bound[index] = prefix
        tokens = dict(prompt_tokens or {})
        with ExitStack() as stack:
            for index, prefix in bound.items():
                attention = self._attention_at(index)
                stack.enter_context(attention.bound(prefix.key, prefix.value, prefix.gate or _NO_GATE))
            for index, prompt in tokens.items():
                stack.enter_context(_prepended(self._block_at(index), prompt))
            features = self.backbone.forward_features(x)
        prepended = sum(prompt.shape[1] for prompt in tokens.values())
        return self.backbone.forward_head(features[:, prepended:], pre_logits=True)

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
        """Logits of the classifier head over all classes from pre-logits."""
        return self.backbone.head(self.backbone.head_drop(features))

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
