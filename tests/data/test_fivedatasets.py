"""5-Datasets: seeded dataset order, label offsets, per-dataset transforms and the P6 carry-over switch."""

import random

import pytest
import torch

from norga.config import DataConfig
from norga.data import build_benchmark, dataset_order
from norga.data.fivedatasets import OFFICIAL_ORDER, cifar_style_flags

CIFAR100_MEAN0, CIFAR100_STD0 = 0.5071, 0.2675


def test_order_for_seed_42_is_the_official_one():
    assert dataset_order(42) == ["NotMNIST", "MNIST", "CIFAR10", "FashionMNIST", "SVHN"]
    seed = random.randrange(1000)
    random.seed(seed)
    expected = list(OFFICIAL_ORDER)
    random.shuffle(expected)
    assert dataset_order(seed) == expected


def test_carryover_flags():
    order = ["NotMNIST", "MNIST", "CIFAR10", "FashionMNIST", "SVHN"]
    assert cifar_style_flags(order, False) == [False, False, True, False, False]
    assert cifar_style_flags(order, True) == [False, False, True, True, True]


@pytest.fixture
def five_root(make, tmp_path):
    make.svhn(train_per_class=2, test_per_class=1)
    make.mnist_like("mnist", train_per_class=2, test_per_class=1)
    make.mnist_like("fashion-mnist", train_per_class=3, test_per_class=1)
    make.cifar10(train_per_class=1, test_per_class=1)
    make.notmnist(per_class=(2, 1))
    return tmp_path


def test_five_datasets_tasks_and_label_offsets(five_root):
    bench = build_benchmark(DataConfig("5-datasets", root=five_root), seed=42, image_size=16)
    assert bench.num_classes == 50 and len(bench.tasks) == 5
    assert bench.record()["dataset_order"] == ["NotMNIST", "MNIST", "CIFAR10", "FashionMNIST", "SVHN"]
    train_sizes = {"NotMNIST": 20, "MNIST": 20, "CIFAR10": 50, "FashionMNIST": 30, "SVHN": 20}
    for index, (task, name) in enumerate(zip(bench.tasks, bench.record()["dataset_order"])):
        assert task.classes == list(range(10 * index, 10 * index + 10))
        assert sorted(set(task.train.targets)) == task.classes and sorted(set(task.test.targets)) == task.classes
        assert len(task.train) == train_sizes[name]
        assert task.test[0][0].shape == (3, 16, 16)
    assert bench.class_to_task == [i // 10 for i in range(50)]
    assert bench.class_names[0] == "NotMNIST:A" and bench.class_names[49] == "SVHN:9"
    notmnist, mnist, cifar = (bench.tasks[i].train.load(0) for i in range(3))
    assert notmnist.shape == (3, 28, 28) and torch.equal(notmnist[0], notmnist[1])  # letters: grey -> RGB
    assert mnist.shape == (3, 28, 28) and torch.equal(mnist[1], mnist[2])
    assert cifar.shape == (3, 32, 32)
    assert bench.record()["compat"]["fiveds_transform_carryover"] is False
    assert set(bench.record()["sources"]) == set(OFFICIAL_ORDER)


def white_pixel_after_test_transform(task):
    """Test-transform output of an all-white image: 1.0 without normalisation, CIFAR-100 stats with it."""
    return task.test.transform(torch.full((3, 32, 32), 255, dtype=torch.uint8))[0, 0, 0].item()


@pytest.mark.parametrize("carryover", [False, True])
def test_each_dataset_has_its_own_transform_unless_carryover(five_root, carryover):
    data = DataConfig("5-datasets", root=five_root, normalization="official", fiveds_transform_carryover=carryover)
    bench = build_benchmark(data, seed=42, image_size=16)
    cifar_value = pytest.approx((1 - CIFAR100_MEAN0) / CIFAR100_STD0, rel=1e-4)
    values = [white_pixel_after_test_transform(t) for t in bench.tasks]
    # order NotMNIST, MNIST, CIFAR10, FashionMNIST, SVHN
    assert values[:3] == [pytest.approx(1.0), pytest.approx(1.0), cifar_value]
    if carryover:
        assert values[3:] == [cifar_value, cifar_value]
    else:
        assert values[3:] == [pytest.approx(1.0), pytest.approx(1.0)]
    jitter = [any(type(t).__name__ == "ColorJitter" for t in task.train.transform.transforms) for task in bench.tasks]
    assert jitter == [False, False, True, carryover, carryover]
    assert bench.record()["compat"]["fiveds_transform_carryover"] is carryover


def test_five_datasets_errors(five_root):
    with pytest.raises(ValueError, match="5-datasets has exactly 5 tasks"):
        build_benchmark(DataConfig("5-datasets", root=five_root, num_tasks=10))
    with pytest.raises(ValueError, match="fiveds_transform_carryover only applies to the 5-datasets"):
        build_benchmark(DataConfig("cifar10", root=five_root, fiveds_transform_carryover=True))
