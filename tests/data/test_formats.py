"""SVHN .mat, notMNIST (folders and zip), CUB-200-2011 and torchvision datasets: loaded and split correctly."""

import numpy as np
import pytest
import torch

from norga.config import DataConfig
from norga.data import (
    DataLayoutError,
    DatasetNotFoundError,
    UnreadableImageError,
    build_benchmark,
    class_order,
)
from norga.data.registry import SOURCES, locate


def test_svhn_mat_pixels_and_labels(make, tmp_path):
    data = make.svhn()
    bench = build_benchmark(DataConfig("svhn", root=tmp_path), seed=0, image_size=32)
    assert len(bench.tasks) == 5 and sum(len(t.train) for t in bench.tasks) == 30
    pixels, digits = data["test"]
    task = bench.tasks[1]
    first = next(i for i, d in enumerate(digits) if d in task.classes)
    assert task.test.targets[0] == digits[first]  # label 10 in the .mat is digit 0
    assert torch.equal(task.test.load(0), torch.from_numpy(pixels[..., first]).permute(2, 0, 1))
    assert 0 in [c for t in bench.tasks for c in t.classes]


def test_notmnist_folder_labels_are_letters(make, tmp_path):
    make.notmnist()
    bench = build_benchmark(DataConfig("notmnist", root=tmp_path, num_tasks=2), seed=1, image_size=28)
    assert bench.class_names == list("ABCDEFGHIJ")
    assert sum(len(t.train) for t in bench.tasks) == 30 and sum(len(t.test) for t in bench.tasks) == 20
    task = bench.tasks[0]
    image = task.train.load(0)
    assert image.shape == (3, 28, 28) and torch.equal(image[0], image[2])
    letter = "ABCDEFGHIJ"[task.train.targets[0]]
    first_file = min((tmp_path / "notMNIST" / "Train" / letter).iterdir())
    from PIL import Image

    assert torch.equal(image[0], torch.from_numpy(np.array(Image.open(first_file))))


def test_notmnist_broken_file_is_named_or_skipped_and_counted(make, tmp_path):
    make.notmnist()
    (tmp_path / "notMNIST" / "Train" / "C" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(UnreadableImageError, match="C/bad.png"):
        build_benchmark(DataConfig("notmnist", root=tmp_path))
    bench = build_benchmark(DataConfig("notmnist", root=tmp_path, skip_unreadable=True), image_size=28)
    assert bench.record()["skipped_unreadable"] == 1 and sum(len(t.train) for t in bench.tasks) == 30


def test_notmnist_read_from_the_zip_without_extracting(make, tmp_path):
    make.notmnist_zip(broken="notMNIST/Train/B/broken.png")
    with pytest.raises(UnreadableImageError, match="broken.png"):
        build_benchmark(DataConfig("notmnist", root=tmp_path))
    bench = build_benchmark(DataConfig("notmnist", root=tmp_path, skip_unreadable=True, num_tasks=1), image_size=28)
    assert sorted(bench.tasks[0].train.targets) == sorted(list(range(10)) * 2)
    assert len(bench.tasks[0].test) == 10 and bench.record()["skipped_unreadable"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notMNIST.zip"]  # nothing extracted


def test_cub_official_split_and_labels(make, tmp_path):
    root = make.cub(train_per_class=2, test_per_class=1)
    bench = build_benchmark(DataConfig("cub200", root=tmp_path, memory_budget_mb=0),
                            seed=42, image_size=16)  # file lists
    assert bench.num_classes == 200 and len(bench.tasks) == 10 and all(len(t.classes) == 20 for t in bench.tasks)
    assert bench.tasks[0].classes == sorted(class_order(200, 42)[:20])
    assert sum(len(t.train) for t in bench.tasks) == 400 and sum(len(t.test) for t in bench.tasks) == 200
    assert bench.class_names[0] == "001.Bird_0" and bench.source == str(root)
    task = bench.tasks[0]
    label = task.test.targets[0]
    assert task.test.images[0].name == f"{bench.class_names[label]}_2.jpg"  # is_training 0 -> test
    assert task.train[0][0].shape == (3, 16, 16)
    held = build_benchmark(DataConfig("cub200", root=tmp_path),
                           seed=42, image_size=16)  # small: decoded once, same data
    assert held.tasks[0].test.in_memory and not task.test.in_memory
    assert held.split_sha256() == bench.split_sha256()
    assert all(torch.equal(held.tasks[0].test.load(i), task.test.load(i)) for i in range(len(task.test)))


def test_cub_errors(make, tmp_path):
    root = make.cub(num_classes=200)
    (root / "images" / "005.Bird_4" / "005.Bird_4_0.jpg").unlink()
    with pytest.raises(DataLayoutError, match="1 images listed in .*images.txt are missing.*005.Bird_4_0.jpg"):
        build_benchmark(DataConfig("cub200", root=tmp_path))
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataLayoutError, match="train_test_split.txt is missing"):
        build_benchmark(DataConfig("cub200", root=tmp_path))


def test_cub_with_too_few_classes(make, tmp_path):
    make.cub(num_classes=3)
    with pytest.raises(DataLayoutError, match="found 3 classes, cub200 has 200"):
        build_benchmark(DataConfig("cub200", root=tmp_path))


def test_any_torchvision_dataset(make, tmp_path):
    data = make.mnist_like("MNIST/raw", compress=False)
    bench = build_benchmark(DataConfig("torchvision/MNIST", root=tmp_path, num_tasks=5), image_size=28, seed=5)
    assert bench.num_classes == 10 and bench.class_names[3] == "3 - three"
    assert sum(len(t.train) for t in bench.tasks) == 60
    task = bench.tasks[0]
    first = next(i for i, y in enumerate(data["t10k"][1]) if y in task.classes)
    assert torch.equal(task.test.load(0), torch.from_numpy(data["t10k"][0][first]).expand(3, -1, -1))
    assert task.test[0][0].shape == (3, 28, 28) and bench.record()["torchvision_class"] == "MNIST"
    with pytest.raises(DatasetNotFoundError, match="torchvision/KMNIST not found.*download=True"):
        build_benchmark(DataConfig("torchvision/KMNIST", root=tmp_path))
    with pytest.raises(ValueError, match="torchvision has no dataset 'Nope'; known: .*'CIFAR10'"):
        build_benchmark(DataConfig("torchvision/Nope", root=tmp_path))


def test_locate_prefers_the_explicit_root(make, tmp_path, monkeypatch):
    make.svhn()
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("NORGA_DATA", str(other))
    assert locate("svhn", tmp_path) == tmp_path / "svhn"
    with pytest.raises(ValueError, match="unknown data source 'svhm'"):
        locate("svhm", tmp_path)
    assert set(SOURCES) >= {"svhn", "notmnist", "cub200", "imagenet-r", "mnist"}
