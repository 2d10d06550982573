"""Class folders read straight from an archive (CIFAR-10 as a JPEG .tar.gz): same data as the extracted folders,
nothing extracted, bad members named or skipped, broken archives reported."""

import tarfile

import pytest
import torch

from norga.config import DataConfig
from norga.data import DataLayoutError, UnreadableImageError, build_benchmark

CLASSES = [f"k{i}" for i in range(10)]


def pack(folder, archive, prefix=""):
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*"), reverse=True):  # archive order is not the order norga reads
            if path.is_file():
                tar.add(path, arcname=prefix + str(path.relative_to(folder)))
    return archive


@pytest.fixture
def cifar_archive(make, tmp_path, monkeypatch):
    monkeypatch.delenv("NORGA_DATA", raising=False)
    monkeypatch.delenv("NORGA_CIFAR10_JPG", raising=False)  # (.ci/run sets both: real data must not answer here)
    folder = make.image_folder(tmp_path / "extracted" / "cifar10-jpg", classes=CLASSES, per_class=2, size=(32, 32))
    (tmp_path / "root" / "cifar10").mkdir(parents=True)
    return folder, pack(folder, tmp_path / "root" / "cifar10" / "cifar10-jpg.tar.gz", prefix="./")


def test_cifar10_from_its_archive_equals_the_extracted_folders(cifar_archive, tmp_path):
    folder, archive = cifar_archive
    packed = build_benchmark(DataConfig("cifar10", root=tmp_path / "root"), seed=3, image_size=16)
    extracted = build_benchmark(DataConfig("cifar10", root=tmp_path / "extracted"), seed=3, image_size=16)
    assert packed.source == str(archive) and extracted.source == str(folder)
    assert packed.class_names == CLASSES and packed.split_sha256() == extracted.split_sha256()
    for ours, theirs in zip(packed.tasks, extracted.tasks):
        assert ours.train.in_memory and torch.equal(ours.train.images, theirs.train.images)
        assert torch.equal(ours.test.images, theirs.test.images)
    assert sorted(p.name for p in archive.parent.iterdir()) == ["cifar10-jpg.tar.gz"]  # nothing extracted


def test_a_bad_member_is_named_or_skipped(cifar_archive, tmp_path):
    folder, archive = cifar_archive
    (folder / "train" / "k3" / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    archive.unlink()
    pack(folder, archive)
    with pytest.raises(UnreadableImageError, match="cifar10-jpg.tar.gz:train/k3/bad.jpg"):
        build_benchmark(DataConfig("cifar10", root=tmp_path / "root"))
    bench = build_benchmark(DataConfig("cifar10", root=tmp_path / "root", skip_unreadable=True), image_size=16)
    assert bench.record()["skipped_unreadable"] == 1 and bench.record()["train_images"] == 20


def test_broken_or_incomplete_archives(cifar_archive, tmp_path):
    folder, archive = cifar_archive
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataLayoutError, match="cannot read the archive .*cifar10-jpg.tar.gz.*download it again"):
        build_benchmark(DataConfig("cifar10", root=tmp_path / "root"))
    for path in (folder / "test" / "k7").iterdir():
        path.unlink()
    (folder / "test" / "k7").rmdir()
    pack(folder, archive)
    with pytest.raises(DataLayoutError, match="train/ and test/ hold different class folders: \\['k7'\\]"):
        build_benchmark(DataConfig("cifar10", root=tmp_path / "root"))


def test_the_given_root_comes_before_the_cifar10_jpg_variable(cifar_archive, tmp_path, monkeypatch):
    folder, archive = cifar_archive
    monkeypatch.setenv("NORGA_CIFAR10_JPG", str(folder))
    assert build_benchmark(DataConfig("cifar10", root=tmp_path / "root"), image_size=16).source == str(archive)
    (tmp_path / "elsewhere").mkdir()
    assert build_benchmark(DataConfig("cifar10", root=tmp_path / "elsewhere"), image_size=16).source == str(folder)
