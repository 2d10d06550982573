"""Generators of tiny datasets in every on-disk format the data layer reads (fresh random pixels each run)."""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def save_png(path: Path, size=(8, 8), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (*size, 3) if mode == "RGB" else size
    Image.fromarray(np.random.randint(0, 256, shape, dtype=np.uint8), mode).save(path)


class Makers:
    """Each method writes one dataset format under `root` and returns what a test needs to check it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mnist_like(self, folder: str, train_per_class=6, test_per_class=3, compress=True) -> dict:
        path = self.root / folder
        path.mkdir(parents=True, exist_ok=True)
        data = {}
        for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
            labels = np.repeat(np.arange(10), per_class)
            images = np.random.randint(0, 256, (len(labels), 28, 28))
            suffix = ".gz" if compress else ""
            write_idx(path / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
            write_idx(path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
            data[prefix] = (images.astype(np.uint8), labels)
        return data

    def relabel_idx(self, folder: str, prefix: str, labels) -> None:
        """Replace the labels of an IDX dataset written by `mnist_like` (same count unless told otherwise)."""
        write_idx(self.root / folder / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(labels))

    def cifar10(self, train_per_class=4, test_per_class=2) -> dict:
        folder = self.root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        data = {}
        for names, per_class in (([f"data_batch_{i}" for i in range(1, 6)], train_per_class), (["test_batch"], test_per_class)):
            for name in names:
                labels = np.repeat(np.arange(10), per_class).tolist()  # Python ints, as in the real files
                pixels = np.random.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
                with open(folder / name, "wb") as handle:
                    pickle.dump({"data": pixels, "labels": labels}, handle)
                data[name] = (pixels, labels)
        with open(folder / "batches.meta", "wb") as handle:
            pickle.dump({"label_names": [f"k{i}" for i in range(10)]}, handle)
        return data

    def cifar100(self, per_class=2) -> None:
        folder = self.root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, n in (("train", per_class), ("test", 1)):
            labels = np.repeat(np.arange(100), n).tolist()  # Python ints, as in the real files
            pixels = np.random.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
            with open(folder / name, "wb") as handle:
                pickle.dump({"data": pixels, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, handle)
        with open(folder / "meta", "wb") as handle:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, handle)

    def svhn(self, train_per_class=3, test_per_class=2) -> dict:
        from scipy.io import savemat

        folder = self.root / "svhn"
        folder.mkdir(parents=True)
        data = {}
        for name, per_class in (("train", train_per_class), ("test", test_per_class)):
            digits = np.repeat(np.arange(10), per_class)
            pixels = np.random.randint(0, 256, (32, 32, 3, len(digits)), dtype=np.uint8)
            savemat(folder / f"{name}_32x32.mat", {"X": pixels, "y": np.where(digits == 0, 10, digits)[:, None]})
            data[name] = (pixels, digits)
        return data

    def image_folder(self, folder: Path | None = None, classes=("a", "b", "c", "d"), per_class=3, size=(20, 24)) -> Path:
        folder = folder or self.root
        for split in ("train", "test"):
            for name in classes:
                for i in range(per_class):
                    save_png(folder / split / name / f"{i}.png", size)
        return folder

    def notmnist(self, per_class=(3, 2)) -> Path:
        folder = self.root / "notMNIST"
        for split, n in zip(("Train", "Test"), per_class):
            for letter in "ABCDEFGHIJ":
                for i in range(n):
                    save_png(folder / split / letter / f"{letter}{i}.png", (28, 28), "L")
        return folder

    def notmnist_zip(self, per_class=(2, 1), broken: str | None = None) -> Path:
        path = self.root / "notMNIST.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for split, n in zip(("Train", "Test"), per_class):
                for letter in "ABCDEFGHIJ":
                    for i in range(n):
                        png = self.root / "tmp.png"
                        save_png(png, (28, 28), "L")
                        archive.write(png, f"notMNIST/{split}/{letter}/{letter}{i}.png")
            if broken:
                archive.writestr(broken, b"not a png")
        (self.root / "tmp.png").unlink()
        return path

    def cub(self, num_classes=200, train_per_class=1, test_per_class=1) -> Path:
        root = self.root / "CUB_200_2011"
        images, labels, split, classes = [], [], [], []
        image_id = 0
        for c in range(num_classes):
            name = f"{c + 1:03d}.Bird_{c}"
            classes.append(f"{c + 1} {name}")
            for k in range(train_per_class + test_per_class):
                image_id += 1
                relative = f"{name}/{name}_{k}.jpg"
                save_png(root / "images" / relative)
                images.append(f"{image_id} {relative}")
                labels.append(f"{image_id} {c + 1}")
                split.append(f"{image_id} {int(k < train_per_class)}")
        for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                            ("train_test_split.txt", split), ("classes.txt", classes)):
            (root / name).write_text("\n".join(lines) + "\n")
        return root

    def imagenet_r(self, num_classes=200, per_class=5) -> Path:
        root = self.root / "imagenet-r"
        for c in range(num_classes):
            for k in range(per_class):
                save_png(root / f"n{c:08d}" / f"img_{k}.jpg", (6, 6))
        return root


@pytest.fixture
def make(tmp_path) -> Makers:
    return Makers(tmp_path)
