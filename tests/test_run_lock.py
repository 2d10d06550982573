"""One writer per run (and comparison) directory: a lock held for the run's life names its holder; a killed
holder's lock is taken over; default run names do not collide."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from norga.cli import main
from norga.engine import run_lock
from norga.engine.run_dir import RunDirectory, run_stamp
from norga.engine.run_lock import RunLock, RunLockedError

HOLDER = """
import sys, time
from norga.comparison import ComparisonDirectory
from norga.engine.run_dir import RunDirectory
if sys.argv[2] == "run":
    held = RunDirectory(sys.argv[1])
else:
    held = ComparisonDirectory(sys.argv[1], {"config": "tiny_smoke", "methods": ["ncm"], "joint_upper_bound": [],
                                             "overrides": []}).__enter__()
print("holding", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder():
    """Start a process that locks a directory ("run" or "comparison") and keeps it until killed."""
    processes = []

    def start(directory, kind="run") -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), kind], stdout=subprocess.PIPE,
                                   text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == "holding"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path, holder):
    process = holder(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RunLockedError, match=f"in use by process {process.pid} on {socket.gethostname()}"):
        RunDirectory(tmp_path / "run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # the loser wrote nothing


def test_the_lock_of_a_killed_run_is_recognised_and_taken_over(tmp_path, holder):
    process = holder(tmp_path / "run")
    process.kill()
    process.wait()
    lock = tmp_path / "run" / ".lock"
    assert json.loads(lock.read_text())["pid"] == process.pid  # kill -9 left it behind
    directory = RunDirectory(tmp_path / "run")  # a folder holding nothing but a stale lock counts as empty
    assert json.loads(lock.read_text()) | {"since": None} == {"pid": os.getpid(), "host": socket.gethostname(),
                                                               "since": None}
    directory.close()
    assert not lock.exists()


def test_without_kernel_locks_the_recorded_pid_decides(tmp_path, holder, monkeypatch):
    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    alive = holder(tmp_path / "alive")
    with pytest.raises(RunLockedError, match=f"process {alive.pid}"):
        RunLock(tmp_path / "alive")
    dead = holder(tmp_path / "dead")
    dead.kill()
    dead.wait()
    RunLock(tmp_path / "dead").release()


def test_one_process_cannot_open_a_run_directory_twice(tmp_path):
    first = RunDirectory(tmp_path / "run")
    with pytest.raises(RunLockedError, match="already open in this process"):
        RunDirectory(tmp_path / "run")
    first.close()


def test_default_run_names_of_runs_started_together_differ_and_sort_by_time():
    code = "from norga.engine.run_dir import run_stamp; print(run_stamp())"
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    stamps = [process.communicate()[0].strip() for process in processes]
    assert stamps[0] != stamps[1]
    earlier, later = run_stamp(), None
    while later is None or later[:19] == earlier[:19]:  # wait for the next millisecond
        later = run_stamp()
    assert sorted([later, earlier]) == [earlier, later]


def test_two_comparisons_on_one_directory_cannot_both_run(tmp_path, holder, capsys):
    process = holder(tmp_path / "cmp", kind="comparison")
    assert main(["compare", "--resume", str(tmp_path / "cmp"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"in use by process {process.pid}" in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "cmp" / "ncm").exists()  # nothing trained
