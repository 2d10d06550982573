"""Versioned train/test split manifests for datasets without an official split (ImageNet-R).

A manifest is JSON: the class folders, the train and test file lists (relative paths, sorted), how they were
drawn (seed, train fraction, per-class) and `sha256` over that content, so a run records exactly which split
it used. The split is drawn deterministically from the sorted file list, so anyone with the same folder gets
the same manifest; files are only read, never moved or deleted (the official code moves them: pitfall P4).
`python -m norga.data.manifest` (norga/data/manifest.py) makes and verifies them from the command line.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

from norga.data.errors import DataLayoutError
from norga.data.sources import class_folder_files

FORMAT = "norga-split-manifest"
VERSION = 1


def _canonical(manifest: dict) -> bytes:
    keys = ("format", "version", "dataset", "seed", "train_fraction", "classes", "train", "test")
    return json.dumps({k: manifest[k] for k in keys}, sort_keys=True, separators=(",", ":")).encode()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's split content (classes, file lists, how they were drawn)."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def contents_sha256(folder: Path, files: list[str]) -> str:
    """sha256 over (path, sha256 of the file's bytes) for every file, in order: pins the pixels too."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256((folder / name).read_bytes()).digest())
    return digest.hexdigest()


def make_split_manifest(folder: str | Path, dataset: str, seed: int = 0, train_fraction: float = 0.8,
                        hash_contents: bool = False) -> dict:
    """Per class (sorted class folders, sorted files): shuffle with `random.Random(seed)` (one generator for
    all classes, in class order) and put the first round(n * train_fraction) files in train."""
    folder = Path(folder)
    files, labels, classes = class_folder_files(folder)
    rng = random.Random(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        members = [f.relative_to(folder).as_posix() for f, y in zip(files, labels) if y == label]
        rng.shuffle(members)
        cut = min(len(members) - 1, max(1, math.floor(len(members) * train_fraction + 0.5))) if len(members) > 1 else 1
        train += members[:cut]
        test += members[cut:]
    manifest = {"format": FORMAT, "version": VERSION, "dataset": dataset, "seed": seed,
                "train_fraction": train_fraction, "classes": classes, "train": sorted(train), "test": sorted(test)}
    manifest["sha256"] = manifest_sha256(manifest)
    if hash_contents:
        manifest["contents_sha256"] = contents_sha256(folder, manifest["train"] + manifest["test"])
    return manifest


def write_manifest(manifest: dict, path: str | Path) -> Path:
    """Write `manifest` (with its sha256) as JSON; refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: remove it or choose another --out")
    path.write_text(json.dumps({**manifest, "sha256": manifest_sha256(manifest)}, indent=1) + "\n")
    return path


def read_manifest(path: str | Path) -> dict:
    """A manifest from JSON, its format, version and sha256 checked."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataLayoutError(f"cannot read split manifest {path}: {error}") from error
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataLayoutError(f"{path} is not a version-{VERSION} {FORMAT} (format={manifest.get('format')!r}, "
                              f"version={manifest.get('version')!r}): regenerate it with python -m norga.data.manifest")
    if manifest.get("sha256") != manifest_sha256(manifest):
        raise DataLayoutError(f"{path}: sha256 does not match the file lists (edited or corrupted): regenerate it")
    return manifest


def verify_manifest(manifest: dict, folder: str | Path, contents: bool = False) -> None:
    """Every listed file exists under `folder` (and, with `contents`, the bytes hash to contents_sha256)."""
    folder = Path(folder)
    listed = manifest["train"] + manifest["test"]
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise DataLayoutError(f"{len(missing)} of {len(listed)} files of the {manifest['dataset']} split manifest are "
                              f"missing under {folder} (first: {missing[:3]}): point the data root at the complete, "
                              "untouched folder extracted from the archive")
    if set(manifest["train"]) & set(manifest["test"]):
        raise DataLayoutError(f"the {manifest['dataset']} split manifest lists files in both train and test")
    if contents:
        if "contents_sha256" not in manifest:
            raise DataLayoutError("this manifest has no contents_sha256: regenerate it with --hash-contents")
        if contents_sha256(folder, listed) != manifest["contents_sha256"]:
            raise DataLayoutError(f"the files under {folder} differ from those the manifest was made from")
