"""The official train/test transforms at any backbone input size, on uint8 image tensors (torchvision v2)."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from norga.data.errors import BenchmarkOptionError

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
NORMALIZATIONS = ("backbone", "official", "none")
UNNORMALISED = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def build_transforms(
    size: int, mean: tuple[float, ...], std: tuple[float, ...], normalization: str = "backbone", cifar_style: bool = False,
) -> tuple[T.Compose, T.Compose]:
    """(train, test) transforms of NORGA_SPEC §3.3 scaled to `size` (test: resize to size/0.875, centre crop).

    ``cifar_style``: RandomResizedCrop scale (0.08, 1) bicubic + ColorJitter(brightness 63/255); otherwise
    scale (0.05, 1) bilinear. ``normalization="official"``: CIFAR-100 statistics for CIFAR-style data and no
    normalisation otherwise (pitfall P7); ``"backbone"``: the backbone's own `mean` / `std`; ``"none"``: the [0, 1]
    pixels as they are, on every dataset (the official code of CODA-Prompt, SMoPE,
    InfLoRA, SD-LoRA and RanPAC).
    """
    if normalization not in NORMALIZATIONS:
        raise BenchmarkOptionError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    if normalization == "official":
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if cifar_style else UNNORMALISED
    elif normalization == "none":
        mean, std = UNNORMALISED
    to_float = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if cifar_style:
        crop = T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True)
        augment = [crop, T.RandomHorizontalFlip(), T.ColorJitter(brightness=63 / 255)]
    else:
        crop = T.RandomResizedCrop(size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3),
                                   interpolation=InterpolationMode.BILINEAR, antialias=True)
        augment = [crop, T.RandomHorizontalFlip()]
    resize = round(size / 0.875)
    test = [T.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size)]
    return T.Compose([*augment, *to_float]), T.Compose([*test, *to_float])


def backbone_input(model) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(input size, mean, std) of a timm model: mean/std from its pretrained config (timm's resolution), the size
    from the model itself when it has a patch embedding (timm keeps the default-config size, e.g. 224, in the
    pretrained config of a ViT created with ``img_size=32``)."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or config["input_size"][1:]
    return int(size[-1]), tuple(config["mean"]), tuple(config["std"])
