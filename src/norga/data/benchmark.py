"""Continual benchmarks: labelled image sources split into tasks by the seeded official class order.

One entry point, `build_benchmark(DataConfig(benchmark=name, ...), ...)`, over a registry of benchmark names
(`BENCHMARKS`, plus ``torchvision/<DatasetClass>`` for any torchvision classification dataset).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from norga.config import DataConfig
from norga.data.datasets import ImageDataset, SourceData
from norga.data.decode import ReadOptions
from norga.data.errors import BenchmarkOptionError, DataLayoutError, DatasetNotFoundError
from norga.data.fivedatasets import SOURCE_OF, cifar_style_flags, dataset_order
from norga.data.registry import SET_ROOT, SOURCES, locate, search_roots
from norga.data.splits import class_order, split_into_tasks
from norga.data.torchvision_source import PREFIX as TORCHVISION_PREFIX
from norga.data.torchvision_source import read_torchvision
from norga.data.transforms import build_transforms

__all__ = ["BENCHMARKS", "SOURCES", "ContinualBenchmark", "DatasetNotFoundError", "Task", "build_benchmark",
           "check_benchmark_data", "locate"]


@dataclass
class Task:
    """One task: its (global) class ids and datasets: train (train transform), train_eval (the same training
    images under the test transform, for statistics passes), test."""

    index: int
    classes: list[int]
    train: ImageDataset
    train_eval: ImageDataset
    test: ImageDataset

    def train_with(self, transform: Callable | None) -> ImageDataset:
        """The training images, same order, under `transform`."""
        return self.train.with_transform(transform)

    def test_with(self, transform: Callable | None) -> ImageDataset:
        return self.test.with_transform(transform)


@dataclass
class ContinualBenchmark:
    """Ordered tasks over `num_classes` global labels (the classifier head covers all of them)."""

    name: str
    num_classes: int
    class_order: list[int]
    class_names: list[str]
    tasks: list[Task]
    source: str
    details: dict = field(default_factory=dict)

    @property
    def class_to_task(self) -> list[int]:
        """Task index of every label (indexable by label; -1 for a label in no task)."""
        mapping = [-1] * self.num_classes
        for task in self.tasks:
            for label in task.classes:
                mapping[label] = task.index
        return mapping

    def split_sha256(self) -> str:
        """sha256 of the split itself: every task's classes and train/test labels in order."""
        content = [[t.classes, t.train.targets, t.test.targets] for t in self.tasks]
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()

    def record(self) -> dict:
        """Provenance for the run record: sources, split hash, compat switches, skipped files."""
        return {"name": self.name, "source": self.source, "num_classes": self.num_classes,
                "num_tasks": len(self.tasks), "class_order": self.class_order,
                "task_classes": [t.classes for t in self.tasks],
                "train_images": sum(len(t.train) for t in self.tasks),
                "test_images": sum(len(t.test) for t in self.tasks),
                "split_sha256": self.split_sha256(), **self.details}


@dataclass
class _Options:
    """How to build a benchmark: the data section, the seed and what only the backbone knows."""

    data: DataConfig
    seed: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_transform: Callable | None
    test_transform: Callable | None

    @property
    def reading(self) -> ReadOptions:
        return ReadOptions(self.data.skip_unreadable, self.data.memory_budget_mb, self.data.split_manifest)

    def transforms(self, cifar_style: bool) -> tuple[Callable, Callable]:
        train, test = build_transforms(self.image_size, self.mean, self.std, self.data.normalization, cifar_style)
        return self.train_transform or train, self.test_transform or test


