"""Frozen-backbone features computed once per image and reused across epochs, tasks and evaluations."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from norga.storage import load_checkpoint, save_checkpoint


@dataclass
class FeatureSet:
    """Features (n, dim) and labels (n,) of one dataset, in the dataset's order."""

    features: Tensor
    labels: Tensor


class FrozenFeatureCache:
    """Memoises whole-dataset feature computations by a caller-chosen key, e.g. ("test", task).

    With a `directory`, features are also kept on disk (they survive a resume); only a process with
    `write` set saves them (rank 0 of a distributed run), every process may read them.
    """

    def __init__(self, enabled: bool = True, directory: Path | None = None, write: bool = True) -> None:
        self.enabled = enabled
        self.directory = directory
        self.write = write
        self._store: dict[Hashable, FeatureSet] = {}

    def features(self, key: Hashable, compute: Callable[[], FeatureSet]) -> FeatureSet:
        """``compute()`` (features of every image in the dataset's order), run at most once per key."""
        if self.enabled and key in self._store:
            return self._store[key]
        file = self._file(key)
        if file is not None and file.is_file():
            saved = load_checkpoint(file)
            self._store[key] = FeatureSet(saved["features"], saved["labels"])
            return self._store[key]
        result = compute()
        if self.enabled:
            self._store[key] = result
            if file is not None and self.write:
                save_checkpoint({"features": result.features, "labels": result.labels}, file)
        return result

    def _file(self, key: Hashable) -> Path | None:
        if not self.enabled or self.directory is None:
            return None
        parts = key if isinstance(key, tuple) else (key,)
        return self.directory / ("_".join(str(part) for part in parts) + ".pt")
