"""The joint-training upper bound: one training step on the union of all tasks, evaluated on every task."""

import json

import numpy as np
import pytest
import torch
from engine_fixtures import (
    CLASSES_PER_TASK,
    NUM_TASKS,
    TEST_PER_CLASS,
    TINY,
    TRAIN_PER_CLASS,
    make_tasks,
    on_generated_tasks,
    tiny_config,
)
from engine_fixtures import make_engine as fixture_engine

from norga.engine.joint import joint_task
from norga.engine.run_dir import RunDirectory
from norga.metrics import AccuracyMatrix

NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK


def make_engine(tmp_path, config, name="run"):
    directory = RunDirectory(tmp_path / name)
    directory.write_config(config)
    return fixture_engine(config, directory)


def test_joint_task_is_the_union_of_all_tasks():
    tasks = make_tasks()
    union = joint_task(tasks)
    assert union.classes == list(range(NUM_CLASSES))
    assert len(union.train) == NUM_CLASSES * TRAIN_PER_CLASS and len(union.test) == NUM_CLASSES * TEST_PER_CLASS
    image, label = union.train[len(tasks[0].train)]  # first image of task 1
    assert torch.equal(image, tasks[1].train[0][0]) and label == tasks[1].train[0][1]


def test_joint_matrix_metrics_by_hand(tmp_path):
    matrix = AccuracyMatrix(3, joint=True)
    for task, (correct, total) in enumerate([(9, 10), (6, 10), (30, 40)]):
        matrix.update(task, 0, correct, total)
    assert matrix.accuracies().shape == (3, 1)
    assert matrix.final_average_accuracy() == pytest.approx((90 + 60 + 75) / 3)
    assert matrix.sample_weighted_final_accuracy() == pytest.approx(100 * 45 / 60)
    assert matrix.cumulative_average_accuracy() is None and matrix.forgetting() is None
    assert matrix.backward_transfer() is None
    with pytest.raises(IndexError, match="outside the seen part"):
        matrix.update(0, 1, 1, 2)
    again = AccuracyMatrix.from_dict(json.loads(json.dumps(matrix.to_dict())))
    assert again.joint and np.array_equal(again.correct, matrix.correct)
    matrix.to_csv(tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text().splitlines()[:2] == ["test_task,after_joint_training", "1,90.0000"]


@pytest.mark.parametrize("method", ["linear_probe", "norga"])
def test_joint_run_trains_once_on_the_union_and_evaluates_every_task(tmp_path, method):
    config = tiny_config(method=method, **{"data.joint": True})
    engine = make_engine(tmp_path, config)
    phases_run, run_phase = [], engine.method.run_phase
    engine.method.run_phase = lambda task, phase, *rest: (phases_run.append(task), run_phase(task, phase, *rest))
    prompts = getattr(engine.method, "prompts", None)
    slots_before = [slot.detach().clone() for slot in prompts.pool.slots] if method == "norga" else []
    matrices = engine.run()

    assert set(phases_run) == {0}  # one training step
    assert engine.context.classes(0) == list(range(NUM_CLASSES))  # on the union of all classes
    accuracy = matrices["accuracy"]
    assert accuracy.accuracies().shape == (NUM_TASKS, 1)
    assert (accuracy.total[:, 0] == CLASSES_PER_TASK * TEST_PER_CLASS).all()  # every original test set
    assert "task_identity" not in matrices  # one task: task identity is trivial, so not recorded
    if method == "norga":  # one training task: the method holds one prompt slot, and it learns
        slots = prompts.pool.slots
        assert len(slots) == 1 and not torch.equal(slots[0].detach(), slots_before[0])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["joint"] and results["complete"] and results["tasks_finished"] == NUM_TASKS
    metrics = results["metrics"]
    assert metrics["final_average_accuracy"] == pytest.approx(accuracy.accuracies()[:, 0].mean())
    assert metrics["cumulative_average_accuracy"] is None and metrics["forgetting"] is None
    assert metrics["backward_transfer"] is None and results["task_identity_accuracy"] is None
    assert "undefined" in results["note"]
    assert (tmp_path / "run" / "accuracy_matrix.csv").read_text().startswith("test_task,after_joint_training")
    assert (tmp_path / "run" / "checkpoints" / "task1.pt").is_file()


def test_joint_ncm_equals_the_final_column_of_continual_ncm(tmp_path):
    """Class means do not depend on the order classes arrive in: NCM's joint bound is its continual result."""
    continual = make_engine(tmp_path, tiny_config(method="ncm"), "continual").run()
    joint = make_engine(tmp_path, tiny_config(method="ncm", **{"data.joint": True}), "joint").run()
    assert np.array_equal(joint["accuracy"].correct[:, 0], continual["accuracy"].correct[:, -1])


def test_norga_run_prints_undefined_metrics_as_dashes(tmp_path, monkeypatch, capsys):
    from norga.cli import main

    on_generated_tasks(monkeypatch)
    assert main(["run", str(TINY), "--set", "method=ncm", "--set", "data.joint=true", "--run-dir",
                 str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "task   joint" in out and "CA —  FFM —  task-identity —" in out
    assert len([line for line in out.splitlines() if line[:4].strip().isdigit()]) == NUM_TASKS  # a row per task