def subsample_per_class(dataset: ImageDataset, per_class: int, seed: int) -> ImageDataset:
    """At most `per_class` images of each class, chosen by the seed, in the original order."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(dataset.targets):
        by_class.setdefault(label, []).append(index)
    chosen = sorted(i for _, indices in sorted(by_class.items())
                    for i in (rng.sample(indices, per_class) if len(indices) > per_class else indices))
    return dataset.subset(chosen)


def _read(name: str, opts: _Options) -> tuple[SourceData, str]:
    """Read source `name` and check it holds the classes the benchmark needs."""
    if name.startswith(TORCHVISION_PREFIX):
        roots = search_roots(opts.data.root)
        if not roots:
            raise DatasetNotFoundError(f"{name}: no data root to look in: {SET_ROOT}")
        return read_torchvision(name[len(TORCHVISION_PREFIX):], roots[0], opts.data.download), str(roots[0])
    path = locate(name, opts.data.root, opts.data.download)
    data = SOURCES[name].read(path, opts.reading)
    if not isinstance(data, SourceData):
        data = SourceData(*data)
    expected = SOURCES[name].num_classes
    if expected and len(data.class_names) != expected:
        raise DataLayoutError(f"{path}: found {len(data.class_names)} classes, {name} has {expected}: "
                              "the folder is incomplete or not this dataset")
    return data, str(path)


def _check_classes(data: SourceData, num_classes: int, where: str) -> None:
    for split, dataset in (("train", data.train), ("test", data.test)):
        if not len(dataset):
            raise DataLayoutError(f"{where}: the {split} split is empty")
        present = set(dataset.targets)
        if max(present) >= num_classes or min(present) < 0:
            raise DataLayoutError(f"{where}: {split} labels out of range [0, {num_classes}): {max(present)}")
    missing = sorted(set(range(num_classes)) - set(data.train.targets))
    if missing:
        raise DataLayoutError(f"{where}: no training images for classes {missing[:10]} "
                              f"({len(missing)} of {num_classes}); the data is incomplete")


def _sized(data: SourceData, opts: _Options) -> tuple[ImageDataset, ImageDataset]:
    train, test = data.train, data.test
    if opts.data.train_per_class is not None:
        train = subsample_per_class(train, opts.data.train_per_class, opts.seed)
    if opts.data.test_per_class is not None:
        test = subsample_per_class(test, opts.data.test_per_class, opts.seed)
    return train, test


def _task(index: int, classes: list[int], train: ImageDataset, test: ImageDataset, transforms, where: str) -> Task:
    wanted = set(classes)
    train_part = train.subset([i for i, y in enumerate(train.targets) if y in wanted])
    test_part = test.subset([i for i, y in enumerate(test.targets) if y in wanted])
    if not len(test_part):
        raise DataLayoutError(f"{where}: no test images for the classes of task {index + 1}: {classes}")
    train_tf, test_tf = transforms
    return Task(index, classes, train_part.with_transform(train_tf), train_part.with_transform(test_tf),
                test_part.with_transform(test_tf))


def _skipped(*datasets: ImageDataset) -> dict:
    files = [f for d in datasets for f in d.skipped]
    return {"skipped_unreadable": len(files), "skipped_files": files[:20]}


def _split_benchmark(name: str, opts: _Options) -> ContinualBenchmark:
    """One labelled source, classes shuffled by the seed and cut into tasks."""
    data, where = _read(name, opts)
    source = SOURCES.get(name)
    num_classes = (source.num_classes if source else 0) or len(data.class_names)
    _check_classes(data, num_classes, where)
    train, test = _sized(data, opts)
    default_tasks = (source.default_tasks if source else 0) or min(10, num_classes)
    order = class_order(num_classes, opts.seed, rule=opts.data.class_order)
    transforms = opts.transforms(bool(source and source.cifar_style))
    tasks = [_task(i, classes, train, test, transforms, where)
             for i, classes in enumerate(split_into_tasks(order, opts.data.num_tasks or default_tasks))]
    details = {**data.details, **_skipped(data.train, data.test)}
    return ContinualBenchmark(name, num_classes, order, list(data.class_names), tasks, where, details)


def _five_datasets(name: str, opts: _Options) -> ContinualBenchmark:
    """5-Datasets: one task per dataset in the seeded official order, labels offset by 10 per position."""
    if opts.data.num_tasks not in (None, 5):
        raise BenchmarkOptionError(f"5-datasets has exactly 5 tasks (one per dataset), not {opts.data.num_tasks}")
    order = dataset_order(opts.seed)
    carryover = cifar_style_flags(order, opts.data.fiveds_transform_carryover)
    tasks, names, paths, skipped = [], [], {}, []
    for index, (dataset, cifar_style) in enumerate(zip(order, carryover)):
        data, where = _read(SOURCE_OF[dataset], opts)
        _check_classes(data, 10, where)
        train, test = (d.relabel(10 * index) for d in _sized(data, opts))
        classes = list(range(10 * index, 10 * index + 10))
        tasks.append(_task(index, classes, train, test, opts.transforms(cifar_style), where))
        names += [f"{dataset}:{c}" for c in data.class_names]
        paths[dataset] = where
        skipped += [data.train, data.test]
    details = {"dataset_order": order, "sources": paths, **_skipped(*skipped), "cifar_style_transforms": carryover}
    return ContinualBenchmark(name, 50, list(range(50)), names, tasks, "; ".join(paths.values()), details)


BENCHMARKS: dict[str, Callable[..., ContinualBenchmark]] = {
    **{name: _split_benchmark for name in SOURCES}, "5-datasets": _five_datasets,
}


def known_benchmarks() -> list[str]:
    return [*sorted(BENCHMARKS), f"{TORCHVISION_PREFIX}<DatasetClass>"]


def _builder(data: DataConfig) -> Callable[[str, _Options], ContinualBenchmark]:
    """The builder of ``data.benchmark``, after checking the data section's options fit it."""
    name = data.benchmark
    if name.startswith(TORCHVISION_PREFIX):
        builder = _split_benchmark
    elif name in BENCHMARKS:
        builder = BENCHMARKS[name]
    else:
        raise BenchmarkOptionError(f"unknown benchmark {name!r}; known: {known_benchmarks()}")
    if data.split_manifest is not None and name != "imagenet-r":
        raise BenchmarkOptionError(f"split_manifest only applies to imagenet-r (the one without an official split), "
                                   f"not {name!r}")
    if data.fiveds_transform_carryover and builder is not _five_datasets:
        raise BenchmarkOptionError("fiveds_transform_carryover only applies to the 5-datasets benchmark")
    return builder


