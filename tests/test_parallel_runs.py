"""Several runs at once (`norga.comparison.run_methods`, `norga quickstart`, `norga compare --jobs`): each in its own
process with a share of the CPUs, giving what the same runs give one after another."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_fixture import NEEDS_FASHION_MNIST, REAL, norga
from interrupts import sigint_at_default

from norga.comparison import MethodRun, method_config, run_methods, threads_per_job
from norga.config import ConfigError

#: the CI-sized preset on real Fashion-MNIST (a 2-block random ViT): seconds per run
SMOKE = ("tiny_smoke", ["data.train_per_class=10", "data.test_per_class=10"])


def smoke_runs(directory, methods=("norga", "hide")) -> list[MethodRun]:
    preset, overrides = SMOKE
    return [MethodRun(method, method_config(preset, method, [*overrides, f"data.root={REAL}"]), directory / method)
            for method in methods]


def test_the_cpus_are_shared_between_jobs_and_each_gets_at_least_one():
    cpus = len(os.sched_getaffinity(0))
    assert threads_per_job(1) == cpus
    assert threads_per_job(cpus) == 1 and threads_per_job(cpus + 5) == 1
    assert threads_per_job(2) == max(1, cpus // 2)


def test_fewer_than_one_job_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        run_methods(smoke_runs(tmp_path), jobs=0)
    assert not any(tmp_path.iterdir())
    result = norga("quickstart", "--jobs", "0", "--output-dir", tmp_path / "runs")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "norga quickstart: error: --jobs must be at least 1, got 0"]


@pytest.mark.realdata
@NEEDS_FASHION_MNIST
def test_runs_in_parallel_processes_give_the_results_of_the_same_runs_in_turn(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_job(2))  # the same threads in turn as each process gets
    try:
        in_turn = run_methods(smoke_runs(tmp_path / "in-turn"), jobs=1, quiet=True)
    finally:
        torch.set_num_threads(threads)
    finished = []
    parallel = run_methods(smoke_runs(tmp_path / "parallel"), jobs=2, on_result=lambda done: finished.append(
        [result.label for result in done]))
    assert [r.label for r in parallel] == ["norga", "hide"] and [r.status for r in parallel] == ["ran", "ran"]
    for one, other in zip(in_turn, parallel):
        assert other.matrix.to_dict() == one.matrix.to_dict() and other.metrics == one.metrics
        assert other.run_dir.parent.name == "parallel"
    assert finished[-1] == ["norga", "hide"] and len(finished) <= 2  # told after each finished run, in run order
    for run_dir in (result.run_dir for result in parallel):  # each process ran with its share of the CPUs
        threads_line = f"{threads_per_job(2)} thread{'s' * (threads_per_job(2) != 1)}"
        assert threads_line in (run_dir / "log.txt").read_text()
    again = run_methods(smoke_runs(tmp_path / "parallel"), jobs=2)  # finished runs are not run again
    assert [r.status for r in again] == ["finished earlier"] * 2


@pytest.mark.realdata
@NEEDS_FASHION_MNIST
def test_a_run_failing_in_its_process_fails_the_whole_call_with_its_own_error(tmp_path):
    runs = smoke_runs(tmp_path)
    runs[1].run_dir.mkdir(parents=True)
    (runs[1].run_dir / "notes.txt").write_text("not a run")  # files but no checkpoint: refused, never overwritten
    with pytest.raises(FileExistsError, match="holds files but no checkpoint"):
        run_methods(runs, jobs=2)
    assert (runs[1].run_dir / "notes.txt").read_text() == "not a run"


@pytest.mark.realdata
@NEEDS_FASHION_MNIST
def test_compare_with_jobs_writes_every_row_of_its_runs_in_parallel(tmp_path):
    preset, overrides = SMOKE
    settings = [arg for setting in overrides for arg in ("--set", setting)]
    result = norga("compare", preset, "--methods", "norga,ncm", *settings, "--dir", tmp_path / "cmp", "--jobs", "2",
                   env={"NORGA_DATA": REAL})
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert record["complete"] and [row["label"] for row in record["results"]] == ["norga", "ncm"]
    assert all((tmp_path / "cmp" / label / "results.json").is_file() for label in ("norga", "ncm"))
    assert (tmp_path / "cmp" / "compare.csv").read_text().count("\n") == 3  # header and both rows


@pytest.mark.realdata
@NEEDS_FASHION_MNIST
def test_ctrl_c_stops_every_parallel_run_and_leaves_them_resumable(tmp_path):
    """Ctrl-C reaches the whole process group: every run stops at once (not after its 50 epochs), the command says it
    was interrupted and exits 130, no worker is left running, and each run directory is there to resume."""
    preset, overrides = SMOKE
    settings = [arg for setting in [*overrides, "norga.wtp.train.epochs=50", "hide.wtp.train.epochs=50"]
                for arg in ("--set", setting)]
    command = [sys.executable, "-m", "norga", "compare", preset, "--methods", "norga,hide", *settings, "--dir",
               str(tmp_path / "cmp"), "--jobs", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=sigint_at_default,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "NORGA_DATA": REAL, "PYTHONUNBUFFERED": "1"})
    try:
        training = set()
        for line in process.stderr:  # progress lines, until both runs are under way, training
            if "wtp_train epoch" in line:
                training.add(line.split(" · ")[0].split()[-1])
            if training == {"norga", "hide"}:
                break
        assert training == {"norga", "hide"}, "the runs ended before both were seen training"
        interrupted = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert time.monotonic() - interrupted < 30  # 50 epochs each would take minutes
        said = [line for line in stderr.splitlines() if line.startswith("norga compare: interrupted")]
        assert process.returncode == 130 and len(said) == 1, stderr[-2000:]
        assert group_gone(process.pid, within=10)  # no worker left; the fork server follows its parent out
        for label in ("norga", "hide"):  # each run stopped where `norga compare --resume` continues it
            assert (tmp_path / "cmp" / label / "config.yaml").is_file()

    finally:  # whatever failed above, nothing of it keeps running
        if not group_gone(process.pid, within=0):
            os.killpg(process.pid, signal.SIGKILL)

def group_gone(group: int, within: float) -> bool:
    """Whether process group `group` has no process left within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
