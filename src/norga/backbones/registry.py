"""The paper's five pre-trainings by name (NORGA_SPEC §3.4), and resolution of any timm model name.

Each entry says which timm architecture to build, which file the paper used and where to get it, the
layout that file is in, the normalisation the pre-training used, and which keys are knowingly left
out (MoCo v3's final norm, replaced by a fresh ``fc_norm`` as in the official code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import split_model_name_tag

from norga.backbones.errors import BackboneLoadError

#: (regex on timm key, reason): keys of the checkpoint that are knowingly not loaded.
Rule = tuple[str, str]


@dataclass(frozen=True)
class Pretraining:
    """A named pre-training: architecture, file, layout, normalisation and explicit key exceptions."""

    name: str
    arch: str  # timm name, optionally with a ``.tag`` whose weights are this pre-training on the hub
    description: str
    file_name: str  # the file the official code reads
    layout: str  # layout of that file (see norga.backbones.checkpoints)
    source_url: str  # where to download the file on a machine with internet
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hub: bool  # whether timm's hub has these exact weights under ``arch``
    timm_kwargs: dict = field(default_factory=dict)
    ignore: tuple[Rule, ...] = ()  # checkpoint keys discarded on purpose
    fresh: tuple[Rule, ...] = ()  # model keys left at their initialisation on purpose


_SSL = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, hub=False)

PRETRAININGS: dict[str, Pretraining] = {
    p.name: p
    for p in (
        Pretraining(
            "sup21k",
            # timm's orig_in21k = jx_vit_base_patch16_224_in21k: Google's original JAX ViT-B_16.npz,
            # pre-logits layer dropped, no head (num_classes=0). NOT the AugReg augreg_in21k weights.
            "vit_base_patch16_224.orig_in21k",
            "Sup-21K: supervised ImageNet-21k ViT-B/16 (original Google JAX weights)",
            "imagenet21k/ViT-B_16.npz",
            "npz",
            "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
            IMAGENET_INCEPTION_MEAN,
            IMAGENET_INCEPTION_STD,
            hub=True,
        ),
        Pretraining(
            "ibot21k",
            "vit_base_patch16_224",
            "iBOT-21K: iBOT self-supervised ViT-B/16 on ImageNet-22k (teacher)",
            "vitb_16_pt22k/checkpoint.pth",
            "teacher",
            "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16_pt22k/checkpoint.pth"
            " (iBOT README, github.com/bytedance/ibot)",
            **_SSL,
        ),
        Pretraining(
            "ibot1k",
            "vit_base_patch16_224",
            "iBOT-1K: iBOT self-supervised ViT-B/16 on ImageNet-1k (teacher)",
            "vitb_16/checkpoint_teacher.pth",
            "state_dict",
            "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth"
            " (iBOT README, github.com/bytedance/ibot)",
            **_SSL,
        ),
        Pretraining(
            "dino1k",
            "vit_base_patch16_224.dino",
            "DINO-1K: DINO self-supervised ViT-B/16 on ImageNet-1k",
            "dino_vitbase16_pretrain.pth",
            "raw",
            "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            IMAGENET_DEFAULT_MEAN,
            IMAGENET_DEFAULT_STD,
            hub=True,
        ),
        Pretraining(
            "mocov3",
            "vit_base_patch16_224",
            "MoCo-1K: MoCo v3 ViT-B/16, 300 epochs on ImageNet-1k; official fc_norm variant: the final norm "
            "of the checkpoint is discarded and a fresh fc_norm sits before the head (NORGA_SPEC §3.4)",
            "vit-b-300ep.pth.tar (raw MoCo v3) or mocov3-vit-base-300ep.pth (HiDe-Prompt, key 'model')",
            "moco_raw",
            "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
            **_SSL,
            timm_kwargs={"fc_norm": True},
            ignore=((r"norm\.(weight|bias)", "final LayerNorm discarded: official MoCo v3 variant uses a fresh fc_norm"),),
            fresh=((r"fc_norm\.(weight|bias)", "fresh fc_norm of the official MoCo v3 variant (trainable)"),),
        ),
        Pretraining(
            "norga-vit-tiny-c10",
            "vit_tiny_patch16_224",
            "norga's own small backbone: ViT-Ti width 192, depth 6, 4 px patches at 32 px, supervised on CIFAR-10",
            "norga/assets/norga-vit-tiny-c10.safetensors (shipped; weights='package')",
            "safetensors",
            "shipped with norga; reproduce with tools/pretrain_tiny_c10.py (recipe in the .json card beside it)",
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            hub=False,
            timm_kwargs={"img_size": 32, "patch_size": 4, "depth": 6},
        ),
        Pretraining(
            "mocov3_norm",
            "vit_base_patch16_224",
            "MoCo v3 ViT-B/16 with its own final LayerNorm loaded (not the official fc_norm variant)",
            "vit-b-300ep.pth.tar",
            "moco_raw",
            "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
            **_SSL,
        ),
    )
}


def resolve_pretraining(name: str) -> Pretraining:
    """The registry entry for ``name``, or an ad-hoc entry for any timm model name (``arch`` or ``arch.tag``)."""
    if name in PRETRAININGS:
        return PRETRAININGS[name]
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise BackboneLoadError(
            f"unknown backbone '{name}': not one of the paper's pre-trainings ({', '.join(PRETRAININGS)}) "
            "and not a timm model name (see timm.list_models('vit_*'))"
        )
    return Pretraining(
        name=name,
        arch=name,
        description=f"timm model {name}",
        file_name="",
        layout="any",
        source_url="",
        mean=(),  # filled from the model's pretrained_cfg
        std=(),
        hub=bool(tag) or bool(timm.list_pretrained(arch + ".*")),
    )
