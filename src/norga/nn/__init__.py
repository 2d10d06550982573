"""Neural-network parts: score gates, prefix attention, prompt pools, the prompt host ViT and HiDe's task prompts."""

from norga.nn.gates import (
    ACTIVATIONS,
    GATE_KINDS,
    GateSchedule,
    IdentityGate,
    NoRGaGate,
    ScoreGate,
    apply_gate_schedule,
    gate_kinds,
    make_gate,
    register_gate,
)
from norga.nn.prefix_attention import ATTENTION_IMPLS, PrefixAttention
from norga.nn.prefix_kernels import fused_prefix_attention, reference_prefix_attention
from norga.nn.prefix_pool import PREFIX_LAYOUTS, PrefixPool
from norga.nn.prompted_vit import Prefix, PromptedOutput, PromptedViT
from norga.nn.task_prompts import TaskPromptedViT, TaskPrompts

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "GATE_KINDS",
    "PREFIX_LAYOUTS",
    "GateSchedule",
    "IdentityGate",
    "NoRGaGate",
    "Prefix",
    "PrefixAttention",
    "PrefixPool",
    "PromptedOutput",
    "PromptedViT",
    "ScoreGate",
    "TaskPromptedViT",
    "TaskPrompts",
    "apply_gate_schedule",
    "fused_prefix_attention",
    "gate_kinds",
    "make_gate",
    "reference_prefix_attention",
    "register_gate",
]
