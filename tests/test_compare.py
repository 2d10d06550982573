"""`norga compare`: several methods on one benchmark into one table, plot and record; resumable."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixture import NEEDS_FASHION_MNIST
from engine_fixtures import (
    NUM_TASKS,
    FailingDataset,
    make_tasks,
    on_generated_tasks,
    tiny_config,
)

from norga.cli import main
from norga.commands.compare import entries_of, split_overrides
from norga.comparison import ComparisonDirectory, MethodRun, method_config, run_method
from norga.config import ConfigError, OptimConfig
from norga.runtime.context import TaskDatasets

REAL = os.environ.get("NORGA_DATA")


def norga(*args):
    return subprocess.run([sys.executable, "-m", "norga", *args], capture_output=True, text=True, check=False)


def test_each_method_reads_its_own_section_and_per_method_overrides_win():
    hide = method_config("tiny_smoke", "hide", ["norga.gate=tanh"])
    assert hide.method == "hide" and not hasattr(hide.settings, "gate")  # HiDe-Prompt has no gate to take
    norga_config = method_config("tiny_smoke", "norga", ["norga.gate=tanh"], ["norga.prompt.length=7"])
    assert norga_config.settings.gate == "tanh" and norga_config.settings.prompt.length == 7
    assert method_config("tiny_smoke", "ncm", joint=True).data.joint
    with pytest.raises(ConfigError, match="did you mean 'linear_probe'"):
        method_config("tiny_smoke", "linear_prob")
    with pytest.raises(ConfigError, match="conflicts with --methods"):
        method_config("tiny_smoke", "ncm", ["method=hide"])


def test_overrides_split_into_shared_per_method_and_per_joint_label():
    request = {"methods": ["ncm", "hide"], "joint_upper_bound": ["ncm"]}
    assert entries_of(request) == [("ncm", "ncm", False), ("hide", "hide", False), ("ncm-joint", "ncm", True)]
    shared, per = split_overrides(["seed=3", "ncm:ncm.metric=euclidean", "ncm-joint:seed=4"], ["ncm", "hide", "ncm-joint"])
    assert shared == ["seed=3"] and per == {"ncm": ["ncm.metric=euclidean"], "hide": [], "ncm-joint": ["seed=4"]}


@pytest.mark.parametrize(("arguments", "message"), [
    (["tiny_smoke", "--methods", "ncm,linear_prob"], "did you mean 'linear_probe'"),
    (["tiny_smoke", "--methods", "ncm", "--set", "hide:hide.prompt.length=3"], "'hide' is not one of --methods"),
    (["tiny_smoke", "--methods", "ncm", "--set", "l2p.top_k=3"], "--set l2p.top_k=3 reaches no method of this"),
    (["tiny_smoke", "--methods", "ncm,hide", "--set", "hide.gate=tanh"], "unknown config key 'hide.gate'"),
    (["tiny_smoke", "--methods", "ncm", "--set", "ncm:ncm.metric=cosin"], "did you mean 'cosine'"),
    (["tiny_smoke", "--methods", "ncm", "--set", "ncm-joint:ncm.metric=cosine"], "'ncm-joint' is not one of"),
    (["tiny_smoke", "--methods", "ncm", "--joint-upper-bound", "norga"], "not in --methods"),
    (["tiny_smoke", "--methods", "ncm,ncm"], "lists a method twice"),
    (["tiny_smoke"], "give a preset (or YAML file) and --methods"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, arguments, message):
    assert main(["compare", *arguments, "--dir", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "c").exists()


def test_resume_needs_a_comparison_directory(tmp_path, capsys):
    assert main(["compare", "--resume", str(tmp_path)]) == 2
    assert "not a comparison that can be resumed" in capsys.readouterr().err


def test_an_interrupted_comparison_skips_finished_methods_and_resumes_the_rest(tmp_path, monkeypatch):
    def tasks_for(config, crash=False):
        tasks = make_tasks()
        if crash and config.method == "linear_probe":  # crash in task 2 (after tasks 0 and 1 were checkpointed)
            tasks[2] = TaskDatasets(tasks[2].classes, tasks[2].train, FailingDataset(tasks[2].train_eval, 1), tasks[2].test)
        return tasks

    def runs(directory):
        configs = {"ncm": tiny_config(method="ncm"), "linear_probe": tiny_config(method="linear_probe")}
        configs["linear_probe"].settings.train = OptimConfig(epochs=2, lr=0.01, batch_size=4)
        return [MethodRun(label, config, directory.path / label) for label, config in configs.items()]

    straight = ComparisonDirectory(tmp_path / "straight", {"request": 1})
    on_generated_tasks(monkeypatch, tasks_for)
    expected = run_method(runs(straight)[1])

    crashed = ComparisonDirectory(tmp_path / "crashed", {"request": 1})
    first = run_method(runs(crashed)[0])
    crashed.write([first], complete=False)
    on_generated_tasks(monkeypatch, lambda config: tasks_for(config, crash=True))
    with pytest.raises(RuntimeError, match="injected failure"):
        run_method(runs(crashed)[1])

    on_generated_tasks(monkeypatch, tasks_for)
    again = ComparisonDirectory(tmp_path / "crashed", {"request": 1})
    resumed = [run_method(run, previous_seconds=again.previous_seconds(run.label)) for run in runs(again)]
    assert [r.status for r in resumed] == ["finished earlier", "resumed"]
    assert resumed[0].wall_seconds == first.wall_seconds  # kept from compare.json
    assert (resumed[0].matrix.correct == first.matrix.correct).all()
    assert (resumed[1].matrix.correct == expected.matrix.correct).all()  # as if never interrupted

    changed = runs(again)[0]
    changed.config.settings.metric = "euclidean"
    with pytest.raises(ConfigError, match="ncm.metric: 'cosine' -> 'euclidean'"):
        run_method(changed)
    with pytest.raises(ConfigError, match="another request"):
        ComparisonDirectory(tmp_path / "crashed", {"request": 2})


def test_a_method_run_records_the_precision_asked_for_and_what_it_resolved_to(tmp_path, monkeypatch):
    """`amp: auto` is resolved once, when the run is built: its record (and banner) say auto was asked for and
    what it became here; run again, the method is found finished under the same settings."""
    on_generated_tasks(monkeypatch)
    directory = ComparisonDirectory(tmp_path / "comparison", {"request": 1})

    def ncm_run():
        return MethodRun("ncm", tiny_config(method="ncm", amp="auto"), directory.path / "ncm")

    assert run_method(ncm_run()).status == "ran"
    precision = json.loads((directory.path / "ncm" / "environment.json").read_text())["precision"]
    assert precision["amp_requested"] == "auto"
    assert precision["amp"] == ("bf16" if precision["native_bf16"] else "none")
    assert run_method(ncm_run()).status == "finished earlier"


def by_label_task_il(directory, label: str) -> float:
    return json.loads((directory / label / "results.json").read_text())["task_incremental_accuracy"]


@pytest.mark.realdata
@NEEDS_FASHION_MNIST
def test_compare_on_real_fashion_mnist_writes_table_plot_and_record(tmp_path):
    directory = tmp_path / "cmp"
    result = norga("compare", "tiny_smoke", "--methods", "linear_probe,ncm", "--joint-upper-bound", "ncm",
                   "--set", "linear_probe:linear_probe.train.epochs=2", "--dir", str(directory), "--quiet")
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert table[0].split()[:7] == ["method", "FA", "CA", "FFM", "task-id", "task-IL", "time"]
    rows = {line.split()[0]: line.split() for line in table[1:4]}
    assert set(rows) == {"linear_probe", "ncm", "ncm-joint"}
    assert rows["ncm"][4] == "—" and rows["ncm-joint"][2:6] == ["—", "—", "—", "—"]  # undefined, not invented
    assert float(rows["ncm"][5]) == pytest.approx(by_label_task_il(directory, "ncm"), abs=0.005)
    record = json.loads((directory / "compare.json").read_text())
    assert record["complete"] and [r["label"] for r in record["results"]] == ["linear_probe", "ncm", "ncm-joint"]
    by_label = {r["label"]: r for r in record["results"]}
    for label, row in rows.items():
        assert float(row[1]) == pytest.approx(by_label[label]["metrics"]["final_average_accuracy"], abs=0.005)
        stored = json.loads((directory / label / "results.json").read_text())
        assert stored["metrics"] == by_label[label]["metrics"]
    # same backbone and seed for every method: NCM's joint bound equals its continual result exactly
    assert by_label["ncm-joint"]["metrics"]["final_average_accuracy"] == by_label["ncm"]["metrics"]["final_average_accuracy"]
    assert json.loads((directory / "linear_probe" / "results.json").read_text())["matrices"]["accuracy"]["total"][0][0] == 100
    with open(directory / "compare.csv") as handle:
        assert [r["label"] for r in csv.DictReader(handle)] == ["linear_probe", "ncm", "ncm-joint"]
    assert (directory / "compare.png").stat().st_size > 10_000

    resumed = norga("compare", "--resume", str(directory), "--quiet")  # everything finished: nothing re-runs
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((directory / "compare.json").read_text())["results"] == record["results"][:0] + [
        {**r, "status": "finished earlier"} for r in record["results"]]


def test_a_crash_while_the_last_checkpoint_is_written_never_leaves_a_stale_row(tmp_path, monkeypatch):
    """The disk fills up while linear_probe's last task checkpoint is written: `compare --resume` records the
    row of the whole run (on every later resume too), not the metrics of the tasks before."""
    from norga.engine import run_dir as run_dir_module

    config = tiny_config(method="linear_probe")
    config.settings.train = OptimConfig(epochs=2, lr=0.01, batch_size=4)
    on_generated_tasks(monkeypatch)
    expected = run_method(MethodRun("linear_probe", config, tmp_path / "straight" / "linear_probe"))

    real = run_dir_module.save_checkpoint

    def disk_full_at_the_last_task(state, path):
        if Path(path).name == f"task{NUM_TASKS}.pt":
            raise OSError(28, "No space left on device")
        real(state, path)

    crashed = MethodRun("linear_probe", config, tmp_path / "crashed" / "linear_probe")
    with monkeypatch.context() as patch:
        patch.setattr(run_dir_module, "save_checkpoint", disk_full_at_the_last_task)
        with pytest.raises(OSError, match="space"):
            run_method(crashed)
    for attempt in range(2):
        row = run_method(crashed)
        assert row.status == ("resumed" if attempt == 0 else "finished earlier")
        assert row.metrics == expected.metrics and (row.matrix.correct == expected.matrix.correct).all()
    assert (tmp_path / "crashed" / "linear_probe" / "checkpoints" / f"task{NUM_TASKS}.pt").is_file()
