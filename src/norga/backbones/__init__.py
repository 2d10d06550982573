"""Backbones: the paper's pre-trainings by name or any timm ViT, with strictly checked weights.

>>> model, record = create_backbone("sup21k", weights="ViT-B_16.npz")  # doctest: +SKIP
"""

from norga.backbones.checkpoints import Checkpoint, jax_vit_to_timm, read_checkpoint
from norga.backbones.create import BackboneRecord, create_backbone
from norga.backbones.errors import BackboneLoadError
from norga.backbones.matching import MatchResult, load_strict
from norga.backbones.registry import PRETRAININGS, Pretraining, resolve_pretraining

__all__ = [
    "PRETRAININGS",
    "BackboneLoadError",
    "BackboneRecord",
    "Checkpoint",
    "MatchResult",
    "Pretraining",
    "create_backbone",
    "jax_vit_to_timm",
    "load_strict",
    "read_checkpoint",
    "resolve_pretraining",
]
