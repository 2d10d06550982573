"""Continual benchmarks: a labelled image source split into tasks by the seeded official class order."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from norga.data.datasets import ImageDataset
from norga.data.sources import has_mnist_like, read_cifar_pickles, read_image_folder, read_mnist_like
from norga.data.splits import class_order, split_into_tasks
from norga.data.transforms import build_transforms

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """The data is not where it was looked for; the message says where it looked and how to get it."""


@dataclass
class Task:
    """One task: its classes and datasets (train augmented, train under the test transform, test)."""

    index: int
    classes: list[int]
    train: ImageDataset
    train_eval: ImageDataset
    test: ImageDataset


@dataclass
class ContinualBenchmark:
    name: str
    num_classes: int
    class_order: list[int]
    class_names: list[str]
    tasks: list[Task]
    source: str
    details: dict = field(default_factory=dict)

    @property
    def class_to_task(self) -> list[int]:
        mapping = [-1] * self.num_classes
        for task in self.tasks:
            for label in task.classes:
                mapping[label] = task.index
        return mapping

    def record(self) -> dict:
        """Provenance for the run record."""
        return {"name": self.name, "source": self.source, "num_classes": self.num_classes,
                "num_tasks": len(self.tasks), "class_order": self.class_order,
                "train_images": sum(len(t.train) for t in self.tasks),
                "test_images": sum(len(t.test) for t in self.tasks), **self.details}


@dataclass(frozen=True)
class Source:
    """How to find one dataset under a data root and read it."""

    num_classes: int
    default_tasks: int
    cifar_style: bool
    candidates: Callable[[Path], list[Path]]
    present: Callable[[Path], bool]
    read: Callable[[Path], tuple]
    layout: str
    how_to_get: str
    download: Callable[[Path], None] | None = None


def _torchvision_download(name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tv

        getattr(tv, name)(str(root), train=True, download=True)  # verifies torchvision's checksums
        getattr(tv, name)(str(root), train=False, download=True)

    return download


def _cifar10_candidates(root: Path) -> list[Path]:
    extra = [Path(os.environ["NORGA_CIFAR10_JPG"])] if os.environ.get("NORGA_CIFAR10_JPG") else []
    return [root / "cifar-10-batches-py", root / "cifar10-jpg", *extra]


def _read_cifar10(path: Path) -> tuple:
    if (path / "data_batch_1").is_file():
        return read_cifar_pickles(path, fine=False)
    return read_image_folder(path, in_memory=True)


SOURCES: dict[str, Source] = {
    "cifar100": Source(
        100, 10, True, lambda r: [r / "cifar-100-python"], lambda p: (p / "train").is_file(),
        lambda p: read_cifar_pickles(p, fine=True), "<root>/cifar-100-python/{train,test,meta} (torchvision's format)",
        "pass --set data.download=true on a machine with network, or copy torchvision's cifar-100-python folder there",
        _torchvision_download("CIFAR100"),
    ),
    "cifar10": Source(
        10, 5, True, _cifar10_candidates,
        lambda p: (p / "data_batch_1").is_file() or (p / "train").is_dir(), _read_cifar10,
        "<root>/cifar-10-batches-py (torchvision's format) or <root>/cifar10-jpg/{train,test}/<class>/*.jpg "
        "(or $NORGA_CIFAR10_JPG)",
        "pass --set data.download=true with network, or extract a CIFAR-10 JPEG archive to <root>/cifar10-jpg",
        _torchvision_download("CIFAR10"),
    ),
    "fashion-mnist": Source(
        10, 5, False, lambda r: [r / "fashion-mnist", r / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST],
        has_mnist_like, lambda p: read_mnist_like(p, FASHION_CLASSES),
        "<root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        "`apt-get install dataset-fashion-mnist` (installs to /usr/share/datasets/fashion-mnist), "
        "or --set data.download=true with network, or copy the four IDX files to <root>/fashion-mnist",
        _torchvision_download("FashionMNIST"),
    ),
    "mnist": Source(
        10, 5, False, lambda r: [r / "mnist", r / "MNIST" / "raw"], has_mnist_like,
        lambda p: read_mnist_like(p, [str(d) for d in range(10)]),
        "<root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        "--set data.download=true with network, or copy the four IDX files to <root>/mnist", _torchvision_download("MNIST"),
    ),
    "imagefolder": Source(
        0, 0, False, lambda r: [r], lambda p: (p / "train").is_dir() and (p / "test").is_dir(),
        lambda p: read_image_folder(p, in_memory=False), "<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg",
        "point data.root at a folder with train/ and test/ class folders",
    ),
}


def locate(name: str, data_root: str | Path | None, download: bool) -> Path:
    """The folder holding `name`: under `data_root`, else $NORGA_DATA, else downloaded when allowed."""
    if name not in SOURCES:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(SOURCES)}")
    source = SOURCES[name]
    roots = [Path(data_root)] if data_root else ([Path(os.environ["NORGA_DATA"])] if os.environ.get("NORGA_DATA") else [])
    searched = [path for root in roots for path in source.candidates(root)]
    if name == "fashion-mnist" and DEBIAN_FASHION_MNIST not in searched:
        searched.append(DEBIAN_FASHION_MNIST)
    for path in searched:
        if source.present(path):
            return path
    if download and source.download is not None and roots:
        source.download(roots[0])
        for path in source.candidates(roots[0]):
            if source.present(path):
                return path
    raise DatasetNotFoundError(
        f"{name} not found; looked in: {', '.join(map(str, searched)) or '(nowhere: set data.root or $NORGA_DATA)'}. "
        f"Expected layout: {source.layout}. To get it: {source.how_to_get}."
    )


def subsample_per_class(dataset: ImageDataset, per_class: int, seed: int) -> ImageDataset:
    """At most `per_class` images of each class, chosen by the seed (recorded in the run record)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(dataset.targets):
        by_class.setdefault(label, []).append(index)
    chosen = sorted(i for indices in by_class.values() for i in (rng.sample(indices, per_class) if len(indices) > per_class else indices))
    return dataset.subset(chosen)


