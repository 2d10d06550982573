"""Atomic writes: a failing write leaves the previous file intact and no partial file behind."""

import pytest
import torch

from norga.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)

    def broken(tmp):
        tmp.write_bytes(b"half a checkp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_unreadable_checkpoint_is_reported(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint .*truncated, corrupt or not a norga checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
