"""Benchmarks from generated on-disk fixtures (IDX, CIFAR pickles, image folders) and, when present, real data."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from norga.data import DatasetNotFoundError, UnreadableImageError, build_benchmark, class_order, split_into_tasks
from norga.data.transforms import build_transforms


@pytest.mark.parametrize(("seed", "first_task"), [
    (42, [1, 9, 15, 41, 42, 50, 65, 70, 78, 91]),
    (40, [8, 21, 23, 24, 28, 48, 54, 73, 77, 83]),
    (44, [10, 25, 26, 31, 32, 46, 54, 63, 70, 82]),
])
def test_cifar100_class_order_matches_the_official_code(seed, first_task):
    assert split_into_tasks(class_order(100, seed), 10)[0] == first_task


def test_split_covers_every_class_once():
    order = class_order(23, 5)
    tasks = split_into_tasks(order, 4)
    assert sorted(c for t in tasks for c in t) == list(range(23)) and [len(t) for t in tasks] == [6, 6, 6, 5]
    with pytest.raises(ValueError, match="cannot split 3 classes into 5 tasks"):
        split_into_tasks(class_order(3, 0), 5)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion(root: Path, train_per_class=6, test_per_class=3) -> dict:
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    data = {}
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.random.randint(0, 256, (len(labels), 28, 28))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[prefix] = (images, labels)
    return data


def test_fashion_mnist_from_idx_files(tmp_path):
    data = make_fashion(tmp_path)
    bench = build_benchmark("fashion-mnist", data_root=tmp_path, seed=3, image_size=32)
    assert bench.num_classes == 10 and len(bench.tasks) == 5
    order = class_order(10, 3)
    for index, task in enumerate(bench.tasks):
        assert task.classes == sorted(order[2 * index : 2 * index + 2])
        assert sorted(set(task.train.targets)) == task.classes and len(task.train) == 12 and len(task.test) == 6
        image, label = task.train_eval[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label in task.classes
        assert torch.equal(image[0], image[1])  # greyscale became RGB
    # the raw pixels survive: test image of class c equals the IDX file's, through the test transform at 28 -> 28
    plain = build_benchmark("fashion-mnist", data_root=tmp_path, seed=3, image_size=28, normalization="official")
    first = plain.tasks[0].test
    raw_index = [i for i, y in enumerate(data["t10k"][1]) if y in plain.tasks[0].classes][0]
    expected = torch.from_numpy(data["t10k"][0][raw_index].astype(np.float32) / 255)
    resized = build_transforms(28, (0, 0, 0), (1, 1, 1), "official")[1]
    assert torch.allclose(first[0][0][0], resized(torch.from_numpy(data["t10k"][0][raw_index][None].astype(np.uint8)))[0], atol=1e-6)
    assert expected.shape == (28, 28)


def test_train_per_class_subsample_is_seeded(tmp_path):
    make_fashion(tmp_path, train_per_class=10)
    a = build_benchmark("fashion-mnist", data_root=tmp_path, seed=1, image_size=32, train_per_class=4, test_per_class=2)
    b = build_benchmark("fashion-mnist", data_root=tmp_path, seed=1, image_size=32, train_per_class=4, test_per_class=2)
    assert all(len(t.train) == 8 and len(t.test) == 4 for t in a.tasks)
    assert torch.equal(a.tasks[0].train_eval[3][0], b.tasks[0].train_eval[3][0])
    assert a.record()["train_per_class"] == 4


def make_cifar100(root: Path, per_class=2) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", per_class), ("test", 1)):
        labels = list(np.repeat(np.arange(100), n))
        data = np.random.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, handle)


def test_cifar100_pickles_split_into_ten_tasks(tmp_path):
    make_cifar100(tmp_path)
    bench = build_benchmark("cifar100", data_root=tmp_path, seed=42, image_size=32)
    assert bench.tasks[0].classes == [1, 9, 15, 41, 42, 50, 65, 70, 78, 91]
    assert all(len(t.train) == 20 and len(t.test) == 10 for t in bench.tasks)
    assert bench.class_to_task[1] == 0 and bench.class_names[1] == "c1"


def make_image_folder(root: Path, classes=("a", "b", "c", "d"), per_class=3) -> None:
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.random.randint(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_and_its_errors(tmp_path):
    make_image_folder(tmp_path)
    bench = build_benchmark("imagefolder", data_root=tmp_path, num_tasks=2, image_size=16)
    assert bench.num_classes == 4 and [len(t.classes) for t in bench.tasks] == [2, 2]
    assert bench.tasks[1].train[0][0].shape == (3, 16, 16)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    broken = build_benchmark("imagefolder", data_root=tmp_path, num_tasks=2, image_size=16)
    task = next(t for t in broken.tasks if 0 in t.classes)
    with pytest.raises(UnreadableImageError, match="broken.png"):
        [task.train[i] for i in range(len(task.train))]
    (tmp_path / "test" / "e").mkdir()
    with pytest.raises(ValueError, match="different class folders: \\['e'\\]"):
        build_benchmark("imagefolder", data_root=tmp_path, num_tasks=2)


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NORGA_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match=f"looked in: {tmp_path}/cifar-100-python.*Expected layout.*download"):
        build_benchmark("cifar100", data_root=tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'cifar1000'; known"):
        build_benchmark("cifar1000", data_root=tmp_path)


def test_data_root_comes_from_the_environment(tmp_path, monkeypatch):
    make_fashion(tmp_path)
    monkeypatch.setenv("NORGA_DATA", str(tmp_path))
    assert build_benchmark("fashion-mnist", image_size=32).source == str(tmp_path / "fashion-mnist")


def test_official_transforms_at_any_size():
    train, test = build_transforms(24, (0.5,) * 3, (0.5,) * 3, "backbone", cifar_style=True)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert train(image).shape == test(image).shape == (3, 24, 24)
    assert test(torch.full((3, 32, 32), 255, dtype=torch.uint8)).max() == pytest.approx(1.0)
    _, official = build_transforms(24, (0.5,) * 3, (0.5,) * 3, "official", cifar_style=True)
    assert official(torch.full((3, 32, 32), 255, dtype=torch.uint8))[0].max() == pytest.approx((1 - 0.5071) / 0.2675, rel=1e-4)


REAL = os.environ.get("NORGA_DATA")
CIFAR10_JPG = os.environ.get("NORGA_CIFAR10_JPG")


@pytest.mark.realdata
@pytest.mark.skipif(not REAL or not (Path(REAL or "/") / "fashion-mnist").is_dir(),
                    reason="real Fashion-MNIST absent: set NORGA_DATA to ../shared/data")
def test_real_fashion_mnist_counts():
    bench = build_benchmark("fashion-mnist", image_size=32)
    assert [len(t.train) for t in bench.tasks] == [12000] * 5 and [len(t.test) for t in bench.tasks] == [2000] * 5
    counts = np.bincount([y for t in bench.tasks for y in t.train.targets])
    assert counts.tolist() == [6000] * 10


@pytest.mark.realdata
@pytest.mark.skipif(not CIFAR10_JPG, reason="CIFAR-10 JPEG folders absent: set NORGA_CIFAR10_JPG (.ci/run extracts them)")
def test_real_cifar10_jpeg_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("NORGA_DATA", str(tmp_path))  # only the JPEG folders, not pickles elsewhere
    bench = build_benchmark("cifar10", image_size=32, seed=42)
    assert [len(t.train) for t in bench.tasks] == [10000] * 5 and [len(t.test) for t in bench.tasks] == [2000] * 5
    assert bench.class_names[0] == "airplane" and bench.tasks[0].train_eval[0][0].shape == (3, 32, 32)
