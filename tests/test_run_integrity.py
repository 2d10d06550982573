"""A run directory is consistent at every instant: a task's end is one commit, a resume repairs what a crash
interrupted, temporary files are cleaned up, files get their mode from the umask, and a resume refuses state
that belongs to another run, config or data."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import pytest
import torch
from engine_fixtures import (
    CLASSES_PER_TASK,
    NUM_TASKS,
    FailingDataset,
    build,
    make_tasks,
    tiny_config,
)

from norga.config import ConfigError, OptimConfig
from norga.engine import run_dir as run_dir_module
from norga.engine.loop import run_experiment
from norga.runtime.context import TaskDatasets
from norga.storage import CheckpointError, atomic_write, load_checkpoint

NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK
RECORDS = {"benchmark": {"split_sha256": "a" * 64}}


def probe_config(**changes):
    """linear_probe on cached frozen features: a few seconds a run, every kind of file a run writes."""
    config = tiny_config(method="linear_probe", **changes)
    config.settings.train = OptimConfig(epochs=2, lr=0.01, batch_size=4)
    return config


def run(tmp_path, name, config, tasks=None, records=RECORDS, **kwargs):
    return run_experiment(build(config, tasks, records=records), tmp_path / name, **kwargs)


def outputs(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in [directory / "results.json", *sorted(directory.glob("*_matrix.csv"))]}


def fail_writing(monkeypatch, file_name: str) -> None:
    """The disk fills up while `file_name` is written (the previous version of the file, if any, stays)."""
    real = run_dir_module.save_checkpoint

    def save(state, path):
        if os.path.basename(path) == file_name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state, path)

    monkeypatch.setattr(run_dir_module, "save_checkpoint", save)


def test_a_crash_while_the_last_task_checkpoint_is_written_is_repaired_by_the_resume(tmp_path, monkeypatch):
    config = probe_config()
    run(tmp_path, "straight", config)
    with monkeypatch.context() as patch:
        fail_writing(patch, f"task{NUM_TASKS}.pt")
        with pytest.raises(OSError, match="space"):
            run(tmp_path, "crashed", config)
    run(tmp_path, "crashed", config, resume=True)
    assert outputs(tmp_path / "crashed") == outputs(tmp_path / "straight")  # byte for byte, none stale
    assert json.loads((tmp_path / "crashed" / "results.json").read_text())["complete"]
    for task in range(NUM_TASKS):
        assert load_checkpoint(tmp_path / "crashed" / "checkpoints" / f"task{task + 1}.pt")["position"]["task"] == task + 1


def test_a_missing_last_task_checkpoint_and_stale_results_are_rewritten_by_the_resume(tmp_path):
    config = probe_config()
    run(tmp_path, "run", config)
    directory = tmp_path / "run"
    expected = outputs(directory)
    (directory / "checkpoints" / f"task{NUM_TASKS}.pt").unlink()
    (directory / "results.json").write_text(json.dumps({"complete": False}))
    (directory / "accuracy_matrix.csv").write_text("stale\n")
    run(tmp_path, "run", config, resume=True)
    assert outputs(directory) == expected
    assert load_checkpoint(directory / "checkpoints" / f"task{NUM_TASKS}.pt")["position"]["task"] == NUM_TASKS


def test_a_run_whose_method_cannot_be_built_leaves_no_run_directory(tmp_path):
    config = tiny_config(**{"prompt.layers": [0, 2]})  # the tiny backbone has blocks 0 and 1
    with pytest.raises(ConfigError, match=r"norga.prompt.layers = \[0, 2\] does not fit this 2-block backbone"):
        run(tmp_path, "run", config)
    assert not (tmp_path / "run").exists()
    assert not [h for h in logging.getLogger("norga").handlers if str(tmp_path) in getattr(h, "baseFilename", "")]
    given = tmp_path / "given"  # a folder the caller made stays, as empty as it was
    given.mkdir()
    with pytest.raises(ConfigError):
        run(tmp_path, "given", config)
    assert list(given.iterdir()) == []
    (given / "log.txt").write_text("a run killed at its start\n")  # a log that was there before stays too
    with pytest.raises(ConfigError):
        run(tmp_path, "given", config)
    assert [p.name for p in given.iterdir()] == ["log.txt"]
    assert (given / "log.txt").read_text().startswith("a run killed at its start\n")
    run(tmp_path, "given", probe_config())  # and is a new run's directory once the settings fit
    assert (given / "config.yaml").is_file() and (given / "results.json").is_file()


def test_temporary_files_of_a_killed_writer_are_removed_when_the_run_is_opened_again(tmp_path):
    config = probe_config()
    run(tmp_path, "run", config)
    directory = tmp_path / "run"
    left = [directory / ".state.pt.0123456789abcdef.tmp", directory / "checkpoints" / ".task2.pt.k3j4h5g6.tmp"]
    for path in left:
        path.write_bytes(b"half a checkp")
    run(tmp_path, "run", config, resume=True)
    assert not any(path.exists() for path in left)


def test_files_get_their_mode_from_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        os.umask(0o002)
        atomic_write(tmp_path / "b.txt", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o664


def crashed_mid_task(tmp_path, name, config):
    """A run of `config` that crashed in task 2 (task 1 is committed): in its second epoch of augmented
    training, or (methods on frozen features) on its first frozen pass."""
    tasks = make_tasks()
    train, train_eval = tasks[1].train, tasks[1].train_eval
    if config.method == "linear_probe":
        train_eval = FailingDataset(train_eval, fail_at=1)
    else:
        train = FailingDataset(train, fail_at=len(train) + 4)
    tasks[1] = TaskDatasets(tasks[1].classes, train, train_eval, tasks[1].test)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tmp_path, name, config, tasks=tasks)
    return tmp_path / name


def test_a_missing_state_heavy_file_is_one_clear_error(tmp_path):
    config = tiny_config(**{"tii.augment": True})
    directory = crashed_mid_task(tmp_path, "run", config)
    (directory / "state_heavy.pt").unlink()
    with pytest.raises(CheckpointError, match="state_heavy.pt is missing: state.pt needs the class statistics"):
        run(tmp_path, "run", config, resume=True)


def test_a_foreign_state_is_refused(tmp_path):
    config = probe_config()
    mine = crashed_mid_task(tmp_path, "mine", config)
    other = crashed_mid_task(tmp_path, "other", config)  # the same config: only the run differs
    shutil.copy(other / "state.pt", mine / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt belongs to another run"):
        run(tmp_path, "mine", config, resume=True)


def test_a_state_of_another_config_is_refused(tmp_path):
    config = probe_config()
    crashed_mid_task(tmp_path, "run", config)
    other = probe_config()
    other.seed = 8
    with pytest.raises((CheckpointError, ConfigError), match="written under another config|cannot change seed"):
        run(tmp_path, "run", other, resume=True)


def test_a_resume_on_changed_data_is_refused(tmp_path):
    config = probe_config()
    crashed_mid_task(tmp_path, "run", config)
    with pytest.raises(CheckpointError, match="the data changed since .* started"):
        run(tmp_path, "run", config, resume=True, records={"benchmark": {"split_sha256": "b" * 64}})


def test_an_old_or_foreign_state_file_is_refused(tmp_path):
    config = probe_config()
    directory = crashed_mid_task(tmp_path, "run", config)
    state = load_checkpoint(directory / "state.pt")
    del state["run"]
    torch.save(state, directory / "state.pt")
    with pytest.raises(CheckpointError, match="is not a run state of norga's format"):
        run(tmp_path, "run", config, resume=True)
