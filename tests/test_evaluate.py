"""Task-incremental accuracy in every run, and `norga evaluate`: a run re-evaluated from its task checkpoints.

References are computed image by image with the method's prompts spelled out, on generated tasks; the
command is run on real Fashion-MNIST where it is present.
"""

import json

import pytest
import torch
from cli_fixture import NEEDS_FASHION_MNIST, norga
from engine_fixtures import NUM_TASKS, build, tiny_config

from norga.config import ConfigError
from norga.engine.evaluation import evaluate_seen_tasks
from norga.engine.loop import open_run
from norga.engine.reevaluate import evaluation_config, reevaluate, write_evaluation
from norga.methods import method_names
from norga.methods.base import PredictRequest
from norga.metrics import AccuracyMatrix

ALL = method_names()
TIE = 1e-4  # logits closer than this (relative) are a near-tie: batch shape alone may flip their argmax


def finished(tmp_path, method="norga", **changes):
    """A finished tiny run's engine (its method holds the final state), as `norga run` leaves it."""
    config = tiny_config(method, **changes)
    engine = open_run(build(config), tmp_path / "run")
    engine.run()
    return engine


def hide_reference(engine, slots: str):
    """Per seen test task: (class-IL correct, task-IL correct, near-ties), image by image, prompts spelled out:
    slot = the task-identity model's argmax task (predicted), the image's own task (true) or none."""
    method, ctx, model = engine.method, engine.context, engine.context.model
    seen_mask = ctx.class_mask_until(NUM_TASKS - 1)
    rows = []
    for task in range(NUM_TASKS):
        correct = within_correct = ties = 0
        for image, label in ctx.test_tasks[task].test:
            image = image[None]
            with torch.inference_mode():
                frozen = model.forward_features(image)
                slot = {"predicted": int(method.predict_tasks(frozen, NUM_TASKS)[0]), "true": task, "none": None}[slots]
                prefixes = {} if slot is None else method.prompts.prefixes(slot, 1)
                logits = model.classify(model.forward_features(image, prefixes=prefixes))[0]
                own = {} if slots == "none" else method.prompts.prefixes(task, 1)
                own_logits = model.classify(model.forward_features(image, prefixes=own))[0]
            seen = logits.masked_fill(~seen_mask, float("-inf"))
            within = own_logits.masked_fill(ctx.class_to_task != task, float("-inf"))
            for scores in (seen, within):
                top = scores.topk(2).values
                ties += bool(top[0] - top[1] < TIE * top.abs().max())
            correct += int(seen.argmax()) == int(label)
            within_correct += int(within.argmax()) == int(label)
        rows.append((correct, within_correct, ties))
    return rows


@pytest.mark.parametrize("method", ["norga", "hide"])
@pytest.mark.parametrize("slots", ["predicted", "true", "none"])
def test_class_and_task_incremental_accuracy_match_an_image_by_image_reference(tmp_path, method, slots):
    engine = finished(tmp_path, method)
    accuracy, within = AccuracyMatrix(NUM_TASKS), AccuracyMatrix(NUM_TASKS)
    evaluate_seen_tasks(engine.context, engine.method, NUM_TASKS - 1, 3, accuracy, within_task=within, slots=slots)
    last = NUM_TASKS - 1
    for task, (correct, within_correct, ties) in enumerate(hide_reference(engine, slots)):
        assert abs(int(accuracy.correct[task, last]) - correct) <= ties
        assert abs(int(within.correct[task, last]) - within_correct) <= ties
    if slots == "predicted":  # what the run itself recorded
        recorded = engine.matrices["task_incremental"]
        assert recorded.correct[:, last].tolist() == within.correct[:, last].tolist()


