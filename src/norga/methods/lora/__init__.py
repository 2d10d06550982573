"""The LoRA family on frozen ViTs: InfLoRA (``inflora``) and SD-LoRA (``sdlora``), per-task low-rank deltas on
slices of timm's fused ``attn.qkv`` attached through the host (`norga.nn.attachments.RowDelta`), one head per task,
one forward pass at test time. LORA_SPEC is their specification."""

from norga.methods.lora.inflora import InfLoRA, InfLoRASettings
from norga.methods.lora.sdlora import SDLoRA, SDLoRASettings

__all__ = ["InfLoRA", "InfLoRASettings", "SDLoRA", "SDLoRASettings"]
