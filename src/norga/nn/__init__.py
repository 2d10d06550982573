"""Neural-network parts: score gates, prefix attention, prompt pools (and their reparameterized prefixes), the host
ViT and what methods attach to it, and HiDe's task prompts."""

from norga.nn.attachments import (
    BACKBONE,
    Adapter,
    Attachment,
    OutputHook,
    Prefix,
    ProjectedPrefix,
    PromptTokens,
    RoutedPrefix,
    RowDelta,
    ScaleShift,
    qkv_rows,
)
from norga.nn.gates import (
    ACTIVATIONS,
    GATE_KINDS,
    GateSchedule,
    IdentityGate,
    NoRGaGate,
    ScoreGate,
    TokenMeanGate,
    apply_gate_schedule,
    gate_kinds,
    make_gate,
    register_gate,
)
from norga.nn.prefix_attention import ATTENTION_IMPLS, PrefixAttention
from norga.nn.prefix_kernels import fused_prefix_attention, reference_prefix_attention
from norga.nn.prefix_pool import PREFIX_LAYOUTS, PrefixPool
from norga.nn.prefix_reparam import PREFIX_PARAMS, PrefixMLP
from norga.nn.prompted_vit import PromptedOutput, PromptedViT
from norga.nn.task_prompts import TaskPromptedViT, TaskPrompts

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "BACKBONE",
    "GATE_KINDS",
    "PREFIX_LAYOUTS",
    "PREFIX_PARAMS",
    "Adapter",
    "Attachment",
    "GateSchedule",
    "IdentityGate",
    "NoRGaGate",
    "OutputHook",
    "Prefix",
    "PrefixAttention",
    "PrefixMLP",
    "PrefixPool",
    "ProjectedPrefix",
    "PromptTokens",
    "PromptedOutput",
    "PromptedViT",
    "RoutedPrefix",
    "RowDelta",
    "ScaleShift",
    "ScoreGate",
    "TaskPromptedViT",
    "TaskPrompts",
    "TokenMeanGate",
    "apply_gate_schedule",
    "fused_prefix_attention",
    "gate_kinds",
    "make_gate",
    "qkv_rows",
    "reference_prefix_attention",
    "register_gate",
]