@pytest.mark.parametrize("method", ALL)
def test_every_method_predicts_within_the_true_task_and_records_task_incremental_accuracy(tmp_path, method):
    engine = finished(tmp_path, method)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    within = engine.matrices["task_incremental"]
    assert results["task_incremental_accuracy"] == pytest.approx(within.final_average_accuracy())
    assert (tmp_path / "run" / "task_incremental_matrix.csv").is_file()
    ctx = engine.context
    images = torch.stack([image for task in range(NUM_TASKS) for image, _ in ctx.test_tasks[task].test])
    given = torch.randint(0, NUM_TASKS, (len(images),), generator=torch.Generator().manual_seed(3))
    for slots in engine.method.slot_modes:
        prediction = engine.method.predict(PredictRequest(images, NUM_TASKS, slots=slots, true_tasks=given))
        assert torch.equal(ctx.class_to_task[prediction.within_task], given), slots  # a class of the given task
        assert (prediction.tasks is not None) == (slots == "predicted" and engine.method.infers_tasks)
    if "true" in engine.method.slot_modes:  # the given task's prompts: the class-IL pass with true slots agrees
        true_pass = engine.method.predict(PredictRequest(images, NUM_TASKS, slots="true", true_tasks=given))
        own = ctx.class_to_task[true_pass.classes] == given
        assert torch.equal(true_pass.within_task[own], true_pass.classes[own])


