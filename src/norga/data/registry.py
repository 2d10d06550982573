"""Where each dataset lives and how it is read: a registry of named sources, and the data-root search
(explicit root, then $NORGA_DATA, then fixed system places and the download folder, then a checksum-verified
download when allowed)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from norga.data.archive import is_archive, read_class_archive
from norga.data.decode import DEFAULT_READ, ReadOptions
from norga.data.download import Download, download_folder, fetch
from norga.data.errors import (
    BenchmarkOptionError,
    DataLayoutError,
    DatasetNotFoundError,
)
from norga.data.folders import read_cub, read_image_folder, read_imagenet_r
from norga.data.sources import (
    has_mnist_like,
    notmnist_split_folders,
    read_cifar_pickles,
    read_mnist_like,
    read_notmnist,
    read_svhn_mat,
)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
IMAGENET_R_MD5 = "a61312130a589d0ca1a8fca1f2bd3337"
DOWNLOAD = "--set data.download=true, or download=True in Python"
#: How a user names the data root; every "not found" message says it.
SET_ROOT = "NORGA_DATA=DIR or --set data.root=DIR"
NOTMNIST_URL = "https://github.com/facebookresearch/Adversarial-Continual-Learning/raw/main/data/notMNIST.zip"


@dataclass(frozen=True)
class Source:
    """How to find one dataset under a data root and read it: ``read(path, ReadOptions())`` returns
    (train, test, class names) with the dataset's own labels."""

    num_classes: int  # 0: as many as the data has (image folders)
    default_tasks: int
    cifar_style: bool  # the official CIFAR transforms (NORGA_SPEC §3.3) rather than the others
    candidates: Callable[[Path], list[Path]]
    present: Callable[[Path], bool]
    read: Callable[..., tuple]
    layout: str
    how_to_get: str
    download: Callable[[Path], None] | None = None  # a `Download` (or any callable fetching into a root)
    fixed_places: tuple[Path, ...] = field(default=())  # searched after the roots (e.g. Debian's package)


def _torchvision_download(name: str, subfolder: str = "", split_arg: bool = False) -> Download:
    def download(root: Path) -> None:
        import torchvision.datasets as tv

        cls, where = getattr(tv, name), str(root / subfolder)
        for split in ("train", "test"):  # torchvision verifies its own md5 checksums and shows a progress bar
            cls(where, split=split, download=True) if split_arg else cls(where, train=split == "train", download=True)

    def url() -> str:
        """The first file torchvision fetches: MNIST-likes from their mirrors, CIFAR's archive, SVHN's train split."""
        import torchvision.datasets as tv

        cls = getattr(tv, name)
        if getattr(cls, "mirrors", None):
            return cls.mirrors[0] + cls.resources[0][0]
        return cls.split_list["train"][0] if split_arg else cls.url

    return Download(download, url)


def _archive_download(url: str, md5: str) -> Download:
    def download(root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(url, str(root), md5=md5)  # md5-verified before extraction

    return Download(download, lambda: url)


def _cifar10_candidates(root: Path) -> list[Path]:
    extra = [Path(os.environ["NORGA_CIFAR10_JPG"])] if os.environ.get("NORGA_CIFAR10_JPG") else []
    return [root / "cifar-10-batches-py", root / "cifar10-jpg", root / "cifar10" / "cifar10-jpg.tar.gz",
            root / "cifar10-jpg.tar.gz", *extra]


def _cifar10_present(path: Path) -> bool:
    return (path / "data_batch_1").is_file() or (path / "train").is_dir() or is_archive(path)


def _read_cifar10(path: Path, options: ReadOptions = DEFAULT_READ) -> tuple:
    if is_archive(path):
        return read_class_archive(path, options)
    if (path / "data_batch_1").is_file():
        return read_cifar_pickles(path, options, fine=False)
    return read_image_folder(path, options)


def _imagenet_r_present(path: Path) -> bool:
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir() if p.is_dir()}
    if names and names <= {"train", "test"}:
        raise DataLayoutError(f"{path} holds only train/ and test/: the official code's split moved the files there "
                              "and deleted the class folders. Extract imagenet-r.tar again (norga never moves files)")
    return bool(names)


def _cub_candidates(root: Path) -> list[Path]:
    return [root / "CUB_200_2011", root / "cub200" / "CUB_200_2011", root / "cub200", root / "CUB200"]


def _notmnist_candidates(root: Path) -> list[Path]:
    return [root / "notMNIST", root / "notmnist", root / "notmnist" / "notMNIST", root / "notMNIST.zip",
            root / "notmnist" / "notMNIST.zip"]


def _notmnist_present(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".zip") or (path.is_dir() and notmnist_split_folders(path) is not None)


