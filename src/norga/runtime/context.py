"""What a method sees of a run: its model, the task data as loaders, class bookkeeping, frozen features."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from norga.config import RunConfig
from norga.nn import PromptedViT
from norga.runtime.distributed import SINGLE_PROCESS, Distributed
from norga.runtime.features import FeatureSet, FrozenFeatureCache
from norga.runtime.precision import prepare_for_bf16
from norga.runtime.seeding import derive_seed, generator


@dataclass
class TaskDatasets:
    """One task's data: augmented training images, the same images with the test transform, test images."""

    classes: list[int]
    train: Dataset
    train_eval: Dataset
    test: Dataset


@dataclass
class BuiltRun:
    """A run ready to start: its resolved config and what was built from it (`norga.engine.build.build_run`).

    The engine and `RunContext` take it whole; a run assembled by hand (a model of your own) fills it directly.
    """

    config: RunConfig  # resolved (amp bf16 or none, data root absolute): what runs and what config.yaml records
    model: PromptedViT
    tasks: list[TaskDatasets]
    num_classes: int
    device: torch.device
    #: The seeded stream after the backbone and head, where methods initialise their parameters (None: a stream
    #: from the seed alone).
    init_generator: torch.Generator | None = None
    records: dict[str, Any] = field(default_factory=dict)  # provenance for environment.json (backbone, benchmark ...)


class TrainBatch(NamedTuple):
    """This process's shard of one training batch; `counts` holds every process's shard size."""

    images: Tensor  # images, or frozen features for models trained on them
    labels: Tensor
    counts: tuple[int, ...]

    @property
    def size(self) -> int:
        """Images in the whole (global) batch."""
        return sum(self.counts)


