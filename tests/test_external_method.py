"""A method published by another package (tests/external_method/: one module and one entry point) is installed and
run by `norga run` with no edit to any file of norga."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixture import NEEDS_FASHION_MNIST

PACKAGE = Path(__file__).with_name("external_method")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package installed (metadata and entry point included) into a folder of its own."""
    source, target = tmp_path_factory.mktemp("source") / PACKAGE.name, tmp_path_factory.mktemp("site")
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


def norga(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "norga", *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_entry_point_registers_the_method_with_its_settings(installed):
    listed = norga(installed, "methods", "majority_vote")
    assert listed.returncode == 0, listed.stderr
    assert "majority_vote.smoothing" in listed.stdout
    without = subprocess.run([sys.executable, "-m", "norga", "methods", "majority_vote"], capture_output=True,
                             text=True)
    assert without.returncode == 2 and "unknown method 'majority_vote'" in without.stderr  # only when installed


@pytest.mark.realdata
@NEEDS_FASHION_MNIST
def test_norga_run_runs_the_installed_method(installed, tmp_path):
    run_dir = tmp_path / "run"
    result = norga(installed, "run", "quickstart", "--set", "method=majority_vote", "--set",
                   "majority_vote.smoothing=0.5", "--set", "data.train_per_class=3", "--set",
                   "data.test_per_class=2", "--run-dir", str(run_dir), "--quiet")
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "majority_vote" and results["settings"] == {"smoothing": 0.5}
    assert results["tasks_finished"] == 5
    # 3 training images in every class: every image gets the seen class of lowest index, which is right on half of
    # its task's test images and on none of the other four tasks' (FA 10); given the true task, the task's class of
    # lower index, right on half of every task's (task-IL 50)
    assert results["metrics"]["final_average_accuracy"] == pytest.approx(10.0)
    assert results["task_incremental_accuracy"] == pytest.approx(50.0)