def _refuse_missing_root(data: DataConfig) -> None:
    """An explicit data root that does not exist is an error, never a fall-back to $NORGA_DATA."""
    if data.root is not None and not data.download and not Path(data.root).is_dir():
        raise DatasetNotFoundError(f"data root {data.root} does not exist: fix data.root (--set data.root=DIR), or "
                                   "leave it unset to read $NORGA_DATA, or allow a download into it with "
                                   "data.download=true")


def check_benchmark_data(data: DataConfig) -> str | None:
    """The search for the data section's benchmark, before anything slow (a backbone download) is started: the
    name and options fit, and every dataset the benchmark reads is where it is looked for (downloaded when
    ``data.download``).

    Returns the data root to record, absolute: the search root (``data.root``, else $NORGA_DATA) the data was found
    under, so a run resumes without the environment; ``data.root`` itself when it was found elsewhere.
    """
    builder = _builder(data)
    _refuse_missing_root(data)
    roots = search_roots(data.root)
    if data.benchmark.startswith(TORCHVISION_PREFIX):
        if not roots:
            raise DatasetNotFoundError(f"{data.benchmark}: no data root to look in: {SET_ROOT}")
        return str(roots[0].resolve())
    found = [locate(source, data.root, data.download) for source in
             (SOURCE_OF.values() if builder is _five_datasets else [data.benchmark])]
    for root in roots:
        if any(path.resolve().is_relative_to(root.resolve()) for path in found):
            return str(root.resolve())
    return str(Path(data.root).resolve()) if data.root else None


def build_benchmark(
    data: DataConfig, *, seed: int = 42, image_size: int = 224, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5), train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> ContinualBenchmark:
    """Read the benchmark the data section `data` describes, order its classes by `seed` and split them into
    ``data.num_tasks`` tasks, read from ``data.root`` (`check_benchmark_data` finds the root a run records).

    ``image_size``, ``mean``, ``std``: the backbone's input (see `transforms.backbone_input`); ``train_transform``
    / ``test_transform`` replace the official transforms. Of `data` (`norga.config.DataConfig`):
    ``normalization`` "backbone" (mean/std above) or "official" (NORGA_SPEC P7); ``skip_unreadable`` leaves out
    (and counts) image files that cannot be decoded instead of failing; ``memory_budget_mb``: image-file datasets
    whose decoded pixels fit are decoded once and held in memory (0: decode on access); ``split_manifest``: an
    ImageNet-R split manifest file; ``fiveds_transform_carryover`` reproduces the official 5-datasets transform bug
    (P6).
    """
    builder = _builder(data)
    _refuse_missing_root(data)
    opts = _Options(data, seed, image_size, tuple(mean), tuple(std), train_transform, test_transform)
    bench = builder(data.benchmark, opts)
    bench.details.update({"seed": seed, "normalization": data.normalization, "class_order_rule": data.class_order,
                          "image_size": image_size,
                          "train_per_class": data.train_per_class, "test_per_class": data.test_per_class,
                          "custom_transforms": train_transform is not None or test_transform is not None,
                          "compat": {"fiveds_transform_carryover": data.fiveds_transform_carryover}})
    return bench
