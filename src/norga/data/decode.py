"""Encoded images to pixels: one file (`read_image`), many files or archive members in batches (`decode_all`,
`decode_buffers`), and what a reader is told (`ReadOptions`: skip unreadable files, memory budget)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from norga.data.errors import UnreadableImageError

try:  # torchvision.io decodes JPEG/PNG ~2.5x faster than PIL, bit-identically (deprecated in 0.29 for torchcodec)
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
except ImportError:  # pragma: no cover - a future torchvision without it: PIL does everything
    decode_image = decode_jpeg = None
FAST_DECODE = {".jpg", ".jpeg", ".png"} if decode_image is not None else set()
JPEG_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # files read as images
SKIP_HINT = "skip_unreadable=True (--set data.skip_unreadable=true; they are counted in the run record)"
DECODE_CHUNK = 512  # images read and decoded per batched decode_jpeg call


def decode_bytes(data: bytes, name: str) -> Tensor:
    """One encoded image as an RGB uint8 (3, H, W) tensor (greyscale and palette become RGB); `name` (a file or
    archive member) gives the format by its suffix and names the image in the error."""
    if data and Path(name).suffix.lower() in FAST_DECODE:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass  # PIL below decodes a few more variants (e.g. CMYK JPEG) or gives the error
    try:
        if not data:
            raise ValueError("the file is empty or cannot be read")
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError (an OSError), truncated data
        raise UnreadableImageError(f"cannot decode image {name}: {error}; remove or replace the file, or skip such "
                                   f"files with {SKIP_HINT}") from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # decode_bytes names the file as unreadable


def read_image(path: str | Path) -> Tensor:
    """The image file at `path` as an RGB uint8 (3, H, W) tensor."""
    return decode_bytes(_file_bytes(Path(path)), str(path))


def _decode_chunk(names: Sequence[str], buffers: Sequence[bytes], skip_unreadable: bool) -> list[Tensor | None]:
    """Decoded images (None for a skipped unreadable one): one batched decode_jpeg call when every image is a
    JPEG that decodes, else one by one (which names the bad image)."""
    if decode_jpeg is not None and all(buffers) and all(Path(n).suffix.lower() in JPEG_SUFFIXES for n in names):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return list(decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in buffers],
                                        mode=ImageReadMode.RGB))
        except RuntimeError:
            pass
    decoded: list[Tensor | None] = []
    for name, data in zip(names, buffers):
        try:
            decoded.append(decode_bytes(data, name))
        except UnreadableImageError:
            if not skip_unreadable:
                raise
            decoded.append(None)
    return decoded


def decode_buffers(names: Sequence[str], load: Callable[[int], bytes],
                   skip_unreadable: bool) -> tuple[list[Tensor], list[int], list[str]]:
    """Decode images `names[i]` whose bytes `load(i)` gives, JPEGs in batches (~2x faster than one call per
    image, same pixels): (images, indices of the decoded ones, names of the skipped ones)."""
    images, kept, skipped = [], [], []
    for start in range(0, len(names), DECODE_CHUNK):
        indices = range(start, min(start + DECODE_CHUNK, len(names)))
        chunk = [names[i] for i in indices]
        for index, image in zip(indices, _decode_chunk(chunk, [load(i) for i in indices], skip_unreadable)):
            if image is None:
                skipped.append(names[index])
            else:
                images.append(image)
                kept.append(index)
    return images, kept, skipped


def decode_all(paths: Sequence[Path], skip_unreadable: bool) -> tuple[list[Tensor], list[int], list[str]]:
    """Decode every image file (see `decode_buffers`)."""
    paths = [Path(p) for p in paths]
    return decode_buffers([str(p) for p in paths], lambda i: _file_bytes(paths[i]), skip_unreadable)


@dataclass(frozen=True)
class ReadOptions:
    """How a source reader treats the files: skip (and count) undecodable images instead of failing; hold an
    image-file dataset in memory when its decoded pixels fit `memory_budget_mb` (0: always decode on access);
    `split_manifest`: an ImageNet-R split manifest file."""

    skip_unreadable: bool = False
    memory_budget_mb: int = 2048
    split_manifest: str | Path | None = None


def estimated_bytes(paths: Sequence[Path], samples: int = 32) -> int:
    """Decoded RGB size of all `paths`, from the headers of up to `samples` evenly spaced files (no decoding)."""
    if not paths:
        return 0
    step = max(1, len(paths) // samples)
    pixels = []
    for path in list(paths)[::step][:samples]:
        try:
            with Image.open(path) as image:
                pixels.append(image.size[0] * image.size[1])
        except (OSError, ValueError, SyntaxError):
            continue  # an unreadable file is reported when it is decoded
    return int(3 * len(paths) * (sum(pixels) / len(pixels))) if pixels else 0


def stack_if_uniform(images: list[Tensor]) -> Tensor | list[Tensor]:
    """One (N, 3, H, W) tensor when every image has the same size, else the list."""
    if images and len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(images)
    return images


DEFAULT_READ = ReadOptions()
