"""Decoding image files: batched JPEG decoding gives PIL's pixels, bad files are named or skipped and counted,
and the memory budget decides between decoding once into memory and decoding on access."""

import numpy as np
import pytest
import torch
from PIL import Image

from norga.data import ImageDataset, UnreadableImageError
from norga.data import decode as decode_module
from norga.data.decode import ReadOptions, decode_all, estimated_bytes, read_image
from norga.data.folders import file_dataset


def pil_pixels(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def write(path, size=(12, 10), mode="RGB", quality=75):
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    image = Image.fromarray(np.random.randint(0, 256, shape, dtype=np.uint8), mode)
    image.save(path, quality=quality) if path.suffix == ".jpg" else image.save(path)
    return path


@pytest.fixture
def files(tmp_path):
    """JPEGs (colour and greyscale) and PNGs (RGB, greyscale, palette), in an order that mixes them across chunks."""
    made = []
    for i in range(7):
        made.append(write(tmp_path / f"c{i}.jpg"))
        made.append(write(tmp_path / f"g{i}.jpg", mode="L"))
    made.append(write(tmp_path / "p.png"))
    made.append(write(tmp_path / "l.png", mode="L"))
    palette = tmp_path / "palette.png"
    Image.fromarray(np.random.randint(0, 256, (10, 12, 3), dtype=np.uint8)).convert("P").save(palette)
    made.append(palette)
    made += [write(tmp_path / f"d{i}.jpg") for i in range(5)]
    return made


def test_batched_decoding_gives_the_pixels_pil_gives(files, monkeypatch):
    monkeypatch.setattr(decode_module, "DECODE_CHUNK", 4)  # several batches, two with PNGs in them (per-file path)
    batches = []
    batched = decode_module.decode_jpeg
    monkeypatch.setattr(decode_module, "decode_jpeg",
                        lambda data, mode: batches.append(len(data)) or batched(data, mode=mode))
    images, kept, skipped = decode_all(files, skip_unreadable=False)
    assert batches == [4, 4, 4, 2]  # every all-JPEG chunk went through one batched decode
    assert kept == list(range(len(files))) and skipped == []
    for path, image in zip(files, images):
        assert image.dtype == torch.uint8 and image.shape == (3, 10, 12)  # greyscale and palette became RGB
        assert torch.equal(image, pil_pixels(path)), path.name
        assert torch.equal(image, read_image(path))


def test_an_undecodable_file_is_named_or_skipped_and_counted(files, tmp_path, monkeypatch):
    monkeypatch.setattr(decode_module, "DECODE_CHUNK", 4)
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(files[0].read_bytes()[:200])
    empty = tmp_path / "e.jpg"
    empty.write_bytes(b"")
    paths = [*files[:2], truncated, *files[2:5], empty, *files[5:]]
    with pytest.raises(UnreadableImageError, match="t.jpg.*data.skip_unreadable=true"):
        decode_all(paths, skip_unreadable=False)
    images, kept, skipped = decode_all(paths, skip_unreadable=True)
    assert skipped == [str(truncated), str(empty)] and len(images) == len(files)
    assert [paths[i] for i in kept] == files
    assert all(torch.equal(image, pil_pixels(path)) for image, path in zip(images, files))


def test_memory_budget_decides_in_memory_or_on_access(files, tmp_path):
    labels = list(range(len(files)))
    assert estimated_bytes(files) == 3 * 10 * 12 * len(files) and estimated_bytes([]) == 0
    held = file_dataset(files, labels, ReadOptions(memory_budget_mb=1))
    assert held.in_memory and isinstance(held.images, torch.Tensor) and held.images.shape == (len(files), 3, 10, 12)
    lazy = file_dataset(files, labels, ReadOptions(memory_budget_mb=0))
    assert not lazy.in_memory and list(lazy.images) == files
    assert all(torch.equal(held.load(i), lazy.load(i)) for i in range(len(files)))
    bigger = write(tmp_path / "big.jpg", size=(40, 30))
    mixed = file_dataset([*files, bigger], [*labels, 0], ReadOptions(memory_budget_mb=1))
    assert mixed.in_memory and isinstance(mixed.images, list)  # different sizes: a list of tensors
    assert mixed.load(len(files)).shape == (3, 30, 40) and torch.equal(mixed.subset([3]).load(0), held.load(3))


def test_lazy_dataset_with_skip_drops_bad_files_up_front(files, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    dataset = file_dataset([bad, *files], list(range(len(files) + 1)), ReadOptions(True, memory_budget_mb=0))
    assert not dataset.in_memory and dataset.skipped == [str(bad)] and dataset.targets == list(range(1, len(files) + 1))


def test_image_dataset_over_a_list_of_tensors():
    images = [torch.randint(0, 256, (3, h, 5), dtype=torch.uint8) for h in (4, 6, 8)]
    dataset = ImageDataset(images, [0, 1, 2], transform=lambda x: x.shape)
    assert dataset.in_memory and dataset[2] == ((3, 8, 5), 2)
    assert torch.equal(dataset.subset([2, 0]).load(1), images[0]) and dataset.subset([1]).targets == [1]
