"""Readers of large image-file datasets, decoded on access: any ImageFolder tree, CUB-200-2011 (its official
train_test_split.txt) and ImageNet-R (a versioned split manifest). Files are only read, never moved."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from norga.data.datasets import ImageDataset, SourceData, decode_all
from norga.data.errors import DataLayoutError
from norga.data.manifest import (
    make_split_manifest,
    manifest_sha256,
    read_manifest,
    verify_manifest,
)
from norga.data.sources import class_folder_files

IMAGENET_R_MANIFEST = "imagenet-r-split-v1.json"  # shipped as norga/manifests/<this> (package data)


def _checked(files: list[Path], labels: list[int], skip_unreadable: bool) -> ImageDataset:
    """Files decoded lazily; with `skip_unreadable` every file is decoded once now and bad ones dropped."""
    if not skip_unreadable:
        return ImageDataset(files, labels)
    _, kept, skipped = decode_all(files, skip_unreadable=True)
    return ImageDataset([files[i] for i in kept], [labels[i] for i in kept], skipped=skipped)


def read_image_folder(root: Path, in_memory: bool = False, skip_unreadable: bool = False) -> tuple:
    """root/train/<class>/* and root/test/<class>/*; the same class folders in both, labels by sorted name."""
    if in_memory:
        from norga.data.sources import read_class_folders_in_memory

        return read_class_folders_in_memory(root, skip_unreadable=skip_unreadable)
    train_files, train_labels, classes = class_folder_files(root / "train")
    test_names = sorted(p.name for p in (root / "test").iterdir() if p.is_dir()) if (root / "test").is_dir() else []
    if test_names and test_names != classes:
        raise DataLayoutError(f"{root}: train/ and test/ have different class folders: "
                              f"{sorted(set(classes) ^ set(test_names))}; make both hold the same classes")
    test_files, test_labels, _ = class_folder_files(root / "test", classes)
    return _checked(train_files, train_labels, skip_unreadable), _checked(test_files, test_labels, skip_unreadable), classes


def _cub_table(root: Path, name: str) -> list[list[str]]:
    path = root / name
    if not path.is_file():
        raise DataLayoutError(f"{path} is missing: CUB-200-2011 needs images.txt, image_class_labels.txt, "
                              "train_test_split.txt, classes.txt and images/ (extract CUB_200_2011.tgz whole)")
    return [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]


def read_cub(root: Path, skip_unreadable: bool = False) -> tuple:
    """CUB_200_2011/: images.txt (id path), image_class_labels.txt (id class 1..200), train_test_split.txt
    (id is_training), classes.txt (id name); labels become 0..199."""
    paths = dict(_cub_table(root, "images.txt"))
    labels = {i: int(c) - 1 for i, c in _cub_table(root, "image_class_labels.txt")}
    is_train = {i: flag.strip() == "1" for i, flag in _cub_table(root, "train_test_split.txt")}
    classes = [name.strip() for _, name in sorted(_cub_table(root, "classes.txt"), key=lambda row: int(row[0]))]
    if set(paths) != set(labels) or set(paths) != set(is_train):
        raise DataLayoutError(f"{root}: images.txt, image_class_labels.txt and train_test_split.txt list different "
                              "image ids; restore them from CUB_200_2011.tgz")
    missing = [paths[i] for i in paths if not (root / "images" / paths[i].strip()).is_file()]
    if missing:
        raise DataLayoutError(f"{len(missing)} images listed in {root / 'images.txt'} are missing under "
                              f"{root / 'images'} (first: {missing[:3]}); extract CUB_200_2011.tgz whole")
    splits = []
    for train in (True, False):
        ids = sorted((i for i in paths if is_train[i] == train), key=int)
        if not ids:
            raise DataLayoutError(f"{root / 'train_test_split.txt'} puts no image in the {'train' if train else 'test'} split")
        splits.append(_checked([root / "images" / paths[i].strip() for i in ids], [labels[i] for i in ids], skip_unreadable))
    return splits[0], splits[1], classes


def shipped_manifest(name: str = IMAGENET_R_MANIFEST) -> Path | None:
    """The split manifest shipped with the package, if this build has one."""
    path = resources.files("norga") / "manifests" / name
    return Path(str(path)) if path.is_file() else None


def read_imagenet_r(root: Path, manifest_path: str | Path | None = None, skip_unreadable: bool = False) -> tuple:
    """imagenet-r/<wnid>/*.jpg split by a manifest: `manifest_path`, else the shipped one, else the same
    deterministic 80/20 split generated from the folder (its sha256 is recorded either way)."""
    manifest_path = manifest_path or shipped_manifest()
    if manifest_path is not None:
        manifest = read_manifest(manifest_path)
        source = str(manifest_path)
    else:
        manifest = make_split_manifest(root, "imagenet-r")
        source = "generated from the folder (seed 0, 80/20 per class)"
    verify_manifest(manifest, root)
    index = {name: label for label, name in enumerate(manifest["classes"])}
    splits = []
    for split in ("train", "test"):
        files = manifest[split]
        if not files:
            raise DataLayoutError(f"the ImageNet-R split manifest ({source}) has an empty {split} list")
        splits.append(_checked([root / f for f in files], [index[f.split("/")[0]] for f in files], skip_unreadable))
    record = {"source": source, "version": manifest["version"], "sha256": manifest_sha256(manifest)}
    return SourceData(splits[0], splits[1], manifest["classes"], {"split_manifest": record})
