"""Frozen-backbone features computed once per image and reused across epochs, tasks and evaluations."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from norga.engine.checkpoint import load_checkpoint, save_checkpoint


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


@dataclass
class _MemoEntry:
    """Memoised features of one (dataset, slot): rows filled so far, valid for parameter versions `stamp`."""

    stamp: Hashable
    filled: Tensor
    store: Tensor | None = None

    def put(self, rows: Tensor, features: Tensor) -> None:
        if self.store is None:
            self.store = features.new_zeros(len(self.filled), features.shape[1])
        self.store[rows] = features
        self.filled[rows] = True


class PromptedFeatureMemo:
    """Prompted pre-logits per (image, slot), reused across evaluations while the slot is unchanged.

    Valid when a sample's prompted features depend only on its image and its slot's parameters (the correct
    prefix layout). Each (dataset, slot) entry is stamped with `version(slot)` (the parameters' in-place
    version counters); a different stamp drops the entry, so a slot or gate that trained since is recomputed.
    """

    def __init__(self, version: Callable[[int], Hashable]) -> None:
        self.version = version
        self._entries: dict[tuple[Hashable, int], _MemoEntry] = {}
        self.images_encoded = 0

    def features(self, dataset: Hashable, rows: Tensor, slots: Tensor, size: int,
                 encode: Callable[[Tensor], Tensor]) -> Tensor:
        """Features of the images at `rows` of `dataset` (which holds `size` images) with per-sample `slots`;
        ``encode(mask)`` computes those of the batch positions in `mask` that are not memoised."""
        if len(rows) == 0:
            return encode(torch.zeros(0, dtype=torch.bool)).float().cpu()
        rows, slots = rows.cpu(), slots.cpu()
        entries = {slot: self._entry(dataset, slot, size) for slot in slots.unique().tolist()}
        known = torch.zeros(len(rows), dtype=torch.bool)
        for slot, entry in entries.items():
            here = slots == slot
            known[here] = entry.filled[rows[here]]
        if not bool(known.all()):
            computed = encode(~known).float().cpu()
            self.images_encoded += len(computed)
            missing_rows, missing_slots = rows[~known], slots[~known]
            for slot, entry in entries.items():
                mine = missing_slots == slot
                if bool(mine.any()):
                    entry.put(missing_rows[mine], computed[mine])
        dim = next(entry.store for entry in entries.values() if entry.store is not None).shape[1]
        result = torch.empty(len(rows), dim)
        for slot, entry in entries.items():
            here = slots == slot
            if bool(here.any()):
                result[here] = entry.store[rows[here]]
        return result

    def _entry(self, dataset: Hashable, slot: int, size: int) -> _MemoEntry:
        stamp = self.version(slot)
        entry = self._entries.get((dataset, slot))
        if entry is None or entry.stamp != stamp:
            entry = self._entries[(dataset, slot)] = _MemoEntry(stamp, torch.zeros(size, dtype=torch.bool))
        return entry