def test_keyed_methods_with_task_prompts_use_the_given_tasks_slots(tmp_path):
    engine = finished(tmp_path, "dualprompt")
    method, ctx = engine.method, engine.context
    images = torch.stack([image for image, _ in ctx.test_tasks[1].test])
    query = ctx.frozen_encode(images)
    given = torch.tensor([0, 2] * (len(images) // 2))
    out = method.prompted(images, query, NUM_TASKS - 1, train=False, given_tasks=given)
    assert torch.equal(out.tasks.cpu(), given)
    for index in range(len(images)):  # each image alone, its task's slots forced as when training that task
        alone = method.prompted(images[index:index + 1], query[index:index + 1], int(given[index]), train=True)
        assert torch.allclose(alone.logits, out.logits[index:index + 1], rtol=1e-5, atol=1e-6)


def test_a_joint_run_records_no_task_incremental_accuracy(tmp_path):
    engine = finished(tmp_path, "ncm", **{"data.joint": True})
    assert "task_incremental" not in engine.matrices
    assert json.loads((tmp_path / "run" / "results.json").read_text())["task_incremental_accuracy"] is None


# ------------------------------------------------------------------ re-evaluation
def reevaluated(run_dir, overrides=(), **kwargs):
    stored, config, changes = evaluation_config(run_dir, list(overrides))
    return reevaluate(run_dir, build(config), stored, changes, **kwargs)


@pytest.mark.parametrize("method", ALL)
def test_reevaluating_a_checkpoint_with_the_runs_settings_gives_the_runs_own_column(tmp_path, method):
    engine = finished(tmp_path, method)
    run_dir = tmp_path / "run"
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    for task in (0, NUM_TASKS - 1):
        evaluation = reevaluated(run_dir, task=task)
        for name, values in evaluation.accuracies.items():
            assert values == engine.matrices[name].accuracies()[:task + 1, task].tolist(), (name, task)
        assert evaluation.recorded == evaluation.accuracies
    write_evaluation(evaluation)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before  # untouched
    record = json.loads(next((run_dir / "evaluations").glob("task3-predicted-*.json")).read_text())
    assert record["average"]["accuracy"] == pytest.approx(engine.matrices["accuracy"].final_average_accuracy())
    assert [row["images"] for row in record["per_task"]] == [8, 8, 8]


def test_the_correct_layout_does_not_depend_on_the_test_batch_size_and_the_official_one_does(tmp_path):
    finished(tmp_path, "norga", **{"wtp.train.lr": 0.5, "prompt.length": 4})  # prompts far from their start
    run_dir = tmp_path / "run"
    correct = [reevaluated(run_dir, [f"eval.batch_size={size}"]).accuracies for size in (1, 3, 24)]
    assert correct[0] == correct[1] == correct[2]
    official = [reevaluated(run_dir, [f"eval.batch_size={size}", "norga.prefix_layout=official"]).accuracies
                for size in (1, 3, 24)]
    assert official[0] != official[2] or official[0] != official[1]


def test_an_evaluation_may_not_change_what_was_trained_nor_use_slots_the_method_lacks(tmp_path):
    finished(tmp_path, "ncm")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"evaluate cannot change ncm.metric: .* may change only eval\.\*"):
        reevaluated(run_dir, ["ncm.metric=euclidean"])
    with pytest.raises(ConfigError, match="--slots true: ncm has predicted only"):
        reevaluated(run_dir, slots="true")
    with pytest.raises(ConfigError, match="--task 5: the run has tasks 1 to 3"):
        reevaluated(run_dir, task=4)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    finished(tmp_path / "a", "ncm")
    finished(tmp_path / "b", "ncm")
    other = (tmp_path / "b" / "run" / "checkpoints" / "task2.pt").read_bytes()
    (tmp_path / "a" / "run" / "checkpoints" / "task2.pt").write_bytes(other)
    with pytest.raises(Exception, match="belongs to another run"):
        reevaluated(tmp_path / "a" / "run", task=1)


def test_a_checkpoint_without_the_class_statistics_is_refused_not_evaluated_without_them(tmp_path):
    finished(tmp_path, "norga")
    path = tmp_path / "run" / "checkpoints" / "task3.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["prompt_gaussians"]
    torch.save(checkpoint, path)
    with pytest.raises(Exception, match="task3.pt lacks prompt_gaussians"):
        reevaluated(tmp_path / "run")


@NEEDS_FASHION_MNIST
def test_norga_evaluate_prints_the_table_writes_the_record_and_refuses_bad_requests(tmp_path):
    run_dir = tmp_path / "run"
    small = ["--set", "data.num_tasks=2", "--set", "data.train_per_class=10", "--set", "data.test_per_class=20"]
    assert norga("run", "tiny_smoke", *small, "--run-dir", str(run_dir), "--quiet").returncode == 0
    results = json.loads((run_dir / "results.json").read_text())
    shown = norga("evaluate", str(run_dir), "--quiet")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"{run_dir} after task 2/2, slots predicted, the run's own settings"
    assert lines[1].split() == ["task", "images", "class-IL", "task-IL", "task-id"]
    mean = lines[4].split()
    assert mean[:2] == ["mean", "200"]
    assert float(mean[2]) == pytest.approx(results["metrics"]["final_average_accuracy"], abs=0.005)
    assert float(mean[3]) == pytest.approx(results["task_incremental_accuracy"], abs=0.005)
    assert float(mean[4]) == pytest.approx(results["task_identity_accuracy"], abs=0.005)
    assert lines[-1].startswith(f"written: {run_dir}/evaluations/task2-predicted-")
    none = norga("evaluate", str(run_dir), "--slots", "none", "--task", "1", "--set", "eval.batch_size=7", "--quiet")
    assert none.returncode == 0, none.stderr
    assert none.stdout.splitlines()[0] == f"{run_dir} after task 1/2, slots none, eval.batch_size=7"
    record = json.loads(next((run_dir / "evaluations").glob("task1-none-*.json")).read_text())
    assert record["changed_settings"] == {"eval.batch_size": {"run": 256, "evaluation": 7}}
    for arguments, message in [(["--set", "norga.wtp.train.lr=0.1"], "evaluate cannot change norga.wtp.train.lr"),
                               (["--task", "3"], "--task 3: the run has tasks 1 to 2"),
                               (["--task", "0"], "--task 0: tasks count from 1")]:
        refused = norga("evaluate", str(run_dir), *arguments)
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.splitlines()) == 1
    refused = norga("evaluate", str(tmp_path))
    assert refused.returncode == 2 and "is not a norga run directory" in refused.stderr
