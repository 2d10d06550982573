"""Class folders inside an archive (``[prefix/]train/<class>/*.jpg`` and ``test/<class>/*.jpg`` in a .tar, .tar.gz,
.tgz or .zip), read and decoded straight into memory without extracting anything: e.g. CIFAR-10 as a JPEG
archive, notMNIST's zip. Same images, labels and order as the extracted folders give."""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from norga.data.datasets import ImageDataset
from norga.data.decode import DEFAULT_READ, IMAGE_SUFFIXES, ReadOptions, decode_buffers, stack_if_uniform
from norga.data.errors import DataLayoutError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file in the archive, in archive order."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir():
                        yield info.filename, archive.read(info)
            return
        with tarfile.open(path) as archive:  # streams: a .tar.gz is decompressed once, front to back
            for member in archive:
                if member.isfile():
                    yield member.name, archive.extractfile(member).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataLayoutError(f"cannot read the archive {path}: {error}; download it again") from error


def _members_by_class(path: Path, splits: Sequence[str]) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    """split -> class -> [(member, bytes)] for image members at ``[...]/<split>/<class>/<file>``."""
    found: dict[str, dict[str, list[tuple[str, bytes]]]] = {split: {} for split in splits}
    wanted = {split.lower(): split for split in splits}
    for name, data in archive_files(path):
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3].lower() in wanted and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
            found[wanted[parts[-3].lower()]].setdefault(parts[-2], []).append((name, data))
    return found


def read_class_archive(path: Path, options: ReadOptions = DEFAULT_READ, splits: Sequence[str] = ("train", "test"),
                       classes: Sequence[str] | None = None) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """(train, test, class names) from the archive's class folders; labels by sorted class name (or position in
    `classes`), files in name order within a class, as `read_image_folder` on the extracted archive."""
    found = _members_by_class(path, splits)
    names = list(classes) if classes is not None else sorted(found[splits[0]])
    datasets = []
    for split in splits:
        if classes is None and sorted(found[split]) != names:
            raise DataLayoutError(f"{path}: {splits[0]}/ and {split}/ hold different class folders: "
                                  f"{sorted(set(names) ^ set(found[split]))}; the archive is incomplete")
        missing = [name for name in names if not found[split].get(name)]
        if missing or not names:
            raise DataLayoutError(f"{path} holds no {split}/<class>/ images for classes {missing or '(none)'} "
                                  f"(image suffixes {sorted(IMAGE_SUFFIXES)}); is it the right archive?")
        members = [(label, *member) for label, name in enumerate(names) for member in sorted(found[split][name])]
        buffers = [data for _, _, data in members]
        images, kept, skipped = decode_buffers([f"{path}:{member}" for _, member, _ in members], buffers.__getitem__,
                                               options.skip_unreadable)
        datasets.append(ImageDataset(stack_if_uniform(images), [members[i][0] for i in kept], skipped=skipped))
    return datasets[0], datasets[1], names
