"""DataLoaders with configurable workers and deterministic seeding (order and per-worker augmentation)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def seed_worker(worker_id: int) -> None:
    """Seed `random` and numpy in a worker from its torch seed (itself derived from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, workers: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose order (and, with workers > 0, whose augmentation) is fixed by `seed`.

    With ``workers=0`` the transforms draw from the global torch generator: seed it for exact replays.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, not {workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
                      worker_init_fn=seed_worker if workers else None, persistent_workers=workers > 0,
                      drop_last=drop_last, pin_memory=pin_memory)
