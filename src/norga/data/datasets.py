"""Image datasets over uint8 images held in memory (one tensor, or a list when sizes differ), over image files
decoded on access, or over another dataset (torchvision's); all yield (transformed image, global label) and
expose `targets`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from norga.data.decode import read_image


def to_rgb(images: Tensor) -> Tensor:
    """uint8 (N, H, W) / (N, 1, H, W) greyscale -> (N, 3, H, W) as a stride-0 view (no copy); RGB passes."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class ImageDataset(Dataset):
    """(image, label) pairs from an in-memory uint8 tensor (N, C, H, W), a list of image files or of decoded
    (C, H, W) tensors, or another dataset yielding (PIL image or tensor, label) (`images` with `indices`).

    `targets` lists the global labels in order (stable: the engine caches features by position);
    `subset` and `with_transform` give views sharing the storage; `skipped` lists unreadable files left out.
    """

    def __init__(self, images: Tensor | Sequence[Path | Tensor] | Dataset, labels: Sequence[int],
                 transform: Callable | None = None,
                 indices: Sequence[int] | None = None, skipped: Sequence[str] = ()) -> None:
        self._indices = list(indices) if indices is not None else None
        count = len(self._indices) if self._indices is not None else len(images)
        if count != len(labels):
            raise ValueError(f"{count} images but {len(labels)} labels")
        self._images = images
        self.targets = [int(label) for label in labels]
        self.transform = transform
        self.skipped = list(skipped)

    @property
    def images(self) -> Tensor | Sequence[Path | Tensor] | Dataset:
        """The pixels (in-memory: (N, 3, H, W) uint8, greyscale as a no-copy view), the decoded images of different
        sizes, or the file list."""
        return to_rgb(self._images) if isinstance(self._images, Tensor) else self._images

    @property
    def in_memory(self) -> bool:
        """Whether the images are decoded already (no file is read on access)."""
        if isinstance(self._images, Tensor):
            return True
        return self._indices is None and len(self._images) > 0 and isinstance(self._images[0], Tensor)

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Tensor:
        """The untransformed RGB uint8 (3, H, W) image at `index`."""
        if isinstance(self._images, Tensor):
            image = self._images[index]
            return image.expand(3, -1, -1) if image.shape[0] == 1 else image
        if self._indices is not None:  # a wrapped dataset
            image = self._images[self._indices[index]][0]
            if isinstance(image, Image.Image):
                return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
            image = torch.as_tensor(image)
            return image.expand(3, -1, -1) if image.shape[0] == 1 else image
        item = self._images[index]
        return item if isinstance(item, Tensor) else read_image(item)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        """The same images and order under another transform (e.g. training images, test transform)."""
        return ImageDataset(self._images, self.targets, transform, self._indices, self.skipped)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The images at `indices`, in that order."""
        index = list(indices)
        labels = [self.targets[i] for i in index]
        if isinstance(self._images, Tensor):
            return ImageDataset(self._images[torch.as_tensor(index, dtype=torch.long)], labels, self.transform,
                                skipped=self.skipped)
        if self._indices is not None:
            return ImageDataset(self._images, labels, self.transform, [self._indices[i] for i in index], self.skipped)
        return ImageDataset([self._images[i] for i in index], labels, self.transform, skipped=self.skipped)

    def relabel(self, offset: int) -> ImageDataset:
        """The same images with every label shifted by `offset` (5-datasets: labels are global)."""
        return ImageDataset(self._images, [y + offset for y in self.targets], self.transform, self._indices, self.skipped)


class SourceData(tuple):
    """(train, test, class names) as a reader returns them, plus `details` for the run record."""

    def __new__(cls, train: ImageDataset, test: ImageDataset, class_names: Sequence[str], details: dict | None = None):
        data = super().__new__(cls, (train, test, list(class_names)))
        data.details = dict(details or {})
        return data

    train = property(lambda self: self[0])
    test = property(lambda self: self[1])
    class_names = property(lambda self: self[2])
