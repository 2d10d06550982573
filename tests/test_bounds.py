"""Lower bounds (linear_probe, ncm) and the joint-training upper bound on the tiny generated benchmark."""

import json

import pytest
import torch
from engine_fixtures import (
    CLASSES_PER_TASK,
    NUM_TASKS,
    TEST_PER_CLASS,
    make_engine,
    tiny_config,
)

from norga.config import OptimConfig
from norga.engine.run_dir import RunDirectory
from norga.methods.ncm import class_mean, nearness

NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK


def engine_for(tmp_path, config, name="run", tasks=None):
    directory = RunDirectory(tmp_path / name)
    directory.write_config(config)
    return make_engine(config, directory, tasks)


@pytest.mark.parametrize("method", ["linear_probe", "ncm"])
def test_lower_bounds_train_and_evaluate_every_task(tmp_path, method):
    config = tiny_config(method=method)
    if method == "linear_probe":
        config.settings.train = OptimConfig(epochs=2, lr=0.01, batch_size=4)
    matrices = engine_for(tmp_path, config).run()
    accuracy = matrices["accuracy"]
    assert (accuracy.total[:, -1] == CLASSES_PER_TASK * TEST_PER_CLASS).all()
    assert all(accuracy.total[i, t] > 0 for t in range(NUM_TASKS) for i in range(t + 1))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == method and results["complete"] and results["joint"] is False
    assert results["task_identity_accuracy"] is None  # no task inference: reported as such, not as 0
    assert "task_identity" not in matrices and not (tmp_path / "run" / "task_identity_matrix.csv").exists()
    assert results["metrics"]["final_average_accuracy"] == pytest.approx(accuracy.final_average_accuracy())
    for name in ("accuracy_matrix.png", "accuracy_curve.png", f"checkpoints/task{NUM_TASKS}.pt"):
        assert (tmp_path / "run" / name).is_file(), name


def slow_nearest_mean(train_x, train_y, test_x, seen_classes, metric):
    """Nearest class mean written out with loops in float64."""
    means = {}
    for label in seen_classes:
        rows = [x / x.norm() if metric == "cosine" else x for x, y in zip(train_x, train_y) if int(y) == label]
        means[label] = sum(rows) / len(rows)
    predictions = []
    for x in test_x:
        scores = {}
        for label, m in means.items():
            scores[label] = float(x @ m / (x.norm() * m.norm())) if metric == "cosine" else -float(((x - m) ** 2).sum())
        predictions.append(max(scores, key=scores.get))
    return torch.tensor(predictions)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_equals_a_hand_computed_nearest_mean(tmp_path, metric):
    config = tiny_config(method="ncm", **{"metric": metric})
    engine = engine_for(tmp_path, config)
    matrices = engine.run()
    model, tasks = engine.context.model, engine.context.tasks

    def features(dataset):
        images, labels = dataset.tensors
        with torch.no_grad():
            return model.forward_features(images).double(), labels

    train = [features(task.train_eval) for task in tasks]
    for t in range(NUM_TASKS):
        seen = [c for task in tasks[: t + 1] for c in task.classes]
        train_x = torch.cat([x for x, _ in train[: t + 1]])
        train_y = torch.cat([y for _, y in train[: t + 1]])
        for i in range(t + 1):
            test_x, test_y = features(tasks[i].test)
            expected = slow_nearest_mean(train_x, train_y, test_x, seen, metric)
            assert matrices["accuracy"].correct[i, t] == int((expected == test_y).sum()), (i, t)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_scores_match_their_definition(metric):
    features, means = torch.randn(7, 5), torch.randn(4, 5)
    scores = nearness(features, means, metric)
    for n in range(7):
        for c in range(4):
            if metric == "cosine":
                expected = torch.dot(features[n], means[c]) / (features[n].norm() * means[c].norm())
            else:
                expected = -((features[n] - means[c]) ** 2).sum()
            assert scores[n, c] == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
    members = torch.randn(6, 5)
    expected = sum(m / m.norm() for m in members) / 6 if metric == "cosine" else members.mean(0)
    assert torch.allclose(class_mean(members, metric), expected, atol=1e-6)
    with pytest.raises(ValueError, match="choose one of"):
        class_mean(members, "manhattan")


def test_linear_probe_learns_the_separable_benchmark_and_masks_other_tasks(tmp_path):
    config = tiny_config(method="linear_probe")
    config.settings.train = OptimConfig(epochs=15, lr=0.05, batch_size=4)
    heads = []
    engine = engine_for(tmp_path, config)
    engine.after_epoch = lambda position: heads.append(engine.method.head.weight.detach().clone()) \
        if position.phase == 1 and position.epoch == 0 else None
    initial = engine.method.head.weight.detach().clone()
    matrices = engine.run()
    assert matrices["accuracy"].accuracies()[0, 0] > 90  # each task alone is easy
    assert matrices["accuracy"].final_average_accuracy() > 60  # and chance over the 6 seen classes is 16.7
    assert len(heads) == NUM_TASKS
    for t, head in enumerate(heads):  # official train_mask: only the current task's rows learn
        before = heads[t - 1] if t else initial
        for label in range(NUM_CLASSES):
            moved = not torch.equal(head[label], before[label])
            assert moved == (label in engine.context.classes(t)), (t, label)


def test_linear_probe_augmented_views_go_through_the_frozen_backbone(tmp_path):
    config = tiny_config(method="linear_probe", **{"augment": True})
    config.settings.train = OptimConfig(epochs=3, lr=0.01, batch_size=4)
    engine = engine_for(tmp_path, config)
    engine.run()
    train_images = sum(len(task.train) for task in engine.context.tasks)
    assert engine.context.frozen_images_encoded >= 3 * train_images  # fresh views every epoch, not the cache
