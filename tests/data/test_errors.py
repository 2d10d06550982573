"""The data errors a user meets, each naming the problem (file or folder) and the fix."""

import gzip
import json
import pickle

import numpy as np
import pytest

from norga.config import DataConfig
from norga.data import (
    DataLayoutError,
    DatasetNotFoundError,
    build_benchmark,
    make_split_manifest,
    read_manifest,
    write_manifest,
)


@pytest.fixture
def mnist(make, tmp_path):
    return make.mnist_like("mnist", train_per_class=4, test_per_class=2)


def test_an_empty_split(make, tmp_path):
    make.mnist_like("mnist", test_per_class=0)
    with pytest.raises(DataLayoutError, match=f"{tmp_path}/mnist: the test split is empty"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_a_class_without_training_images(make, mnist, tmp_path):
    labels = mnist["train"][1].copy()
    labels[labels == 9] = 8
    make.relabel_idx("mnist", "train", labels)
    with pytest.raises(DataLayoutError, match="no training images for classes \\[9\\] \\(1 of 10\\); the data is"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_a_task_without_test_images(make, mnist, tmp_path):
    make.relabel_idx("mnist", "t10k", np.zeros_like(mnist["t10k"][1]))
    with pytest.raises(DataLayoutError, match="no test images for the classes of task \\d+"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_labels_out_of_range(make, mnist, tmp_path):
    labels = mnist["train"][1].copy()
    labels[0] = 12
    make.relabel_idx("mnist", "train", labels)
    with pytest.raises(DataLayoutError, match="train labels out of range \\[0, 10\\): 12"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_images_and_labels_of_different_counts(make, mnist, tmp_path):
    make.relabel_idx("mnist", "t10k", mnist["t10k"][1][:-1])
    with pytest.raises(DataLayoutError, match=f"{tmp_path}/mnist: 20 t10k images but 19 labels; re-download the IDX files"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_not_an_idx_file(mnist, tmp_path):
    with gzip.open(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"<html>a download error page</html>")
    with pytest.raises(DataLayoutError, match="train-images-idx3-ubyte.gz is not an unsigned-byte IDX file"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_cub_tables_that_disagree(make, tmp_path):
    root = make.cub(num_classes=200)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataLayoutError, match="list different image ids; restore them from CUB_200_2011.tgz"):
        build_benchmark(DataConfig("cub200", root=tmp_path))


def test_manifests_of_another_format_or_with_overlapping_splits(make, tmp_path):
    root = make.imagenet_r(num_classes=2, per_class=4)
    manifest = make_split_manifest(root, "imagenet-r")
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**manifest, "version": 0}))
    with pytest.raises(DataLayoutError, match="old.json is not a version-1 norga-split-manifest.*regenerate it"):
        read_manifest(path)
    overlapping = {**manifest, "test": [*manifest["test"], manifest["train"][0]]}
    path = write_manifest(overlapping, tmp_path / "overlap.json")
    with pytest.raises(DataLayoutError, match="lists files in both train and test"):
        build_benchmark(DataConfig("imagenet-r", root=tmp_path, split_manifest=path, num_tasks=2, memory_budget_mb=0),
                        image_size=8)


class _RunsCode:
    """What a crafted pickle holds: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_crafted_cifar_batch_file_that_would_run_code_is_refused(make, tmp_path):
    make.cifar10()
    marker = tmp_path / "code-ran"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": _RunsCode(f"touch {marker}")}))
    with pytest.raises(DataLayoutError, match="refusing to read .*data_batch_3: it refers to posix.system, which no "
                                              "CIFAR batch file holds"):
        build_benchmark(DataConfig("cifar10", root=tmp_path))
    assert not marker.exists()


def test_a_cifar_batch_file_written_by_python_2_reads(make, tmp_path):
    """The real files are protocol-2 pickles (str keys, bytes as latin-1 text, one uint8 array)."""
    make.cifar10()
    folder = tmp_path / "cifar-10-batches-py"
    entry = {"batch_label": b"training batch 1 of 5", "labels": list(range(10)) * 4,
             "data": np.random.randint(0, 256, (40, 3072), dtype=np.uint8), "filenames": [b"x.png"] * 40}
    (folder / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=2))
    bench = build_benchmark(DataConfig("cifar10", root=tmp_path, num_tasks=5))
    assert sum(len(task.train) for task in bench.tasks) == 5 * 40


def test_a_truncated_gz_file_is_named(mnist, tmp_path):
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataLayoutError, match=f"{path} is truncated or not gzip data"):
        build_benchmark(DataConfig("mnist", root=tmp_path))


def test_an_explicit_data_root_that_does_not_exist_is_an_error(mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("NORGA_DATA", str(tmp_path))  # which holds the data: no silent fallback to it
    with pytest.raises(DatasetNotFoundError, match=f"data root {tmp_path / 'nowhere'} does not exist"):
        build_benchmark(DataConfig("mnist", root=tmp_path / "nowhere"))
    assert len(build_benchmark(DataConfig("mnist")).tasks) == 5  # unset, $NORGA_DATA is read
