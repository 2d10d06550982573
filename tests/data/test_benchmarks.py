"""Benchmarks from generated on-disk fixtures (IDX, CIFAR pickles, image folders): class order, task split,
transforms, data-root search, subsampling, and the error paths."""

import dataclasses
from pathlib import Path

import pytest
import torch

from norga.config import DataConfig
from norga.data import (
    SOURCES,
    DataLayoutError,
    DatasetNotFoundError,
    UnreadableImageError,
    build_benchmark,
    class_order,
    known_benchmarks,
    split_into_tasks,
)
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


def test_fashion_mnist_from_idx_files(make, tmp_path):
    data = make.mnist_like("fashion-mnist")
    bench = build_benchmark(DataConfig("fashion-mnist", root=tmp_path), seed=3, image_size=32)
    assert bench.num_classes == 10 and len(bench.tasks) == 5
    order = class_order(10, 3)
    for index, task in enumerate(bench.tasks):
        assert task.classes == sorted(order[2 * index : 2 * index + 2])
        assert sorted(set(task.train.targets)) == task.classes and len(task.train) == 12 and len(task.test) == 6
        image, label = task.train_eval[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label in task.classes
        assert torch.equal(image[0], image[1])  # greyscale became RGB
    # the raw pixels survive: the first test image of task 0 is the IDX file's first image of those classes
    task = bench.tasks[0]
    raw_index = next(i for i, y in enumerate(data["t10k"][1]) if y in task.classes)
    raw = torch.from_numpy(data["t10k"][0][raw_index])
    assert torch.equal(task.test.load(0), raw.expand(3, -1, -1))
    _, test_tf = build_transforms(32, (0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(task.test[0][0], test_tf(raw.expand(3, -1, -1)))
    assert bench.class_names[0] == "T-shirt/top" and bench.class_to_task[task.classes[0]] == 0


def test_mnist_from_uncompressed_idx(make, tmp_path):
    data = make.mnist_like("mnist", compress=False)
    bench = build_benchmark(DataConfig("mnist", root=tmp_path, num_tasks=2), image_size=28)
    assert [len(t.classes) for t in bench.tasks] == [5, 5]
    assert sum(len(t.train) for t in bench.tasks) == len(data["train"][1])
    all_targets = sorted(y for t in bench.tasks for y in t.test.targets)
    assert all_targets == sorted(data["t10k"][1].tolist())


def test_train_per_class_subsample_is_seeded(make, tmp_path):
    make.mnist_like("fashion-mnist", train_per_class=10)
    data = DataConfig("fashion-mnist", root=tmp_path, train_per_class=4, test_per_class=2)
    a, b, c = (build_benchmark(data, seed=seed, image_size=32) for seed in (1, 1, 2))
    assert all(len(t.train) == 8 and len(t.test) == 4 for t in a.tasks)
    assert all(torch.equal(a.tasks[0].train.load(i), b.tasks[0].train.load(i)) for i in range(8))
    assert a.record()["train_per_class"] == 4 and a.record()["split_sha256"] == b.record()["split_sha256"]
    assert a.record()["split_sha256"] != c.record()["split_sha256"]


def test_cifar100_pickles_split_into_ten_tasks(make, tmp_path):
    make.cifar100()
    bench = build_benchmark(DataConfig("cifar100", root=tmp_path), seed=42, image_size=32)
    assert bench.tasks[0].classes == [1, 9, 15, 41, 42, 50, 65, 70, 78, 91]
    assert all(len(t.train) == 20 and len(t.test) == 10 for t in bench.tasks)
    assert bench.class_to_task[1] == 0 and bench.class_names[1] == "c1"
    assert sorted(c for t in bench.tasks for c in t.classes) == list(range(100))


def test_numpys_pcg64_class_order_splits_cifar100_as_vpt_nsp_does(make, tmp_path):
    """``data.class_order: pcg64``: VPT-NSP²'s official first task of seed 2024 (spec §6.3)."""
    make.cifar100()
    bench = build_benchmark(DataConfig("cifar100", root=tmp_path, class_order="pcg64"), seed=2024, image_size=32)
    assert bench.tasks[0].classes == sorted([55, 17, 75, 11, 2, 29, 49, 48, 41, 45])
    assert bench.class_order[:10] == [55, 17, 75, 11, 2, 29, 49, 48, 41, 45]


def test_cifar10_pickles_keep_pixels_and_labels(make, tmp_path):
    data = make.cifar10()
    bench = build_benchmark(DataConfig("cifar10", root=tmp_path), seed=7, image_size=32)
    assert len(bench.tasks) == 5 and bench.class_names == [f"k{i}" for i in range(10)]
    assert sum(len(t.train) for t in bench.tasks) == 5 * 40 and sum(len(t.test) for t in bench.tasks) == 20
    pixels, labels = data["test_batch"]
    task = bench.tasks[2]
    first = next(i for i, y in enumerate(labels) if y in task.classes)
    assert task.test.targets[0] == labels[first]
    assert torch.equal(task.test.load(0), torch.from_numpy(pixels[first].reshape(3, 32, 32)))


def test_task_views_share_images_and_order(make, tmp_path):
    make.cifar10()
    task = build_benchmark(DataConfig("cifar10", root=tmp_path), image_size=16).tasks[0]
    assert task.train_eval.targets == task.train.targets
    plain = task.train_with(None)
    assert plain.targets == task.train.targets and plain[3][0].dtype == torch.uint8
    assert torch.equal(plain[3][0], task.train_eval.load(3))
    assert torch.equal(task.test_with(None)[0][0], task.test.load(0))


def test_image_folder_and_its_errors(make, tmp_path):
    make.image_folder()
    bench = build_benchmark(DataConfig("imagefolder", root=tmp_path, num_tasks=2), image_size=16)
    assert bench.num_classes == 4 and [len(t.classes) for t in bench.tasks] == [2, 2]
    assert bench.tasks[1].train[0][0].shape == (3, 16, 16) and bench.class_names == ["a", "b", "c", "d"]
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UnreadableImageError, match="broken.png.*data.skip_unreadable=true"):  # decoded into memory now
        build_benchmark(DataConfig("imagefolder", root=tmp_path, num_tasks=2), image_size=16)
    lazy = build_benchmark(DataConfig("imagefolder", root=tmp_path, num_tasks=2, memory_budget_mb=0), image_size=16)
    task = next(t for t in lazy.tasks if 0 in t.classes)
    assert not task.train.in_memory
    with pytest.raises(UnreadableImageError, match="broken.png"):  # decoded on access
        [task.train[i] for i in range(len(task.train))]
    skipping = build_benchmark(DataConfig("imagefolder", root=tmp_path, num_tasks=2, skip_unreadable=True),
                               image_size=16)
    assert skipping.record()["skipped_unreadable"] == 1 and skipping.record()["skipped_files"][0].endswith("broken.png")
    assert sum(len(t.train) for t in skipping.tasks) == 12
    (tmp_path / "test" / "e").mkdir()
    with pytest.raises(DataLayoutError, match="different class folders: \\['e'\\]"):
        build_benchmark(DataConfig("imagefolder", root=tmp_path, num_tasks=2))


def test_image_folder_missing_or_empty_class_folder(make, tmp_path):
    make.image_folder()
    for f in (tmp_path / "test" / "c").iterdir():
        f.unlink()
    with pytest.raises(DataLayoutError, match="test/c holds no images"):
        build_benchmark(DataConfig("imagefolder", root=tmp_path))
    (tmp_path / "test" / "c").rmdir()
    with pytest.raises(DataLayoutError, match="different class folders: \\['c'\\]"):
        build_benchmark(DataConfig("imagefolder", root=tmp_path))


def test_cifar10_jpeg_folder_with_a_class_missing(make, tmp_path):
    classes = [f"k{i}" for i in range(9)]
    make.image_folder(tmp_path / "cifar10-jpg", classes=classes, per_class=1, size=(32, 32))
    with pytest.raises(DataLayoutError, match="found 9 classes, cifar10 has 10"):
        build_benchmark(DataConfig("cifar10", root=tmp_path))


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NORGA_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match=f"looked in: {tmp_path}/cifar-100-python.*Expected layout.*download"):
        build_benchmark(DataConfig("cifar100", root=tmp_path))
    monkeypatch.setenv("NORGA_DOWNLOADS", str(tmp_path / "downloads"))  # searched last: where downloads went
    with pytest.raises(DatasetNotFoundError, match=f"looked in: {tmp_path}/downloads/cifar-100-python. No data root "
                                                   "is set.*NORGA_DATA=DIR or --set data.root=DIR"):
        build_benchmark(DataConfig("cifar100"))
    with pytest.raises(DatasetNotFoundError, match="imagefolder not found; looked in: nowhere"):
        build_benchmark(DataConfig("imagefolder"))  # nothing to download, so not looked for in the download folder
    with pytest.raises(ValueError, match="unknown benchmark 'cifar1000'; known: .*'5-datasets'.*'imagenet-r'"):
        build_benchmark(DataConfig("cifar1000", root=tmp_path))
    expected = {"cifar100", "cifar10", "imagenet-r", "cub200", "5-datasets", "fashion-mnist", "imagefolder"}
    assert expected <= set(known_benchmarks())


def test_failed_download_gives_one_clear_error(tmp_path, monkeypatch):
    def offline(root):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.delenv("NORGA_DATA", raising=False)
    monkeypatch.setitem(SOURCES, "cub200", dataclasses.replace(SOURCES["cub200"], download=offline))
    with pytest.raises(DatasetNotFoundError, match="cub200 not found.*download into .* failed.*no network access"):
        build_benchmark(DataConfig("cub200", root=tmp_path, download=True))


def test_data_root_comes_from_the_environment(make, tmp_path, monkeypatch):
    make.mnist_like("fashion-mnist")
    monkeypatch.setenv("NORGA_DATA", str(tmp_path))
    assert build_benchmark(DataConfig("fashion-mnist"), image_size=32).source == str(tmp_path / "fashion-mnist")
    # an explicit root (that exists) without the data falls back to $NORGA_DATA; one that does not is an error
    (tmp_path / "elsewhere").mkdir()
    assert build_benchmark(DataConfig("fashion-mnist", root=tmp_path / "elsewhere"), image_size=32).source == str(
        tmp_path / "fashion-mnist")


def test_fashion_mnist_found_in_the_debian_package_place(make, tmp_path, monkeypatch):
    assert SOURCES["fashion-mnist"].fixed_places == (Path("/usr/share/datasets/fashion-mnist"),)
    make.mnist_like("debian")
    monkeypatch.delenv("NORGA_DATA", raising=False)
    debian = dataclasses.replace(SOURCES["fashion-mnist"], fixed_places=(tmp_path / "debian",))
    monkeypatch.setitem(SOURCES, "fashion-mnist", debian)
    (tmp_path / "empty").mkdir()
    assert build_benchmark(DataConfig("fashion-mnist", root=tmp_path / "empty"),
                           image_size=28).source == str(tmp_path / "debian")


def test_truncated_idx_file_is_a_clear_error(make, tmp_path):
    make.mnist_like("mnist", compress=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataLayoutError, match="train-images-idx3-ubyte is truncated"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_custom_transforms_replace_the_official_ones(make, tmp_path):
    make.cifar10()
    bench = build_benchmark(DataConfig("cifar10", root=tmp_path),
                            train_transform=lambda x: x.float().mean(), test_transform=lambda x: x.shape)
    assert bench.tasks[0].train[0][0].ndim == 0 and bench.tasks[0].test[0][0] == (3, 32, 32)
    assert bench.record()["custom_transforms"] is True


def test_every_data_error_shares_one_base():
    from norga import data

    for error in (DatasetNotFoundError, DataLayoutError, UnreadableImageError):
        assert issubclass(error, data.DataError)
    assert issubclass(DatasetNotFoundError, FileNotFoundError) and issubclass(DataLayoutError, ValueError)
    assert all(hasattr(data, name) for name in data.__all__)


@pytest.mark.parametrize(("name", "archive"), [("cub200", "CUB_200_2011.tgz"), ("imagenet-r", "imagenet-r.tar")])
def test_archive_downloads_are_md5_verified(name, archive, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from norga.data import registry

    calls = []
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", lambda url, root, md5=None: calls.append((url, md5)))
    SOURCES[name].download(tmp_path)
    expected = {"cub200": registry.CUB_MD5, "imagenet-r": registry.IMAGENET_R_MD5}[name]
    assert calls == [(calls[0][0], expected)] and calls[0][0].endswith(archive) and len(expected) == 32


def test_options_that_do_not_fit_the_benchmark_are_one_kind_of_data_error(make, tmp_path):
    from norga.cli import user_errors
    from norga.data import BenchmarkOptionError, DataError

    make.mnist_like("fashion-mnist")
    with pytest.raises(BenchmarkOptionError, match="cannot split 10 classes into 20 tasks.*data.num_tasks=N.*1 to 10"):
        build_benchmark(DataConfig("fashion-mnist", root=tmp_path, num_tasks=20))
    with pytest.raises(BenchmarkOptionError, match="unknown normalization"):
        build_benchmark(DataConfig("fashion-mnist", root=tmp_path, normalization="imagenet"))
    assert issubclass(BenchmarkOptionError, DataError) and DataError in user_errors()  # one line on the CLI


def test_the_docs_data_table_lists_real_benchmarks():
    import re

    page = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "data.md").read_text()
    table = page[page.index("| `data.benchmark`"):].split("\n\n")[0].splitlines()[2:]
    names = [name for row in table for name in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert {name for name in names if not name.startswith("torchvision/")} == set(SOURCES) | {"5-datasets"}


@pytest.mark.parametrize("rule", ["numpy", "none"])
def test_the_class_order_rule_and_unnormalised_pixels_reach_the_benchmark(make, tmp_path, rule):
    data = make.mnist_like("fashion-mnist")
    config = DataConfig("fashion-mnist", root=tmp_path, normalization="none", class_order=rule)
    bench = build_benchmark(config, seed=3, image_size=32)
    order = class_order(10, 3, rule=rule)
    assert order != class_order(10, 3) and bench.class_order == order
    assert [task.classes for task in bench.tasks] == [sorted(order[2 * i : 2 * i + 2]) for i in range(5)]
    task = bench.tasks[0]
    raw_index = next(i for i, y in enumerate(data["t10k"][1]) if y in task.classes)
    raw = torch.from_numpy(data["t10k"][0][raw_index]).expand(3, -1, -1)
    unnormalised = build_transforms(32, (0.5,) * 3, (0.5,) * 3, "none")[1](raw)  # the backbone's mean/std ignored
    assert torch.allclose(task.test[0][0], unnormalised) and unnormalised.min() >= 0 and unnormalised.max() <= 1
