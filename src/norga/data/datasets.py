"""Image datasets over uint8 tensors held in memory, or over image files decoded on access."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded."""


def read_image(path: str | Path) -> Tensor:
    """An RGB uint8 (3, H, W) tensor; greyscale and palette images become RGB."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:  # PIL: UnidentifiedImageError (an OSError), truncated data
        raise UnreadableImageError(f"cannot decode image {path}: {error}; remove or replace the file") from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def to_rgb(images: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, 1, H, W) greyscale -> (N, 3, H, W); RGB passes through."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


class ImageDataset(Dataset):
    """(image, label) pairs from an in-memory uint8 tensor (N, 3, H, W) or a list of image files.

    `targets` lists the labels in order; `subset` and `with_transform` give views sharing the storage.
    """

    def __init__(self, images: Tensor | Sequence[Path], labels: Sequence[int], transform: Callable | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = [int(label) for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if not isinstance(image, Tensor):
            image = read_image(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        return ImageDataset(self.images, self.targets, transform)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        index = list(indices)
        images = self.images[torch.as_tensor(index, dtype=torch.long)] if isinstance(self.images, Tensor) else [
            self.images[i] for i in index]
        return ImageDataset(images, [self.targets[i] for i in index], self.transform)
