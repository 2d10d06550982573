"""A timm VisionTransformer with per-task prefix prompts and score gates in its first blocks."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import NamedTuple

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from norga.nn.gates import GateSchedule, apply_gate_schedule, make_gate
from norga.nn.prefix_attention import PrefixAttention
from norga.nn.prefix_pool import PREFIX_LAYOUTS, PrefixPool

DEFAULT_PROMPT_LAYERS = (0, 1, 2, 3, 4)


class PromptedOutput(NamedTuple):
    """Pre-logits (CLS token after the final norm, as timm's ``forward_head(pre_logits=True)``) and logits."""

    features: Tensor
    logits: Tensor


class PromptedViT(nn.Module):
    """Wraps a timm `VisionTransformer`: prefix prompts (one slot per task) plus a score gate per prompted layer.

    The prompted blocks' attention is replaced in place by `PrefixAttention` reusing the block's own
    weights, so the plain frozen forward (``slots=None``) is the same module with no second backbone copy.
    Trainable: the prompt pool, the gate scalars and the classifier head (optionally ``fc_norm``).
    ``gate=None`` gives HiDe-Prompt (plain prefix tuning); an activation name gives NoRGa.
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
        layers = tuple(sorted(set(prompt_layers)))
        if not layers or layers[0] < 0 or layers[-1] >= depth:
            raise ValueError(f"prompt_layers must be block indices in [0, {depth}), got {list(prompt_layers)}")
        if prefix_layout not in PREFIX_LAYOUTS:
            raise ValueError(f"unknown prefix layout {prefix_layout!r}; choose one of {PREFIX_LAYOUTS}")
        if num_classes is not None:
            backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.prompt_layers = layers
        self.prefix_layout = prefix_layout
        self.train_fc_norm = train_fc_norm
        for index in layers:
            backbone.blocks[index].attn = PrefixAttention(backbone.blocks[index].attn, impl=attention_impl)
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

    @property
    def attention_impl(self) -> str:
        return self._prefix_attentions()[0].impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        for attention in self._prefix_attentions():
            attention.impl = value

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
            "prompts": trainable(self.pool.slots),
            "gates": trainable(self.gates.parameters()),
            "head": trainable(self.backbone.parameters()),
        }

    def forward_features(self, x: Tensor, slots: Tensor | int | None = None, momentum: float = 0.0) -> Tensor:
        """Pre-logits of images `x` with prefix slot ``slots[b]`` for sample b (an int: one slot for all).

        ``slots=None`` is the plain, unprompted forward of the frozen backbone. `momentum` blends the
        (single, int) training slot with the mean of earlier slots (HiDe-Prompt's prompt ensemble).
        """
        if slots is None:
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        prefixes = self.pool.gather(slots, self.prefix_layout, momentum=momentum, batch_size=x.shape[0])
        with ExitStack() as stack:
            for attention, gate, (prefix_k, prefix_v) in zip(self._prefix_attentions(), self.gates, prefixes):
                stack.enter_context(attention.bound(prefix_k, prefix_v, gate))
            tokens = self.backbone.forward_features(x)
        return self.backbone.forward_head(tokens, pre_logits=True)

    def classify(self, features: Tensor) -> Tensor:
        """Logits of the classifier head over all classes from pre-logits."""
        return self.backbone.head(self.backbone.head_drop(features))

    def forward(self, x: Tensor, slots: Tensor | int | None = None, momentum: float = 0.0) -> PromptedOutput:
        features = self.forward_features(x, slots, momentum)
        return PromptedOutput(features, self.classify(features))
