"""What a method sees of a run: its model, the task data as loaders, class bookkeeping, frozen features."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from norga.config import RunConfig
from norga.engine.features import FeatureSet, FrozenFeatureCache
from norga.engine.seeding import derive_seed, generator
from norga.nn import PromptedViT


@dataclass
class TaskDatasets:
    """One task's data: augmented training images, the same images with the test transform, test images."""

    classes: list[int]
    train: Dataset
    train_eval: Dataset
    test: Dataset


class RunContext:
    """Shared by the engine and a method: loaders seeded per (task, epoch), class masks, feature caches."""

    def __init__(
        self,
        config: RunConfig,
        model: PromptedViT,
        tasks: Sequence[TaskDatasets],
        num_classes: int,
        device: torch.device,
        workers: int = 0,
        feature_dir: Path | None = None,
        test_tasks: Sequence[TaskDatasets] | None = None,
    ) -> None:
        self.config = config
        self.model = model.eval()  # the frozen backbone never trains; methods switch to train() where they do
        self.tasks = list(tasks)  # what the method trains on, task after task
        self.test_tasks = list(test_tasks) if test_tasks is not None else self.tasks  # what is evaluated (joint: differ)
        self.num_classes = num_classes
        self.device = device
        self.workers = workers
        self.class_to_task = torch.full((num_classes,), -1, dtype=torch.long)
        for index, task in enumerate(self.tasks):
            self.class_to_task[task.classes] = index
        self.frozen_images_encoded = 0
        self.cache = FrozenFeatureCache(self.frozen_encode, device, enabled=config.cache_frozen_features,
                                        directory=feature_dir)

    # ------------------------------------------------------------ classes
    def classes(self, task: int) -> list[int]:
        return list(self.tasks[task].classes)

    def classes_before(self, task: int) -> list[int]:
        return [c for t in range(task) for c in self.tasks[t].classes]

    def classes_until(self, task: int) -> list[int]:
        return self.classes_before(task + 1)

    def class_mask(self, task: int) -> Tensor:
        return self._mask(self.classes(task))

    def class_mask_until(self, task: int) -> Tensor:
        return self._mask(self.classes_until(task))

    def _mask(self, classes: list[int]) -> Tensor:
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        mask[classes] = True
        return mask

    # ------------------------------------------------------------ loading
    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int | None = None) -> DataLoader:
        """A DataLoader; shuffling and worker seeds come from `seed`, so an epoch can be replayed."""
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=rng, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def train_loader(self, task: int, epoch: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Augmented training batches of `task` on the device; augmentation seeded by (seed, task, epoch)."""
        seed = derive_seed(self.config.seed, "train", task, epoch)
        torch.manual_seed(seed)  # main-process transforms draw from the global generator
        for images, labels in self.loader(self.tasks[task].train, batch_size, shuffle=True, seed=seed):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    # ------------------------------------------------------- frozen features
    @torch.no_grad()
    def frozen_encode(self, images: Tensor) -> Tensor:
        """Pre-logits of the frozen backbone (no prompts); counts every image encoded."""
        self.frozen_images_encoded += len(images)
        with self.autocast():
            return self.model.forward_features(images.to(self.device)).float()

    def frozen_train_features(self, task: int) -> FeatureSet:
        """Frozen features of `task`'s training images under the test transform, computed once per run."""
        return self.cache.features(("train", task), self.loader(self.tasks[task].train_eval, self._eval_batch()))

    def frozen_test_features(self, task: int) -> FeatureSet:
        """Frozen features of test task `task`'s images, computed once per run."""
        return self.cache.features(("test", task), self.loader(self.test_tasks[task].test, self._eval_batch()))

    def tii_training_batches(self, task: int, epoch: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches (features, labels) for task-identity training (augmented views per ``tii.augment``)."""
        return self.frozen_training_batches(task, epoch, batch_size, self.config.tii.augment, "tii")

    def frozen_training_batches(
        self, task: int, epoch: int, batch_size: int, augment: bool, stream: str
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches (frozen features, labels) of `task`'s training images for a model on frozen features.

        With `augment` (official for the TII model) the frozen backbone encodes freshly augmented images
        every epoch; without, the cached test-transform features are reshuffled each epoch by a generator
        seeded from (seed, `stream`, task, epoch).
        """
        if augment:
            for images, labels in self.train_loader(task, epoch, batch_size):
                yield self.frozen_encode(images), labels
            return
        cached = self.frozen_train_features(task)
        order = torch.randperm(len(cached.labels), generator=generator(self.config.seed, stream, task, epoch))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield cached.features[index].to(self.device), cached.labels[index].to(self.device)

    @torch.no_grad()
    def prompted_train_features(self, task: int) -> tuple[Tensor, Tensor]:
        """Prompted pre-logits (slot `task`) of `task`'s training images under the test transform."""
        chunks, labels = [], []
        for images, targets in self.loader(self.tasks[task].train_eval, self._eval_batch()):
            with self.autocast():
                chunks.append(self.model.forward_features(images.to(self.device), task).float().cpu())
            labels.append(torch.as_tensor(targets))
        return torch.cat(chunks), torch.cat(labels).long()

    # --------------------------------------------------------------- misc
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _eval_batch(self) -> int:
        return self.config.eval.batch_size

