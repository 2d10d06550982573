"""Atomic writes: a failing write leaves the previous file intact and no partial file behind."""

import pytest
import torch

from norga.storage import atomic_write, load_checkpoint, save_checkpoint


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


def test_a_full_disk_while_torch_saves_is_named_with_the_file(tmp_path, monkeypatch):
    """torch's writer reports a failed write as "[enforce fail at inline_container.cc]": the error says what happened."""
    import builtins
    import errno

    from norga import storage as checkpoint
    from norga.storage import StorageError

    class FillsUp:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def small_disk_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        return FillsUp(handle) if mode == "wb" else handle

    monkeypatch.setattr(checkpoint, "open", small_disk_open, raising=False)
    path = tmp_path / "state.pt"
    with pytest.raises(StorageError, match=f"cannot write {path}: no space left on the device"):
        save_checkpoint({"weights": torch.zeros(1000)}, path)
    assert list(tmp_path.iterdir()) == []
