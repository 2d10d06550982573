"""HiDe-Prompt / NoRGa compat switches for the official code's remaining behaviours: the batch-wise task vote's
tie-break and the task-identity accuracy it reports, and the prompted class statistics' per-class batches."""

import pytest
import torch
from engine_fixtures import NUM_TASKS, TRAIN_PER_CLASS
from test_hide_pipeline import pipeline, run_phases, run_phases_named

from norga.engine.evaluation import evaluate_seen_tasks
from norga.methods.base import PredictRequest
from norga.methods.hide import official_class_order
from norga.metrics import AccuracyMatrix
from norga.runtime.seeding import generator


def voting(tmp_path, monkeypatch, tasks_per_call, **changes):
    """A method whose task-identity model predicts `tasks_per_call(call)` and that records the slots it prompts."""
    engine = pipeline(tmp_path, **{"batchwise_prompt": True, **changes})
    method, used, calls = engine.method, [], iter(range(10**6))
    monkeypatch.setattr(method, "predict_tasks", lambda frozen, seen: tasks_per_call(next(calls), len(frozen)))
    real = method._logits
    monkeypatch.setattr(method, "_logits", lambda images, slots, *rest: used.append(slots.clone()) or real(images, slots,
                                                                                                            *rest))
    return engine, used


@pytest.mark.parametrize(("predicted", "voted"), [([1, 1, 0, 0], 0), ([2, 0, 2, 0, 1], 0), ([2, 1, 2, 1, 0], 1),
                                                  ([2, 2, 1], 2)])
def test_the_batch_vote_breaks_ties_towards_the_lowest_task(tmp_path, monkeypatch, predicted, voted):
    # the official code takes torch.topk of per-task counts padded to the pool size: on CUDA (where its numbers
    # come from) the first of equal counts, i.e. the lowest task; CPU topk may return another ([2, 2, 0, 0] -> 1)
    engine, used = voting(tmp_path, monkeypatch, lambda call, n: torch.tensor(predicted))
    images = torch.stack([engine.context.tasks[0].test[i][0] for i in range(len(predicted))])
    prediction = engine.method.predict(PredictRequest(images, NUM_TASKS))
    assert used[0].tolist() == [voted] * len(predicted)
    assert prediction.tasks.tolist() == predicted  # default: each image's own prediction is what is counted


def test_the_official_task_identity_accuracy_counts_the_voted_slot(tmp_path, monkeypatch):
    # every test batch (3, 3, 2 of each task's 8 images) is predicted tasks 1, 1, 0: the vote prompts it with task 1
    for counts, expected in (("own", [2, 6, 0]), ("voted", [0, 8, 0])):
        engine, _ = voting(tmp_path / counts, monkeypatch, lambda call, n: torch.tensor([1, 1, 0][:n]),
                           task_identity_counts=counts)
        assert [len(engine.context.test_tasks[t].test) for t in range(NUM_TASKS)] == [8, 8, 8]
        accuracy, identity = AccuracyMatrix(NUM_TASKS), AccuracyMatrix(NUM_TASKS)
        evaluate_seen_tasks(engine.context, engine.method, NUM_TASKS - 1, 3, accuracy, identity)
        assert identity.correct[:, NUM_TASKS - 1].tolist() == expected
        assert engine.method.compat()["task_identity_counts"] == counts


def test_official_class_order_is_a_shuffle_of_the_class_rows_alone():
    labels = torch.tensor([3, 5, 3, 3, 5, 7, 3])
    order = official_class_order(labels, 3, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == [0, 2, 3, 6]
    orders = {tuple(official_class_order(labels, 3, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(orders) > 1  # really shuffled


def prompted_stats(engine):
    run_phases(engine, 0, until="prompt_stats")
    run_phases_named(engine, 0, "prompt_stats")
    return engine.method.prompt_gaussians


@pytest.mark.parametrize("batch_size", [3, 8])
def test_official_class_statistics_come_from_per_class_shuffled_training_batches(tmp_path, batch_size):
    changes = {"prefix_layout": "official", "wtp.train.batch_size": batch_size, "eval.batch_size": 5,
               "wtp.train.epochs": 1}
    official = pipeline(tmp_path / "official", class_stats_batches="official", **changes)
    gaussians = prompted_stats(official)
    method, ctx = official.method, official.context
    dataset = ctx.tasks[0].train_eval
    labels = ctx.frozen_train_features(0).labels
    for label in ctx.classes(0):
        order = official_class_order(labels, label, generator(ctx.config.seed, "prompt_stats", 0, label)).tolist()
        assert len(order) == TRAIN_PER_CLASS
        features = []
        for start in range(0, len(order), batch_size):  # the class's images alone, batch by batch
            images = torch.stack([dataset[i][0] for i in order[start:start + batch_size]])
            with torch.no_grad():
                features.append(method.encode(images, 0))
        reference = torch.cat(features).double()
        torch.testing.assert_close(gaussians.means([label])[0].double(), reference.mean(0), rtol=1e-5, atol=1e-6)

    # the default: mixed-class sequential batches of the evaluation batch size, which the official layout
    # turns into other statistics (the same trained prompts: the runs are identical up to this phase)
    default = prompted_stats(pipeline(tmp_path / "default", **changes))
    difference = (default.means(ctx.classes(0)) - gaussians.means(ctx.classes(0))).abs().max()
    assert difference > 1e-3
    assert method.compat()["class_stats_batches"] == "official"


def test_with_the_correct_layout_the_batches_of_the_statistics_do_not_matter(tmp_path):
    changes = {"wtp.train.batch_size": 3, "eval.batch_size": 5, "wtp.train.epochs": 1}
    engine = pipeline(tmp_path / "official", class_stats_batches="official", **changes)
    official = prompted_stats(engine)
    default = prompted_stats(pipeline(tmp_path / "default", **changes))
    classes = engine.context.classes(0)
    scale = float(default.means(classes).abs().max())
    torch.testing.assert_close(official.means(classes), default.means(classes), rtol=0, atol=1e-5 * scale)
