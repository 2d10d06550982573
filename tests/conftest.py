"""Shared test set-up: offline hub, fresh random seeds (printed, so a failure can be replayed)."""

import atexit
import os
import random
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
#: Downloads a test allows go to a fresh folder, never the user's ~/.cache/norga/data (nor are found there).
os.environ["NORGA_DOWNLOADS"] = tempfile.mkdtemp(prefix="norga-test-downloads-")
atexit.register(shutil.rmtree, os.environ["NORGA_DOWNLOADS"], True)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Seed torch from fresh entropy each test; set NORGA_TEST_SEED to replay a failure."""
    seed = int(os.environ.get("NORGA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"torch seed: {seed} (replay with NORGA_TEST_SEED={seed})")
    yield seed
