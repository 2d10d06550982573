"""timm weights from the Hugging Face hub, without a minute of retries when there is no network.

huggingface_hub retries every failed connection with back-off (about 25 s per file, two files per model). One
short request to the hub's endpoint first tells whether the network is there; when it is not, the weights are
looked up in the local hub cache only, as with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants

PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    return constants.ENDPOINT


def offline_mode() -> bool:
    """Whether huggingface_hub is told to stay off the network (``HF_HUB_OFFLINE=1``)."""
    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the hub's endpoint (or a proxy in front of it) answers one HEAD request within `timeout`."""
    try:
        urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # an HTTP answer: the network is there, the hub client gets real answers (no retries)
    except (OSError, ValueError):
        return False  # no route, no name resolution, refused, timed out, or not a URL
    return True


@contextmanager
def cache_only() -> Iterator[None]:
    """huggingface_hub reads only its local cache inside this block (as ``HF_HUB_OFFLINE=1``)."""
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def network_state() -> str:
    """``online``, ``offline`` (HF_HUB_OFFLINE is set) or ``unreachable`` (the probe failed)."""
    if offline_mode():
        return "offline"
    return "online" if hub_reachable() else "unreachable"
