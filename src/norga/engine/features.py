"""Frozen-backbone features computed once per image and reused across epochs, tasks and evaluations."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from norga.engine.checkpoint import load_checkpoint, save_checkpoint


@dataclass
class FeatureSet:
    """Features (n, dim) and labels (n,) of one dataset, in the dataset's order."""

    features: Tensor
    labels: Tensor


class FrozenFeatureCache:
    """Memoises ``encode(images)`` over whole datasets by a caller-chosen key, e.g. ("test", task).

    `images_encoded` counts the images that went through the frozen backbone, so tests can check that
    each image is encoded once per run, not once per epoch or evaluation.
    """

    def __init__(
        self, encode: Callable[[Tensor], Tensor], device: torch.device, enabled: bool = True, directory: Path | None = None
    ) -> None:
        self.encode = encode
        self.device = device
        self.enabled = enabled
        self.directory = directory  # also keep features on disk (survive a resume)
        self.images_encoded = 0
        self._store: dict[Hashable, FeatureSet] = {}

    @torch.no_grad()
    def features(self, key: Hashable, loader: DataLoader) -> FeatureSet:
        """The features of every image of `loader` (which must not shuffle), computed at most once."""
        if self.enabled and key in self._store:
            return self._store[key]
        file = self._file(key)
        if file is not None and file.is_file():
            saved = load_checkpoint(file)
            self._store[key] = FeatureSet(saved["features"], saved["labels"])
            return self._store[key]
        chunks, labels = [], []
        for images, targets in loader:
            chunks.append(self.encode(images.to(self.device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(targets))
            self.images_encoded += len(images)
        result = FeatureSet(torch.cat(chunks), torch.cat(labels).long())
        if self.enabled:
            self._store[key] = result
            if file is not None:
                save_checkpoint({"features": result.features, "labels": result.labels}, file)
        return result

    def _file(self, key: Hashable) -> Path | None:
        if not self.enabled or self.directory is None:
            return None
        parts = key if isinstance(key, tuple) else (key,)
        return self.directory / ("_".join(str(part) for part in parts) + ".pt")
