"""A complete `norga run` from the command line in seconds, without real data or weights: generated PNG class
folders (the `imagefolder` benchmark) and a one-block ViT with random weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from norga.config import SHARED_KEYS

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE = 4, 6, 3, 16
REAL = os.environ.get("NORGA_DATA")
NEEDS_FASHION_MNIST = pytest.mark.skipif(not REAL or not (Path(REAL or "/") / "fashion-mnist").is_dir(),
                                         reason="real Fashion-MNIST absent: set NORGA_DATA to ../shared/data")


def write_image_folder(root: Path, seed: int = 0) -> Path:
    """`root`/{train,test}/<class>/*.png: one colour per class plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                base = np.full((SIZE, SIZE, 3), 60 * label, dtype=np.int16)
                pixels = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def write_config(path: Path, data_root: Path, **sections) -> Path:
    """A NoRGa config on the generated folders (2 tasks, one epoch per phase); `sections` replace whole sections
    (shared ones, or NoRGa's own such as ``tii``)."""
    config = {
        "method": "norga", "seed": 5, "device": "cpu",
        "data": {"benchmark": "imagefolder", "root": str(data_root), "num_tasks": 2},
        "backbone": {"name": "vit_tiny_patch16_224", "weights": "none",
                     "timm_kwargs": {"img_size": SIZE, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
        "norga": {
            "gate": "sigmoid", "prompt": {"length": 2, "layers": [0]},
            "tii": {"mlp_hidden": [1], "train": {"epochs": 1, "lr": 0.001, "batch_size": 4},
                    "tap": {"epochs": 1, "lr": 0.01, "samples_per_class": 4}},
            "wtp": {"train": {"epochs": 1, "lr": 0.01, "batch_size": 4, "schedule": "constant"},
                    "tap": {"epochs": 1, "lr": 0.01, "samples_per_class": 4}}},
        "eval": {"batch_size": 8},
    }
    for key, value in sections.items():
        (config if key in SHARED_KEYS else config["norga"])[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def norga(*args, env: dict | None = None, prefix: tuple[str, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    """`python -m norga ARGS` (optionally behind a `prefix` command such as `unshare ... sh -c`)."""
    command = [*prefix, sys.executable, "-m", "norga", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)
