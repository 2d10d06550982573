"""Readers of image-file datasets: any ImageFolder tree (CIFAR-10 as JPEG folders too), CUB-200-2011 (its
official train_test_split.txt) and ImageNet-R (a versioned split manifest). A dataset whose decoded pixels fit
the memory budget is decoded once and held in memory, a larger one is decoded on access. Files are only read,
never moved."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from norga.data.datasets import ImageDataset, SourceData
from norga.data.decode import DEFAULT_READ, ReadOptions, decode_all, estimated_bytes, stack_if_uniform
from norga.data.errors import DataLayoutError
from norga.data.sources import class_folder_files
from norga.data.split_manifest import (
    make_split_manifest,
    manifest_sha256,
    read_manifest,
    verify_manifest,
)

IMAGENET_R_MANIFEST = "imagenet-r-split-v1.json"  # shipped as norga/manifests/<this> (package data)


def file_dataset(files: list[Path], labels: list[int], options: ReadOptions) -> ImageDataset:
    """Image files as a dataset: decoded once now when their pixels fit the memory budget, else on access (with
    `skip_unreadable`, every file is then decoded once now so undecodable ones are left out and counted)."""
    fits = options.memory_budget_mb > 0 and estimated_bytes(files) <= options.memory_budget_mb * 2**20
    if not (fits or options.skip_unreadable):
        return ImageDataset(files, labels)
    images, kept, skipped = decode_all(files, options.skip_unreadable)
    pixels = stack_if_uniform(images) if fits else [files[i] for i in kept]
    return ImageDataset(pixels, [labels[i] for i in kept], skipped=skipped)


def read_image_folder(root: Path, options: ReadOptions = DEFAULT_READ) -> tuple:
    """root/train/<class>/* and root/test/<class>/*; the same class folders in both, labels by sorted name."""
    train_files, train_labels, classes = class_folder_files(root / "train")
    test_names = sorted(p.name for p in (root / "test").iterdir() if p.is_dir()) if (root / "test").is_dir() else []
    if test_names and test_names != classes:
        raise DataLayoutError(f"{root}: train/ and test/ have different class folders: "
                              f"{sorted(set(classes) ^ set(test_names))}; make both hold the same classes")
    test_files, test_labels, _ = class_folder_files(root / "test", classes)
    return file_dataset(train_files, train_labels, options), file_dataset(test_files, test_labels, options), classes


def _cub_table(root: Path, name: str) -> list[list[str]]:
    path = root / name
    if not path.is_file():
        raise DataLayoutError(f"{path} is missing: CUB-200-2011 needs images.txt, image_class_labels.txt, "
                              "train_test_split.txt, classes.txt and images/ (extract CUB_200_2011.tgz whole)")
    return [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]


def read_cub(root: Path, options: ReadOptions = DEFAULT_READ) -> tuple:
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
            split = "train" if train else "test"
            raise DataLayoutError(f"{root / 'train_test_split.txt'} puts no image in the {split} split")
        splits.append(file_dataset([root / "images" / paths[i].strip() for i in ids], [labels[i] for i in ids], options))
    return splits[0], splits[1], classes


def shipped_manifest(name: str = IMAGENET_R_MANIFEST) -> Path | None:
    """The split manifest shipped with the package (norga/manifests/, package data), if this build has one."""
    path = resources.files("norga") / "manifests" / name
    return Path(str(path)) if path.is_file() else None


def read_imagenet_r(root: Path, options: ReadOptions = DEFAULT_READ) -> SourceData:
    """imagenet-r/<wnid>/*.jpg split by a manifest: `options.split_manifest`, else the shipped one, else the same
    deterministic 80/20 split generated from the folder (its sha256 is recorded either way)."""
    manifest_path = options.split_manifest or shipped_manifest()
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
        splits.append(file_dataset([root / f for f in files], [index[f.split("/")[0]] for f in files], options))
    record = {"source": source, "version": manifest["version"], "sha256": manifest_sha256(manifest)}
    return SourceData(splits[0], splits[1], manifest["classes"], {"split_manifest": record})
