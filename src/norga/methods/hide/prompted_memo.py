"""Prompted pre-logits per (image, slot), memoised across evaluations while the slot's parameters are unchanged."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor


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
