"""A dataset that is not found is downloaded when allowed (the quickstart allows it): through torchvision, with its
checksums, into the data root or norga's download folder, announced in one line, and found there again without
network. torchvision's network access is replaced by a local mirror: these tests never touch the network."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tv
import torchvision.datasets.utils as tv_utils

from norga.config_io import load_config
from norga.data import DatasetNotFoundError
from norga.data import download as download_module
from norga.data.registry import DEBIAN_FASHION_MNIST, locate
from norga.data.sources import read_mnist_like

#: The real files, read before any test takes NORGA_DATA away.
REAL = Path(os.environ.get("NORGA_DATA", "/nonexistent")) / "fashion-mnist"
FILES = [f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


@pytest.fixture
def offline_world(monkeypatch, tmp_path):
    """No data root, an empty download folder, no Debian package."""
    if DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian's Fashion-MNIST is installed, so the data is never missing here")
    monkeypatch.delenv("NORGA_DATA", raising=False)
    monkeypatch.setenv("NORGA_DOWNLOADS", str(tmp_path / "downloads"))
    return tmp_path / "downloads"


@pytest.fixture
def mirror(make, tmp_path, monkeypatch):
    """Fashion-MNIST's server, played by a folder: the real IDX files when NORGA_DATA has them, else generated
    ones. torchvision checks the md5 sums the mirror publishes (its resources list) as it checks the real ones."""
    folder = tmp_path / "mirror"
    if all((REAL / name).is_file() for name in FILES):
        folder.mkdir()
        for name in FILES:
            shutil.copy(REAL / name, folder / name)
    else:
        make.mnist_like("mirror")
    fetched = []

    def urlretrieve(url: str, filename: str, chunk_size: int = 0) -> None:
        fetched.append(url)
        shutil.copy(folder / url.rsplit("/", 1)[-1], filename)

    monkeypatch.setattr(tv.FashionMNIST, "resources",
                        [(name, hashlib.md5((folder / name).read_bytes()).hexdigest()) for name in FILES])
    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", urlretrieve)
    monkeypatch.setattr(download_module, "unreachable", lambda url, timeout=None: None)
    return folder, fetched


def test_a_missing_fashion_mnist_is_downloaded_verified_announced_and_found_again_offline(offline_world, mirror,
                                                                                         capsys, monkeypatch):
    folder, fetched = mirror
    path = locate("fashion-mnist", None, download=True)
    assert path == offline_world / "FashionMNIST" / "raw"
    assert sorted(url.rsplit("/", 1)[-1] for url in fetched) == sorted(FILES)
    assert all(url.startswith(tv.FashionMNIST.mirrors[0]) for url in fetched)
    err = capsys.readouterr().err
    assert f"norga: fashion-mnist not found; downloading it into {offline_world} (checksums verified)" in err
    got, expected = read_mnist_like(path, class_names=[]), read_mnist_like(folder, class_names=[])
    for split in (0, 1):
        assert np.array_equal(got[split].images.numpy(), expected[split].images.numpy())
        assert list(got[split].targets) == list(expected[split].targets)
    assert not list(offline_world.glob(".norga-download-*"))  # the staging folder is gone

    monkeypatch.setattr(tv_utils, "_urlretrieve", lambda *args, **kwargs: pytest.fail("downloaded again"))
    assert locate("fashion-mnist", None, download=True) == path  # found in the download folder, no network
    assert locate("fashion-mnist", None, download=False) == path
    assert "downloading" not in capsys.readouterr().err


def test_a_download_goes_into_the_data_root_when_one_is_set(offline_world, mirror, tmp_path):
    root = tmp_path / "data"
    assert locate("fashion-mnist", root, download=True) == root / "FashionMNIST" / "raw"
    assert not offline_world.exists()


def test_a_corrupt_download_fails_its_checksum_and_leaves_nothing_where_norga_looks(offline_world, mirror,
                                                                                   monkeypatch):
    def corrupt(url: str, filename: str, chunk_size: int = 0) -> None:
        Path(filename).write_bytes(b"<html>an error page</html>")

    monkeypatch.setattr(tv_utils, "_urlretrieve", corrupt)
    with pytest.raises(DatasetNotFoundError, match=r"The download into .* failed \(.*corrupted") as caught:
        locate("fashion-mnist", None, download=True)
    assert "no network access" not in str(caught.value) and "\n" not in str(caught.value)
    assert list(offline_world.iterdir()) == []  # neither the files nor a staging folder


def test_a_download_cut_off_midway_leaves_nothing_where_norga_looks(offline_world, mirror, monkeypatch):
    folder, _ = mirror

    def cut_off(url: str, filename: str, chunk_size: int = 0) -> None:
        if "t10k" in url:
            raise urllib.error.URLError("Connection reset by peer")
        shutil.copy(folder / url.rsplit("/", 1)[-1], filename)

    monkeypatch.setattr(tv_utils, "_urlretrieve", cut_off)
    with pytest.raises(DatasetNotFoundError, match="download into .* failed.*Connection reset.*no network access"):
        locate("fashion-mnist", None, download=True)
    assert list(offline_world.iterdir()) == []  # the train files that did arrive were staged, then removed


def test_without_network_nothing_is_announced_and_the_error_is_one_line(offline_world, monkeypatch, capsys):
    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched although the server was unreachable")

    monkeypatch.setattr(tv_utils, "_urlretrieve", no_fetch)
    with pytest.raises(DatasetNotFoundError) as caught:
        locate("fashion-mnist", None, download=True)
    message = str(caught.value)
    assert "\n" not in message and "could not be downloaded from http" in message and "no network access?" in message
    assert capsys.readouterr().err == "" and not offline_world.exists()


def test_the_probe_answers_fast_where_nothing_listens():
    assert download_module.unreachable("http://127.0.0.1:9/", timeout=2.0) is not None


def test_the_quickstart_allows_the_download():
    assert load_config("quickstart").data.download is True


def test_every_downloadable_source_names_the_address_it_is_probed_at():
    from norga.data.download import Download
    from norga.data.registry import SOURCES

    downloads = {name: source.download for name, source in SOURCES.items() if source.download is not None}
    assert {"fashion-mnist", "cifar10", "cifar100", "mnist", "svhn", "cub200", "imagenet-r"} <= set(downloads)
    for name, download in downloads.items():
        assert isinstance(download, Download) and download.url().startswith(("http://", "https://")), name
