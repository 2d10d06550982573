"""Neural-network parts: score gates, prefix attention, prefix pools and the prompted ViT."""

from norga.nn.gates import ACTIVATIONS, GateSchedule, IdentityGate, NoRGaGate, ScoreGate, apply_gate_schedule, make_gate
from norga.nn.prefix_attention import ATTENTION_IMPLS, PrefixAttention
from norga.nn.prefix_kernels import fused_prefix_attention, reference_prefix_attention
from norga.nn.prefix_pool import PREFIX_LAYOUTS, PrefixPool
from norga.nn.prompted_vit import DEFAULT_PROMPT_LAYERS, Prefix, PromptedOutput, PromptedViT

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "DEFAULT_PROMPT_LAYERS",
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
    "apply_gate_schedule",
    "fused_prefix_attention",
    "make_gate",
    "reference_prefix_attention",
]
