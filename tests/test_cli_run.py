"""`norga run` and `norga presets` from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixture import NEEDS_FASHION_MNIST

REAL = os.environ.get("NORGA_DATA")


def norga(*args, env=None):
    return subprocess.run([sys.executable, "-m", "norga", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_presets_listing_and_one_preset():
    listing = norga("presets")
    assert listing.returncode == 0
    assert "cifar100_sup21k_norga" in listing.stdout and "imr_mocov3_hide" in listing.stdout
    shown = norga("presets", "cifar100_sup21k_norga")
    assert "gate: sigmoid" in shown.stdout and "epochs: 80" in shown.stdout


def test_user_errors_exit_2_with_one_line(tmp_path):
    unknown = norga("run", "cifar100_sup21k_norg")
    assert unknown.returncode == 2 and "did you mean 'cifar100_sup21k_norga'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    missing = norga("run", "tiny_smoke", "--run-dir", str(tmp_path / "r"), env={"NORGA_DATA": str(tmp_path)})
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's Fashion-MNIST is installed, so the data is never missing here")
    assert missing.returncode == 2 and "fashion-mnist not found" in missing.stderr and "dataset-fashion-mnist" in missing.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


@pytest.mark.realdata
@NEEDS_FASHION_MNIST
def test_smoke_run_on_real_fashion_mnist_and_resume_refuses_a_finished_overwrite(tmp_path):
    run_dir = tmp_path / "smoke"
    result = norga("run", "tiny_smoke", "--run-dir", str(run_dir), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "FA " in result.stdout and "task-identity" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks_finished"] == 5 and 0 <= results["metrics"]["final_average_accuracy"] <= 100
    assert json.loads((run_dir / "environment.json").read_text())["benchmark"]["test_images"] == 500
    again = norga("run", "tiny_smoke", "--run-dir", str(run_dir))
    assert again.returncode == 2 and "already exists" in again.stderr
    resumed = norga("run", "--resume", str(run_dir), "--quiet")  # a finished run resumes to the same results
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "results.json").read_text())["metrics"] == results["metrics"]


@pytest.mark.realdata
@pytest.mark.skipif(not os.environ.get("NORGA_CIFAR10_JPG"),
                    reason="CIFAR-10 JPEG folders absent: set NORGA_CIFAR10_JPG (.ci/run extracts them)")
def test_smoke_run_on_real_cifar10_two_tasks(tmp_path):
    run_dir = tmp_path / "c10"
    result = norga("run", "tiny_smoke", "--set", "data.benchmark=cifar10", "--set", "data.num_tasks=2",
                   "--set", "data.train_per_class=10", "--set", "data.test_per_class=10", "--run-dir", str(run_dir),
                   "--quiet", env={"NORGA_DATA": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks_finished"] == 2 and len(results["matrices"]["accuracy"]["accuracy"]) == 2
    record = json.loads((run_dir / "environment.json").read_text())["benchmark"]
    assert record["name"] == "cifar10" and record["train_images"] == 100 and record["test_images"] == 100
