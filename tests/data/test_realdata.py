"""Real data beside the checkout (never committed): Fashion-MNIST IDX under $NORGA_DATA and the CIFAR-10
JPEG folders under $NORGA_CIFAR10_JPG (.ci/run extracts them); skipped with the reason when absent."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from norga.config import DataConfig
from norga.data import build_benchmark, class_order

REAL = os.environ.get("NORGA_DATA")
CIFAR10_JPG = os.environ.get("NORGA_CIFAR10_JPG")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.realdata
@pytest.mark.skipif(not REAL or not (Path(REAL or "/") / "fashion-mnist").is_dir(),
                    reason="real Fashion-MNIST absent: set NORGA_DATA to ../shared/data")
def test_real_fashion_mnist_counts():
    bench = build_benchmark(DataConfig("fashion-mnist"), image_size=32, seed=42)
    assert bench.source == str(Path(REAL) / "fashion-mnist")
    assert [len(t.train) for t in bench.tasks] == [12000] * 5 and [len(t.test) for t in bench.tasks] == [2000] * 5
    assert np.bincount([y for t in bench.tasks for y in t.train.targets]).tolist() == [6000] * 10
    assert np.bincount([y for t in bench.tasks for y in t.test.targets]).tolist() == [1000] * 10
    order = class_order(10, 42)
    assert [t.classes for t in bench.tasks] == [sorted(order[2 * i : 2 * i + 2]) for i in range(5)]
    image, label = bench.tasks[0].test[0]
    assert image.shape == (3, 32, 32) and label in bench.tasks[0].classes


@pytest.mark.realdata
@pytest.mark.skipif(not CIFAR10_JPG or not (Path(CIFAR10_JPG or "/") / "train").is_dir(),
                    reason="CIFAR-10 JPEG folders absent: set NORGA_CIFAR10_JPG to the extracted cifar10-jpg.tar.gz "
                    "(.ci/run does)")
def test_real_cifar10_jpeg_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("NORGA_DATA", str(tmp_path))  # only the JPEG folders, not pickles elsewhere
    bench = build_benchmark(DataConfig("cifar10"), image_size=32, seed=42)
    assert bench.source == CIFAR10_JPG and bench.class_names == CIFAR10_CLASSES
    assert [len(t.train) for t in bench.tasks] == [10000] * 5 and [len(t.test) for t in bench.tasks] == [2000] * 5
    assert np.bincount([y for t in bench.tasks for y in t.train.targets]).tolist() == [5000] * 10
    assert np.bincount([y for t in bench.tasks for y in t.test.targets]).tolist() == [1000] * 10
    assert bench.tasks[0].train.in_memory and bench.tasks[0].train.images.shape[1:] == (3, 32, 32)
    assert bench.tasks[0].train_eval[0][0].shape == (3, 32, 32) and bench.record()["skipped_unreadable"] == 0


ARCHIVE = Path(REAL or "/") / "cifar10" / "cifar10-jpg.tar.gz"


@pytest.mark.realdata
@pytest.mark.skipif(not REAL or not ARCHIVE.is_file(), reason="real CIFAR-10 JPEG archive absent: set NORGA_DATA to "
                    "../shared/data (it holds cifar10/cifar10-jpg.tar.gz)")
def test_real_cifar10_read_from_its_archive(monkeypatch):
    monkeypatch.delenv("NORGA_CIFAR10_JPG", raising=False)
    bench = build_benchmark(DataConfig("cifar10"), image_size=32, seed=1)
    assert bench.source == str(ARCHIVE) and bench.class_names == CIFAR10_CLASSES
    assert [len(t.train) for t in bench.tasks] == [10000] * 5 and [len(t.test) for t in bench.tasks] == [2000] * 5
    assert [t.classes for t in bench.tasks] == [sorted(class_order(10, 1)[2 * i : 2 * i + 2]) for i in range(5)]
    assert np.bincount([y for t in bench.tasks for y in t.test.targets]).tolist() == [1000] * 10
    if CIFAR10_JPG and (Path(CIFAR10_JPG) / "test").is_dir():  # the same pixels as the extracted files
        from norga.data.decode import read_image
        from norga.data.sources import class_folder_files

        files, labels, _ = class_folder_files(Path(CIFAR10_JPG) / "test")
        task = bench.tasks[0]
        mine = [i for i, y in enumerate(labels) if y in task.classes]  # task order = file order within the task
        for position in np.random.default_rng().choice(len(mine), 50, replace=False):
            assert torch.equal(task.test.load(int(position)), read_image(files[mine[position]]))
            assert task.test.targets[position] == labels[mine[position]]