SOURCES: dict[str, Source] = {
    "cifar100": Source(
        100, 10, True, lambda r: [r / "cifar-100-python"], lambda p: (p / "train").is_file(),
        partial(read_cifar_pickles, fine=True), "<root>/cifar-100-python/{train,test,meta} (torchvision's format)",
        "copy torchvision's cifar-100-python folder to <root>",
        _torchvision_download("CIFAR100"),
    ),
    "cifar10": Source(
        10, 5, True, _cifar10_candidates, _cifar10_present, _read_cifar10,
        "<root>/cifar-10-batches-py (torchvision's format), or JPEG class folders <root>/cifar10-jpg/{train,test}/"
        "<class>/*.jpg (or $NORGA_CIFAR10_JPG), or their archive <root>/cifar10/cifar10-jpg.tar.gz (read without "
        "extracting)",
        "put a CIFAR-10 JPEG archive at <root>/cifar10/cifar10-jpg.tar.gz",
        _torchvision_download("CIFAR10"),
    ),
    "fashion-mnist": Source(
        10, 5, False, lambda r: [r / "fashion-mnist", r / "FashionMNIST" / "raw"],
        has_mnist_like, partial(read_mnist_like, class_names=FASHION_CLASSES),
        "<root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        "`apt-get install dataset-fashion-mnist` (installs to /usr/share/datasets/fashion-mnist), "
        "or copy the four IDX files to <root>/fashion-mnist",
        _torchvision_download("FashionMNIST"), (DEBIAN_FASHION_MNIST,),
    ),
    "mnist": Source(
        10, 5, False, lambda r: [r / "mnist", r / "MNIST" / "raw"], has_mnist_like,
        partial(read_mnist_like, class_names=[str(d) for d in range(10)]),
        "<root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        "copy the four IDX files to <root>/mnist",
        _torchvision_download("MNIST"),
    ),
    "svhn": Source(
        10, 5, False, lambda r: [r / "svhn", r / "SVHN", r],
        lambda p: (p / "train_32x32.mat").is_file() and (p / "test_32x32.mat").is_file(), read_svhn_mat,
        "<root>/svhn/{train,test}_32x32.mat (the cropped-digits format; needs scipy)",
        "copy train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ to <root>/svhn",
        _torchvision_download("SVHN", "svhn", split_arg=True),
    ),
    "notmnist": Source(
        10, 5, False, _notmnist_candidates, _notmnist_present, read_notmnist,
        "<root>/notMNIST/{Train,Test}/{A..J}/*.png, or the zip itself at <root>/notMNIST.zip",
        f"download {NOTMNIST_URL} (the ACL repository's zip, as the official code) to <root>/notMNIST.zip; norga reads "
        "it without extracting (no published checksum, so norga does not download it itself)",
    ),
    "cub200": Source(
        200, 10, False, _cub_candidates, lambda p: (p / "images.txt").is_file(), read_cub,
        "<root>/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/}",
        f"extract CUB_200_2011.tgz ({CUB_URL}) into <root>",
        _archive_download(CUB_URL, CUB_MD5),
    ),
    "imagenet-r": Source(
        200, 10, False, lambda r: [r / "imagenet-r", r / "imagenet-r" / "imagenet-r"], _imagenet_r_present,
        read_imagenet_r, "<root>/imagenet-r/<wnid>/*.jpg (200 class folders, as extracted from imagenet-r.tar)",
        f"extract imagenet-r.tar ({IMAGENET_R_URL}) into <root>",
        _archive_download(IMAGENET_R_URL, IMAGENET_R_MD5),
    ),
    "imagefolder": Source(
        0, 0, False, lambda r: [r], lambda p: (p / "train").is_dir() and (p / "test").is_dir(), read_image_folder,
        "<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg",
        "make <root> a folder with train/ and test/ class folders",
    ),
}


def search_roots(data_root: str | Path | None) -> list[Path]:
    """The data roots in the order they are searched: the explicit one, then $NORGA_DATA."""
    roots = [Path(data_root)] if data_root else []
    if os.environ.get("NORGA_DATA") and Path(os.environ["NORGA_DATA"]) not in roots:
        roots.append(Path(os.environ["NORGA_DATA"]))
    return roots


def locate(name: str, data_root: str | Path | None, download: bool = False) -> Path:
    """The file or folder holding source `name`: under `data_root`, else $NORGA_DATA, else a fixed system
    place or the download folder, else downloaded (checksum-verified) into the first root, or the download
    folder when no root is set, when `download`."""
    if name not in SOURCES:
        raise BenchmarkOptionError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    source = SOURCES[name]
    roots = search_roots(data_root)
    searched = [path for root in roots for path in source.candidates(root)] + list(source.fixed_places)
    if source.download is not None and download_folder() not in roots:
        searched += source.candidates(download_folder())
    for path in searched:
        if source.present(path):
            return path
    failure = ""
    if download and source.download is not None:
        target = roots[0] if roots else download_folder()
        failure = fetch(name, source.download, target)
        if not failure:
            for path in source.candidates(target):
                if source.present(path):
                    return path
            failure = f" The download into {target} finished but the expected files are not there."
    where = str(roots[0]) if roots else "<root>"
    raise DatasetNotFoundError(_not_found(name, searched, bool(roots)) + failure
                               + f" Expected layout: {source.layout.replace('<root>', where)}. "
                               f"To get it: {_ways(source, download).replace('<root>', where)}.")


def _not_found(name: str, searched: list[Path], have_root: bool) -> str:
    """Where `name` was looked for and, when no data root is set, how to set one."""
    text = f"{name} not found; looked in: {', '.join(map(str, searched)) or 'nowhere'}."
    return text if have_root else text + f" No data root is set (<root> below): {SET_ROOT}."


def _ways(source: Source, download: bool) -> str:
    """The ways to get a source's data; a download is offered only where it exists and was not already tried."""
    if source.download is None or download:
        return source.how_to_get
    return f"allow a download ({DOWNLOAD}) on a machine with network, or {source.how_to_get}"
