"""Downloads of datasets that are not found: where they go, a quick reachability probe, a stall timeout, and a
staging folder so that an interrupted download leaves nothing half-written where norga looks.

The fetchers themselves (torchvision's dataset classes, its md5-verified archive download) verify checksums and
show a progress bar; `norga.data.registry` says which fetcher each dataset has.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Where downloads go when no data root is set (also searched, after the other places): this, else
#: $XDG_CACHE_HOME/norga/data, else ~/.cache/norga/data.
DOWNLOADS_ENV = "NORGA_DOWNLOADS"
PROBE_TIMEOUT_S = 5.0  # one HEAD request tells whether the dataset's server is reachable at all
STALL_TIMEOUT_S = 60.0  # a connection that sends nothing for this long fails the download


@dataclass(frozen=True)
class Download:
    """How a dataset is fetched into a root (checksums verified by the fetcher) and the address it comes from."""

    fetch: Callable[[Path], None]
    url: Callable[[], str]

    def __call__(self, root: Path) -> None:
        self.fetch(root)


def download_folder() -> Path:
    """Where downloads go when no data root is set: $NORGA_DOWNLOADS, else $XDG_CACHE_HOME/norga/data, else
    ~/.cache/norga/data. Datasets that can be downloaded are looked for there too, after every other place."""
    if os.environ.get(DOWNLOADS_ENV):
        return Path(os.environ[DOWNLOADS_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "norga" / "data"


def fetch(name: str, download: Callable[[Path], None], target: Path) -> str:
    """Download `name` into `target`, saying so on stderr; "" when it worked, else the sentence for the error.

    Without network one short request fails first, so nothing is announced. The download goes to a staging
    folder inside `target` and is moved into place only when complete: an interrupted one leaves nothing
    half-written where norga looks."""
    address = getattr(download, "url", None)
    if address is not None and (why := unreachable(address())) is not None:
        return f" It could not be downloaded from {address()} ({why}): no network access?"
    print(f"norga: {name} not found; downloading it into {target} (checksums verified)", file=sys.stderr, flush=True)
    try:
        with stall_timeout(STALL_TIMEOUT_S):
            download_staged(download, target)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision raises RuntimeError on md5
        text = " ".join(str(error).split())
        network = isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError)) or "urlopen error" in text
        return f" The download into {target} failed ({text}){': no network access?' if network else ''}"
    return ""


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url`'s server does not answer one HEAD request within `timeout`, or None when it answers."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an HTTP answer: the network is there
    except (OSError, ValueError) as error:
        return " ".join(str(error).split()) or type(error).__name__
    return None


@contextmanager
def stall_timeout(seconds: float) -> Iterator[None]:
    """Sockets opened inside this block fail after `seconds` without data (torchvision sets no timeout)."""
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(saved)


def download_staged(download: Callable[[Path], None], target: Path) -> None:
    """Run `download` into a fresh folder inside `target`, then move what it made into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".norga-download-", dir=target))
    try:
        download(staging)
        _move_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(source: Path, target: Path) -> None:
    """Move every entry of folder `source` into folder `target`, merging folders both have."""
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            _move_into(entry, destination)
        else:
            os.replace(entry, destination)
