"""What the command line says when something goes wrong: one line naming the problem and the fix, exit 2 for bad
input or an unusable environment, 130 with the resume command for Ctrl-C (on a generated, data-free run)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from cli_fixture import norga, write_config, write_image_folder
from interrupts import sigint_at_default

from norga.cli import one_line


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


NEEDS_UNSHARE = pytest.mark.skipif(not unshare_works(), reason="needs `unshare -Urm` (user + mount namespaces) "
                                   "to mount a read-only or a full file system")


def in_namespace(mount: str) -> tuple[str, ...]:
    """Run the command in a private mount namespace after `mount` (a shell command; $TARGET is the folder)."""
    return ("unshare", "-Urm", "sh", "-c", f'{mount} && exec "$@"', "sh")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished generated run (config, data root) to copy from."""
    root = tmp_path_factory.mktemp("cli")
    data = write_image_folder(root / "data")
    config = write_config(root / "run.yaml", data)
    result = norga("run", config, "--run-dir", root / "finished", "--quiet")
    assert result.returncode == 0, result.stderr
    return root / "finished", config, data


def copy_of(finished, tmp_path):
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d |^  ")  # the banner and timestamped progress lines


def assert_one_line(result, code: int, *fragments: str) -> None:
    """Exit `code` with one line of error on stderr (besides the run's banner and progress lines)."""
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert result.returncode == code and len(lines) == 1, result.stderr[-3000:]
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_resume_of_a_folder_that_is_not_a_run_directory(tmp_path):
    assert_one_line(norga("run", "--resume", tmp_path), 2, "is not a norga run directory", "norga run")
    assert_one_line(norga("run", "tiny_smoke", "--resume", tmp_path), 2, "--resume takes the run directory's own config")


def test_an_unreadable_checkpoint(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / "state.pt").write_bytes(b"not a checkpoint")
    assert_one_line(norga("run", "--resume", run, "--quiet"), 2, f"cannot read checkpoint {run / 'state.pt'}")


def test_a_missing_state_heavy_file(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / "state_heavy.pt").unlink()
    assert_one_line(norga("run", "--resume", run, "--quiet"), 2, "state_heavy.pt is missing", "restore it")


def test_a_resume_may_change_a_learning_rate_and_refuses_other_changes(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    assert_one_line(norga("run", "--resume", run, "--set", "norga.prompt.length=3"), 2,
                    "--resume cannot change norga.prompt.length")
    result = norga("run", "--resume", run, "--set", "norga.wtp.train.lr=0.001", "--quiet")
    assert result.returncode == 0, result.stderr
    changes = json.loads((run / "environment.json").read_text())["resume_changes"]
    assert changes[0]["changes"] == {"norga.wtp.train.lr": {"from": 0.01, "to": 0.001}}


@NEEDS_UNSHARE
def test_a_read_only_run_directory(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    result = norga("run", "--resume", run, "--quiet", prefix=in_namespace(f'mount --bind -o ro "{run}" "{run}"'))
    assert_one_line(result, 2, f"cannot write {run}", "read-only")


@NEEDS_UNSHARE
def test_a_full_disk(finished, tmp_path):
    """The run directory on a 96 kB file system: full before the first task is committed."""
    small = tmp_path / "small"
    small.mkdir()
    result = norga("run", finished[1], "--run-dir", small / "run", "--quiet",
                   prefix=in_namespace(f'mount -t tmpfs -o size=96k tmpfs "{small}"'))
    assert_one_line(result, 2, "no space left on the device", f"then resume with `norga run --resume {small / 'run'}`")


@pytest.mark.parametrize("sets, key", [
    (["norga.prompt.layers=[0,3]"], "norga.prompt.layers"),
    (["method=hide", "hide.prompt.layers=[0,4]"], "hide.prompt.layers"),
])
def test_prompt_blocks_the_backbone_lacks_are_one_line_and_leave_no_run_directory(finished, tmp_path, sets, key):
    run = tmp_path / "run"
    result = norga("run", finished[1], *[arg for value in sets for arg in ("--set", value)], "--run-dir", run, "--quiet")
    assert_one_line(result, 2, f"{key} = [", "does not fit this 1-block backbone", f"--set {key}=[...] to blocks 0..0")
    assert not run.exists()


def test_a_decode_error_in_a_loader_worker_is_one_line_naming_the_file(tmp_path):
    data = write_image_folder(tmp_path / "data")
    broken = data / "train" / "class1" / "2.png"
    broken.write_bytes(b"\x89PNG not really")
    config = write_config(tmp_path / "run.yaml", data)
    result = norga("run", config, "--set", "data.workers=2", "--set", "data.memory_budget_mb=0", "--run-dir",
                   tmp_path / "run", "--quiet")
    assert_one_line(result, 2, f"cannot decode image {broken}", "data.skip_unreadable=true")


def test_ctrl_c_says_how_to_continue(tmp_path):
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path / "run.yaml", data, tii={"mlp_hidden": [1], "train": {"epochs": 500, "lr": 0.001,
                                                                                          "batch_size": 4}})
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "norga", "run", str(config), "--run-dir", str(run), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_at_default)
    deadline = time.monotonic() + 300
    while not (run / "state.pt").is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    errors = [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert errors == [f"norga run: interrupted; continue with `norga run --resume {run}`"]


def test_one_line_of_an_error_raised_in_a_data_loader_worker():
    message = ("Caught UnreadableImageError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
               "last):\n  File \"x.py\", line 3, in f\n    raise\nnorga.data.errors.UnreadableImageError: cannot "
               "decode image a.png: broken; remove it\n")
    assert one_line(ValueError(message)) == "cannot decode image a.png: broken; remove it"
    assert one_line(ValueError("two\n  lines")) == "two lines"
