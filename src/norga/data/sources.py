"""Readers of the small on-disk formats, decoded once into memory: IDX (MNIST-likes), CIFAR python pickles,
SVHN .mat and notMNIST letter folders (or its zip).

Each takes (path, `ReadOptions`) and returns (train, test, class names) as `ImageDataset`s without transforms;
labels are the dataset's own.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from norga.data.datasets import ImageDataset
from norga.data.decode import DEFAULT_READ, IMAGE_SUFFIXES, ReadOptions, decode_all, stack_if_uniform
from norga.data.errors import DataLayoutError
from norga.data.safe_pickle import load_cifar_batch

NOTMNIST_CLASSES = list("ABCDEFGHIJ")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataLayoutError(f"{path} is truncated or not gzip data ({error}); download it again") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataLayoutError(f"{path} is not an unsigned-byte IDX file (bad magic number): replace it with the original")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise DataLayoutError(f"{path} is truncated: header says {shape}, found {array.size} values; download it again")
    return array.reshape(shape)


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def has_mnist_like(folder: Path) -> bool:
    return all(find_idx(folder, f"{p}-{k}") for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def read_mnist_like(folder: Path, options: ReadOptions = DEFAULT_READ, *, class_names: list[str]) -> tuple:
    """train-/t10k- images and labels IDX files in `folder` (MNIST, Fashion-MNIST); greyscale kept 1-channel."""
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise DataLayoutError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels; "
                                  "re-download the IDX files")
        splits.append(ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), labels.tolist()))
    return splits[0], splits[1], class_names


def read_cifar_pickles(folder: Path, options: ReadOptions = DEFAULT_READ, *, fine: bool) -> tuple:
    """torchvision's CIFAR python format: cifar-10-batches-py (fine=False) or cifar-100-python (fine=True)."""
    label_key = "fine_labels" if fine else "labels"
    if fine:
        train_files, test_files, meta, names_key = ["train"], ["test"], "meta", "fine_label_names"
    else:
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta, names_key = "batches.meta", "label_names"

    def load(name: str):
        path = folder / name
        if not path.is_file():
            raise DataLayoutError(f"{path} is missing: the CIFAR folder needs {train_files + test_files + [meta]}")
        return load_cifar_batch(path)

    def split(files: list[str]) -> ImageDataset:
        images, labels = [], []
        for name in files:
            entry = load(name)
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        return ImageDataset(torch.from_numpy(np.concatenate(images)), labels)

    return split(train_files), split(test_files), list(load(meta)[names_key])


def read_svhn_mat(folder: Path, options: ReadOptions = DEFAULT_READ) -> tuple:
    """SVHN cropped digits: train_32x32.mat / test_32x32.mat (X: 32x32x3xN, y: 1..10 with 10 = digit 0)."""
    try:
        from scipy.io import loadmat
    except ImportError as error:  # pragma: no cover - scipy is a dependency
        raise ImportError("reading SVHN's .mat files needs scipy: pip install scipy") from error
    splits = []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        mat = loadmat(folder / name)
        images = np.transpose(mat["X"], (3, 2, 0, 1))  # as torchvision: (N, 3, 32, 32)
        labels = mat["y"].astype(np.int64).squeeze(1)
        labels[labels == 10] = 0
        splits.append(ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), labels.tolist()))
    return splits[0], splits[1], [str(d) for d in range(10)]


def class_folder_files(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files under folder/<class>/ in sorted order, their labels and the class names."""
    if not folder.is_dir():
        raise DataLayoutError(f"{folder} is missing: expected class folders {folder}/<class>/*.jpg")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    missing = [name for name in classes if name not in found]
    if missing:
        raise DataLayoutError(f"{folder}: class folders missing: {missing} (found {found}); restore them from the archive")
    files, labels = [], []
    for label, name in enumerate(classes):
        members = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not members:
            raise DataLayoutError(f"{folder / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += members
        labels += [label] * len(members)
    return files, labels, list(classes)


def notmnist_split_folders(root: Path) -> tuple[str, str] | None:
    """notMNIST/{Train,Test} as in the ACL zip (lower-case accepted)."""
    for pair in (("Train", "Test"), ("train", "test")):
        if all((root / name).is_dir() for name in pair):
            return pair
    return None


def read_notmnist(root: Path, options: ReadOptions = DEFAULT_READ) -> tuple:
    """notMNIST letters A-J (label = ord(letter) - 65, as the official code) from root/{Train,Test}/<A-J>/*.png,
    or straight from the ACL repository's notMNIST.zip without extracting it."""
    if root.is_file():
        from norga.data.archive import read_class_archive

        train, test, _ = read_class_archive(root, options, ("Train", "Test"), NOTMNIST_CLASSES)
        return _grey(train, root), _grey(test, root), list(NOTMNIST_CLASSES)
    pair = notmnist_split_folders(root)
    if pair is None:
        raise DataLayoutError(f"{root} needs Train/ and Test/ folders of letter folders A-J")
    datasets = []
    for split in pair:
        files, labels, _ = class_folder_files(root / split, NOTMNIST_CLASSES)
        images, kept, skipped = decode_all(files, options.skip_unreadable)
        decoded = ImageDataset(stack_if_uniform(images), [labels[i] for i in kept], skipped=skipped)
        datasets.append(_grey(decoded, root / split))
    return datasets[0], datasets[1], list(NOTMNIST_CLASSES)


def _grey(dataset: ImageDataset, where: Path) -> ImageDataset:
    """Letters are greyscale: keep one channel of the decoded images (the RGB view is made on access)."""
    if not len(dataset):
        raise DataLayoutError(f"{where} holds no readable notMNIST images")
    if not isinstance(dataset.images, torch.Tensor):
        sizes = sorted({tuple(image.shape[1:]) for image in dataset.images})
        raise DataLayoutError(f"{where}: notMNIST images of different sizes {sizes[:3]}: expected 28x28 letters")
    return ImageDataset(dataset.images[:, :1].contiguous(), dataset.targets, skipped=dataset.skipped)