def build_benchmark(
    name: str, *, data_root: str | Path | None = None, seed: int = 42, num_tasks: int | None = None,
    image_size: int = 224, mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
    normalization: str = "backbone", train_per_class: int | None = None, test_per_class: int | None = None,
    download: bool = False,
    fiveds_transform_carryover: bool = False,
) -> ContinualBenchmark:
    """Read benchmark `name`, order its classes by `seed` and split them into `num_tasks` tasks."""
    if fiveds_transform_carryover:
        raise NotImplementedError("5-datasets is not available yet, so its transform carry-over switch is not either")
    path = locate(name, data_root, download)
    source = SOURCES[name]
    train, test, class_names = source.read(path)
    num_classes = source.num_classes or len(class_names)
    if max(train.targets) >= num_classes or len(set(train.targets)) != num_classes:
        raise ValueError(f"{path}: expected {num_classes} classes with training images, found {len(set(train.targets))}")
    if train_per_class is not None:
        train = subsample_per_class(train, train_per_class, seed)
    if test_per_class is not None:
        test = subsample_per_class(test, test_per_class, seed)
    num_tasks = num_tasks or source.default_tasks or min(10, num_classes)
    order = class_order(num_classes, seed)
    train_tf, test_tf = build_transforms(image_size, mean, std, normalization, source.cifar_style)
    tasks = []
    for index, classes in enumerate(split_into_tasks(order, num_tasks)):
        wanted = set(classes)
        train_part = train.subset([i for i, y in enumerate(train.targets) if y in wanted])
        test_part = test.subset([i for i, y in enumerate(test.targets) if y in wanted])
        if not len(test_part):
            raise ValueError(f"{path}: no test images for the classes of task {index + 1}: {classes}")
        tasks.append(Task(index, classes, train_part.with_transform(train_tf), train_part.with_transform(test_tf),
                          test_part.with_transform(test_tf)))
    details = {"normalization": normalization, "image_size": image_size, "train_per_class": train_per_class,
               "test_per_class": test_per_class,
               "fiveds_transform_carryover": fiveds_transform_carryover}
    return ContinualBenchmark(name, num_classes, order, class_names, tasks, str(path), details)
