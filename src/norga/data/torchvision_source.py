"""Any torchvision classification dataset as a benchmark source: ``build_benchmark("torchvision/STL10")``."""

from __future__ import annotations

import inspect
from pathlib import Path

from norga.data.datasets import ImageDataset, SourceData
from norga.data.errors import BenchmarkOptionError, DataLayoutError, DatasetNotFoundError

PREFIX = "torchvision/"
TRAIN_SPLITS = ("train", "trainval")


def torchvision_class(name: str) -> type:
    """The torchvision.datasets class called `name` (a VisionDataset), or a clear error."""
    import torchvision.datasets as tv

    cls = getattr(tv, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, tv.VisionDataset)):
        known = sorted(n for n in dir(tv) if inspect.isclass(getattr(tv, n)) and issubclass(getattr(tv, n), tv.VisionDataset))
        raise BenchmarkOptionError(f"torchvision has no dataset {name!r}; known: {known}")
    return cls


def _instantiate(cls: type, root: Path, train: bool, download: bool):
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return cls(str(root), train=train, download=download)
    if "split" not in params:
        raise BenchmarkOptionError(f"torchvision.datasets.{cls.__name__} has neither a train= nor a split= argument: "
                         "use an image folder instead")
    errors = []
    for split in (TRAIN_SPLITS if train else ("test",)):
        try:
            return cls(str(root), split=split, download=download)
        except ValueError as error:  # torchvision's verify_str_arg: not one of this dataset's splits
            errors.append(str(error))
    tried = TRAIN_SPLITS if train else ("test",)
    raise BenchmarkOptionError(f"torchvision.datasets.{cls.__name__}: no split among {tried}: {errors}")


def _labels(dataset) -> list[int]:
    for attribute in ("targets", "labels", "_labels", "y"):
        labels = getattr(dataset, attribute, None)
        if labels is not None and len(labels) == len(dataset):
            return [int(y) for y in labels]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow path: reads every sample once


def read_torchvision(name: str, root: Path, download: bool) -> SourceData:
    """Train and test splits of torchvision.datasets.<name> under `root`, images converted on access."""
    cls = torchvision_class(name)
    splits = []
    for train in (True, False):
        try:
            dataset = _instantiate(cls, root, train, download)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            how = ("the download failed: no network access?" if download else
                   "allow a download (--set data.download=true, or download=True in Python) on a machine with network "
                   "(torchvision checks its checksums)")
            raise DatasetNotFoundError(
                f"torchvision/{name} not found under {root}: {error}. Expected layout: what "
                f"torchvision.datasets.{name} reads from its root. To get it: {how}"
            ) from error
        labels = _labels(dataset)
        if not labels:
            raise DataLayoutError(f"torchvision/{name} under {root}: the {'train' if train else 'test'} split is empty")
        splits.append(ImageDataset(dataset, labels, indices=range(len(labels))))
    classes = getattr(dataset, "classes", None) or [str(c) for c in range(max(splits[0].targets) + 1)]
    return SourceData(splits[0], splits[1], [str(c) for c in classes], {"torchvision_class": cls.__name__})
