"""Deterministic randomness: every epoch's randomness derives from (seed, task, phase, epoch).

A resumed run therefore draws exactly what the uninterrupted run drew, without replaying RNG history.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from the run seed and any keys (task index, phase name, epoch ...)."""
    text = "/".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch generator seeded by `derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))
