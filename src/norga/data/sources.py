"""Readers of the on-disk formats: IDX (MNIST-likes), CIFAR python pickles, ImageFolder trees.

Each returns (train, test, class names) as `ImageDataset`s without transforms; images are RGB uint8.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from norga.data.datasets import ImageDataset, read_image, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values")
    return array.reshape(shape)


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_mnist_like(folder: Path, class_names: list[str]) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """train-/t10k- images and labels IDX files in `folder` (MNIST, Fashion-MNIST)."""
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
        splits.append(ImageDataset(to_rgb(torch.from_numpy(images.copy())), labels.tolist()))
    return splits[0], splits[1], class_names


def has_mnist_like(folder: Path) -> bool:
    return all(find_idx(folder, f"{p}-{k}") for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def read_cifar_pickles(folder: Path, fine: bool) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """torchvision's CIFAR python format: cifar-10-batches-py (fine=False) or cifar-100-python (fine=True)."""
    label_key = "fine_labels" if fine else "labels"
    if fine:
        train_files, test_files, meta, names_key = ["train"], ["test"], "meta", "fine_label_names"
    else:
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta, names_key = "batches.meta", "label_names"

    def load(files: list[str]) -> ImageDataset:
        images, labels = [], []
        for name in files:
            with open(folder / name, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        return ImageDataset(torch.from_numpy(np.concatenate(images)), labels)

    with open(folder / meta, "rb") as handle:
        names = pickle.load(handle, encoding="latin1")[names_key]
    return load(train_files), load(test_files), list(names)


def read_image_folder(root: Path, in_memory: bool) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """root/train/<class>/* and root/test/<class>/*; the same class folders in both."""
    splits, classes = [], None
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: an image-folder benchmark needs {root}/train/<class>/ and {root}/test/<class>/")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if classes is not None and names != classes:
            missing = sorted(set(classes) ^ set(names))
            raise ValueError(f"train/ and test/ of {root} have different class folders: {missing}")
        classes = names
        files, labels = [], []
        for label, name in enumerate(names):
            found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        if not files:
            raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        images = torch.stack([read_image(f) for f in files]) if in_memory else files
        splits.append(ImageDataset(images, labels))
    return splits[0], splits[1], classes