class SeededAugmentation(Dataset):
    """`dataset` with each item's random transform seeded from (`seed`, index): independent of which
    process or loader worker reads it, and of the order items are read in."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        torch.default_generator.manual_seed(derive_seed(self.seed, index))
        return self.dataset[index]


class RunContext:
    """Shared by the engine and a method: seeded (and, across processes, sharded) batches, class masks,
    feature caches, and the loss helpers that keep a distributed run equal to one process."""

    def __init__(self, built: BuiltRun, *, train_tasks: Sequence[TaskDatasets] | None = None,
                 feature_dir: Path | None = None, dist: Distributed = SINGLE_PROCESS) -> None:
        """`built`'s model (moved to its device) and tasks; `train_tasks` (default: its tasks) is what the method
        trains on when that differs from what is tested (a joint run)."""
        config = self.config = built.config
        #: Where methods draw their parameters' random initialisation: `build_run` continues its own seeded
        #: stream here (after the backbone and head), so a run's prompts are a function of the seed alone.
        self.init_generator = built.init_generator or generator(config.seed, "init")
        # the frozen backbone never trains; methods switch to train() where they do
        self.model = model = built.model.to(built.device).eval()
        if config.amp == "bf16":  # frozen weights held in bf16 (no re-cast per forward), norga's bf16 attention
            prepare_for_bf16(model)
        self.test_tasks = list(built.tasks)  # what is evaluated
        self.tasks = list(train_tasks) if train_tasks is not None else self.test_tasks  # trained on, task after task
        self.num_classes = num_classes = built.num_classes
        self.device = built.device
        self.workers = config.data.workers
        self.class_to_task = torch.full((num_classes,), -1, dtype=torch.long)
        for index, task in enumerate(self.tasks):
            self.class_to_task[task.classes] = index
        self.dist = dist
        self.frozen_images_encoded = 0
        self.cache = FrozenFeatureCache(enabled=config.cache_frozen_features, directory=feature_dir,
                                        write=dist.is_main)
        self.batch_progress: Callable[[Sequence], Iterable] = iter  # every batch passes it (the engine's bars)

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
    def _data_loader(self, dataset: Dataset, batches: list[list[int]]) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def train_loader(self, task: int, epoch: int, batch_size: int, stream: str = "train") -> Iterator[TrainBatch]:
        """This process's shards of `task`'s augmented training batches, on the device.

        The order comes from (seed, `stream`, task, epoch) and every image's augmentation from (seed, `stream`, task,
        epoch, image), so an epoch replays exactly, whatever the number of processes or loader workers. A pass that
        is not a training epoch (e.g. statistics taken before or after one) names its own `stream`.
        """
        seed = derive_seed(self.config.seed, stream, task, epoch)
        dataset = self.tasks[task].train
        plan = self._shard_plan(len(dataset), batch_size, torch.Generator().manual_seed(seed))
        local = [indices for indices, _ in plan if indices]
        loaded = iter(self._data_loader(SeededAugmentation(dataset, seed), local))
        empty = None
        for indices, counts in self.batch_progress(plan):
            if indices:
                images, labels = next(loaded)
                empty = (images[:0], labels[:0])
            else:  # the last global batch has fewer images than there are processes
                images, labels = empty
            yield TrainBatch(images.to(self.device, non_blocking=True),
                             torch.as_tensor(labels).to(self.device, non_blocking=True), counts)

    def _shard_plan(self, count: int, batch_size: int, rng: torch.Generator) -> list[tuple[list[int], tuple[int, ...]]]:
        """Per global batch of a seeded shuffle of `count` items: this rank's indices and every rank's count."""
        if self.dist.enabled and min(batch_size, count) < self.dist.world_size:
            raise ValueError(f"batches of {min(batch_size, count)} images cannot be split over {self.dist.world_size} "
                             f"processes: use a batch size (and training set) of at least {self.dist.world_size} "
                             "images or fewer processes")
        order = torch.randperm(count, generator=rng).tolist()
        plan = []
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            counts = tuple(self.dist.shard_sizes(len(batch)))
            begin, end = self.dist.shard_bounds(len(batch))
            plan.append((batch[begin:end], counts))
        return plan

    def map_batches(self, dataset: Dataset, batch_size: int,
                    compute: Callable[[Tensor, Tensor, slice], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """``compute(images, labels, rows)`` over `dataset` in order, batch by batch, concatenated.

        `rows` is the batch's slice of the dataset. In a distributed run each process computes whole batches
        (so batch composition, and everything that depends on it, is that of one process) and every process
        gets all results.
        """
        bounds = [(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size)]
        mine = [bounds[index] for index in self.dist.my_batches(len(bounds))]
        loader = self._data_loader(dataset, [list(range(start, stop)) for start, stop in mine])
        results = []
        for (start, stop), (images, labels) in zip(self.batch_progress(mine), loader):
            outputs = compute(images.to(self.device, non_blocking=True), torch.as_tensor(labels), slice(start, stop))
            results.append(tuple(output.cpu() for output in outputs))
        if self.dist.enabled:
            by_rank = self.dist.gather_objects(results)
            results = [by_rank[index % self.dist.world_size][index // self.dist.world_size]
                       for index in range(len(bounds))]
        return tuple(torch.cat(parts) for parts in zip(*results))

    # ------------------------------------------------------ distributed loss
    def batch_mean(self, per_sample: Tensor, batch: TrainBatch) -> Tensor:
        """This process's share of the mean of `per_sample` over the whole (global) batch."""
        return per_sample.sum() / batch.size

    def gather_batch(self, local: Tensor, batch: TrainBatch) -> Tensor:
        """Per-sample rows of the whole batch, for loss terms that couple samples (use `replicated_term`)."""
        return self.dist.gather_batch(local, batch.counts)

    def replicated_term(self, term: Tensor | float) -> Tensor | float:
        """A loss term every process computes in full (of the whole batch, or of parameters only): its share."""
        return term / self.dist.world_size

    # ------------------------------------------------------- frozen features
    @torch.no_grad()
    def frozen_encode(self, images: Tensor) -> Tensor:
        """Pre-logits of the frozen backbone (no prompts); counts every image encoded."""
        self.frozen_images_encoded += len(images)
        with self.autocast():
            return self.model.forward_features(images.to(self.device)).float()

    @torch.no_grad()
    def encode_dataset(self, dataset: Dataset, encoder: Callable[[Tensor], Tensor] | None = None) -> FeatureSet:
        """Features of every image of `dataset` in order: frozen pre-logits, or ``encoder(images)`` (e.g. a
        method's prompted pass), in evaluation batches split over the processes."""
        def encode(images: Tensor, labels: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
            if encoder is None:
                return self.frozen_encode(images), labels
            return encoder(images).float(), labels

        features, labels = self.map_batches(dataset, self._eval_batch(), encode)
        return FeatureSet(features, labels.long())

    def frozen_train_features(self, task: int) -> FeatureSet:
        """Frozen features of `task`'s training images under the test transform, computed once per run."""
        return self.cache.features(("train", task), lambda: self.encode_dataset(self.tasks[task].train_eval))

    def frozen_test_features(self, task: int) -> FeatureSet:
        """Frozen features of test task `task`'s images, computed once per run."""
        return self.cache.features(("test", task), lambda: self.encode_dataset(self.test_tasks[task].test))

    def frozen_training_batches(
        self, task: int, epoch: int, batch_size: int, augment: bool, stream: str
    ) -> Iterator[TrainBatch]:
        """Batches of (frozen features, labels) of `task`'s training images for a model on frozen features.

        With `augment` (e.g. HiDe's task-identity model, officially) the frozen backbone encodes freshly augmented images
        every epoch; without, the cached test-transform features are reshuffled each epoch by a generator
        seeded from (seed, `stream`, task, epoch).
        """
        if augment:
            for batch in self.train_loader(task, epoch, batch_size):
                yield batch._replace(images=self.frozen_encode(batch.images))
            return
        cached = self.frozen_train_features(task)
        plan = self._shard_plan(len(cached.labels), batch_size, generator(self.config.seed, stream, task, epoch))
        for indices, counts in self.batch_progress(plan):
            index = torch.as_tensor(indices, dtype=torch.long)
            yield TrainBatch(cached.features[index].to(self.device), cached.labels[index].to(self.device), counts)

    # --------------------------------------------------------------- misc
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the run's amp is bf16 (every pass through the model must enter it: the frozen
        matmul weights are held in bf16 then), else nothing."""
        if self.config.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _eval_batch(self) -> int:
        return self.config.eval.batch_size

