"""`norga sweep` end to end on a real local Ray instance: a 2 methods x 2 seeds grid on Split Fashion-MNIST at
`tiny_smoke` size, and a trial whose worker is SIGKILLed after a checkpoint, retried by Ray, killed again, and
finished by `--resume` with the same results as the uninterrupted trial."""

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixture import NEEDS_FASHION_MNIST

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[sweep]'")
REAL = os.environ.get("NORGA_DATA")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,
    NEEDS_FASHION_MNIST,
]

GRID = ["tiny_smoke", "--set", "data.test_per_class=20"]
KILLED = "method=norga__seed=0"


def sweep(*args, kill: str | None = None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}  # no outside cluster
    env["HF_HUB_OFFLINE"] = "1"
    if kill is not None:  # MARKER:TIMES, see norga.sweep.executor.KILL_HOOK
        env["NORGA_SWEEP_TEST_KILL"] = f"{KILLED}:{kill}"
    result = subprocess.run([sys.executable, "-m", "norga", "sweep", *args], capture_output=True, text=True, env=env,
                            check=False, timeout=600)
    print(result.stdout, result.stderr[-3000:])
    return result


def manifest(directory: Path) -> dict:
    return {entry["id"]: entry for entry in json.loads((directory / "manifest.json").read_text())["trials"]}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """The uninterrupted 2 x 2 grid (run once for the module)."""
    directory = tmp_path_factory.mktemp("grid") / "sweep"
    result = sweep(*GRID, "--grid", "method=norga,hide", "--grid", "seed=0,1", "--dir", str(directory))
    assert result.returncode == 0, result.stderr
    return directory


def test_a_two_by_two_grid_runs_on_ray_into_four_run_directories_and_aggregates_them(grid):
    trials = manifest(grid)
    assert list(trials) == ["method=norga__seed=0", "method=norga__seed=1", "method=hide__seed=0",
                            "method=hide__seed=1"]
    assert all(t["status"] == "complete" and t["attempts"] == 1 and t["run_status"] == "ran" for t in trials.values())
    runs = {trial_id: results(grid / entry["run_dir"]) for trial_id, entry in trials.items()}
    assert all(r["complete"] for r in runs.values())
    assert {r["method"] for r in runs.values()} == {"norga", "hide"}
    configs = {trial_id: (grid / trial_id / "config.yaml").read_text() for trial_id in trials}
    assert "seed: 1" in configs["method=hide__seed=1"] and "gate" not in configs["method=hide__seed=1"]
    assert "gate: sigmoid" in configs["method=norga__seed=1"]
    with open(grid / "summary.csv") as handle:
        summary = {row["method"]: row for row in csv.DictReader(handle)}
    for method in ("norga", "hide"):
        values = [runs[f"method={method}__seed={seed}"]["metrics"]["final_average_accuracy"] for seed in (0, 1)]
        assert summary[method]["n"] == "2"
        assert float(summary[method]["final_average_accuracy_mean"]) == pytest.approx((values[0] + values[1]) / 2)
        sd = abs(values[0] - values[1]) / 2 ** 0.5
        assert float(summary[method]["final_average_accuracy_sd"]) == pytest.approx(sd)
    with open(grid / "paired.csv") as handle:
        fa = next(row for row in csv.DictReader(handle) if row["metric"] == "final_average_accuracy")
    differences = [runs[f"method=norga__seed={s}"]["metrics"]["final_average_accuracy"]
                   - runs[f"method=hide__seed={s}"]["metrics"]["final_average_accuracy"] for s in (0, 1)]
    assert float(fa["mean_difference"]) == pytest.approx(statistics.fmean(differences)) and fa["n"] == "2"
    assert (grid / "sweep.png").stat().st_size > 10_000
    assert max_concurrent(grid) == 2  # one trial per CPU of the local instance (num_cpus=2), never more


def max_concurrent(directory: Path) -> int:
    """Most trials running at once: each from its attempt record's time stamp to its results.json's last write."""
    spans = []
    for attempt in (directory / ".attempts").glob("*/*"):
        start = int(attempt.name.split("-")[0]) / 1e9
        spans.append((start, (directory / attempt.parent.name / "results.json").stat().st_mtime))
    return max(sum(s <= start < e for s, e in spans) for start, _ in spans)

    before = (grid / "sweep.json").read_text()
    report = sweep("--report", str(grid))  # re-prints and re-plots, runs nothing
    assert report.returncode == 0 and "4 of 4 trials complete" in report.stdout
    assert (grid / "sweep.json").read_text() == before


def same_results(run_dir: Path, reference: Path) -> None:
    got, expected = results(run_dir), results(reference)
    assert got["complete"] and got["metrics"] == expected["metrics"]
    assert got["matrices"] == expected["matrices"]  # accuracy, before-TAP and task-identity matrices, count for count


def test_a_killed_worker_is_retried_by_ray_then_fails_alone_and_resume_finishes_it_with_the_same_results(grid,
                                                                                                       tmp_path):
    directory, marker = tmp_path / "sweep", tmp_path / "killed"
    # killed after its first task, retried by Ray from the checkpoint, killed again after its second task
    first = sweep(*GRID, "--grid", "method=norga", "--grid", "seed=0,1", "--dir", str(directory), "--max-retries", "1",
                  kill=f"{marker}:2")
    assert first.returncode == 1 and "1 of 2 trials failed" in first.stderr
    assert (tmp_path / "killed.1").exists() and (tmp_path / "killed.2").exists()
    trials = manifest(directory)
    killed, other = trials[KILLED], trials["method=norga__seed=1"]
    assert killed["status"] == "failed" and "WorkerCrashedError" in killed["error"] and killed["attempts"] == 2
    assert other["status"] == "complete" and other["attempts"] == 1  # the kills failed only their own trial
    partial = results(directory / KILLED)
    assert not partial["complete"] and partial["tasks_finished"] == 2  # Ray's retry resumed after task 1, not from 0

    resumed = sweep("--resume", str(directory), kill=f"{marker}:2")
    assert resumed.returncode == 0, resumed.stderr
    trials = manifest(directory)
    assert trials[KILLED]["status"] == "complete" and trials[KILLED]["attempts"] == 3
    assert trials[KILLED]["run_status"] == "resumed"  # from the checkpoint, not from scratch
    assert trials["method=norga__seed=1"]["attempts"] == 1  # finished trials are not run again
    same_results(directory / KILLED, grid / KILLED)
    same_results(directory / "method=norga__seed=1", grid / "method=norga__seed=1")


def test_a_python_error_in_a_trial_fails_it_with_its_message_and_is_not_retried(tmp_path):
    directory = tmp_path / "sweep"
    weights = tmp_path / "nowhere.safetensors"  # the config is valid; the worker finds no such file
    result = sweep("tiny_smoke", "--grid", "seed=0", "--set", f"backbone.weights={weights}", "--dir",
                   str(directory), "--max-retries", "2")
    assert result.returncode == 1 and "--resume" in result.stderr
    trial = manifest(directory)["seed=0"]
    assert trial["status"] == "failed" and trial["attempts"] == 1  # deterministic errors are not retried
    assert trial["error"] == f"BackboneLoadError: backbone file {weights} does not exist"
