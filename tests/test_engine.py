"""The HiDe-Prompt / NoRGa pipeline end to end on a generated 3-task benchmark and a tiny ViT."""

import json
from dataclasses import replace

import pytest
import torch
from engine_fixtures import (
    CLASSES_PER_TASK,
    NUM_TASKS,
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    FailingDataset,
    build,
    make_engine,
    make_tasks,
    tiny_config,
)

from norga.config import OptimConfig
from norga.engine.loop import run_experiment
from norga.engine.run_dir import RunDirectory
from norga.methods.hide import TAPConfig
from norga.runtime.context import TaskDatasets

NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK


def run(tmp_path, name="run", config=None, tasks=None, records=None, **kwargs):
    built = build(config or tiny_config(), tasks)
    return run_experiment(built if records is None else replace(built, records=records), tmp_path / name, **kwargs)


@pytest.mark.parametrize(("method", "gate"), [("norga", "sigmoid"), ("hide", "none")])
def test_every_phase_runs_and_the_run_directory_is_complete(tmp_path, method, gate):
    matrices = run(tmp_path, config=tiny_config(method))
    accuracy = matrices["accuracy"].accuracies()
    assert accuracy.shape == (NUM_TASKS, NUM_TASKS)
    upper = [(i, t) for t in range(NUM_TASKS) for i in range(t + 1)]
    assert all(0 <= accuracy[i, t] <= 100 for i, t in upper)
    assert all(accuracy[i, t] == 0 for t in range(NUM_TASKS) for i in range(t + 1, NUM_TASKS))
    before = matrices["before_tap"].accuracies()
    assert before[0, 0] == 0 and before[:2, 1].sum() > 0  # no TAP (so no before-TAP eval) after task 0
    directory = tmp_path / "run"
    for name in ("config.yaml", "results.json", "accuracy_matrix.csv", "before_tap_matrix.csv",
                 "task_identity_matrix.csv", "accuracy_matrix.png", "accuracy_curve.png", "log.txt", "state.pt",
                 *(f"checkpoints/task{t + 1}.pt" for t in range(NUM_TASKS))):
        assert (directory / name).is_file(), name
    results = json.loads((directory / "results.json").read_text())
    assert results["tasks_finished"] == NUM_TASKS and results["gate"] == gate
    assert results["compat"]["prefix_layout"] == "correct" and results["settings"] == json.loads(
        json.dumps(__import__("dataclasses").asdict(tiny_config(method).settings)))
    fa = results["metrics"]["final_average_accuracy"]
    assert fa == pytest.approx(accuracy[:, -1].mean())


def test_it_learns_the_generated_benchmark(tmp_path):
    """Separable class templates: final and task-identity accuracy far above chance (1/6), and TAP helps."""
    config = tiny_config(**{"wtp.train.lr": 0.05, "wtp.head_lr_scale": 1.0, "wtp.train.epochs": 5})
    config.settings.tii.train = OptimConfig(epochs=8, lr=1e-2, batch_size=4)
    config.settings.tii.tap = TAPConfig(epochs=5, lr=0.05, samples_per_class=16)
    config.settings.wtp.tap = TAPConfig(epochs=5, lr=0.05, samples_per_class=16)
    matrices = run(tmp_path, config=config)
    last = NUM_TASKS - 1
    assert matrices["accuracy"].final_average_accuracy(last) > 70
    assert matrices["task_identity"].final_average_accuracy(last) > 70
    assert matrices["accuracy"].final_average_accuracy(last) > matrices["before_tap"].final_average_accuracy(last)


def test_resume_after_a_crash_mid_epoch_gives_identical_results(tmp_path):
    config = tiny_config()
    uninterrupted = run(tmp_path, "straight", config)

    tasks = make_tasks()
    # reads of task 1's augmented training set: 2 TII epochs + 1 WTP epoch, then crash inside WTP epoch 2
    per_epoch = CLASSES_PER_TASK * TRAIN_PER_CLASS
    failing = FailingDataset(tasks[1].train, fail_at=3 * per_epoch + per_epoch // 2)
    tasks[1] = TaskDatasets(tasks[1].classes, failing, tasks[1].train_eval, tasks[1].test)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tmp_path, "crashed", config, tasks=tasks)
    state, _ = RunDirectory(tmp_path / "crashed", create=False).load_state()
    assert state["position"]["task"] == 1 and state["position"]["epoch"] == 1  # mid-task, after WTP epoch 1
    resumed = run(tmp_path, "crashed", config, resume=True)
    for name in uninterrupted:
        assert torch.equal(torch.as_tensor(uninterrupted[name].accuracies()), torch.as_tensor(resumed[name].accuracies())), name


def test_frozen_backbone_encodes_each_image_once(tmp_path):
    config = tiny_config(**{"tii.augment": False, "tii.train.epochs": 3})
    tasks = make_tasks()
    engine = make_engine(config, tmp_path / "cache", tasks)
    engine.run()
    distinct = NUM_TASKS * CLASSES_PER_TASK * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    assert engine.context.frozen_images_encoded == distinct

    config = tiny_config(**{"tii.augment": False, "tii.train.epochs": 3, "cache_frozen_features": False})
    uncached = make_engine(config, tmp_path / "nocache", tasks)
    uncached.run()
    assert uncached.context.frozen_images_encoded > 2 * distinct


def test_existing_run_directory_is_not_overwritten(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="norga run --resume"):
        run(tmp_path, "taken")
    with pytest.raises(FileNotFoundError, match="not a run directory that can be resumed"):
        run(tmp_path, "nothing_here", resume=True)


def test_environment_is_recorded(tmp_path):
    config = tiny_config(**{"wtp.train.epochs": 1, "tii.train.epochs": 1})
    run(tmp_path, config=config, records={"backbone": {"sha256": "abc"}})
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["torch"] == torch.__version__ and environment["backbone"] == {"sha256": "abc"}


def test_nan_loss_stops_with_a_clear_error_and_the_last_checkpoint_intact(tmp_path):
    tasks = make_tasks()
    images, labels = tasks[1].train.tensors
    poisoned = torch.utils.data.TensorDataset(torch.full_like(images, float("nan")), labels)
    tasks[1] = TaskDatasets(tasks[1].classes, poisoned, tasks[1].train_eval, tasks[1].test)
    with pytest.raises(FloatingPointError, match=r"training loss became nan in epoch 1: lower norga.tii.train.lr .*or check "
                       r"the data; the last checkpoint \(task 2, before phase tii_train\) is intact"):
        run(tmp_path, tasks=tasks)
    state, heavy = RunDirectory(tmp_path / "run", create=False).load_state()
    assert state["position"]["task"] == 1 and heavy  # task 0 finished and saved, loadable


def test_bf16_autocast_run_completes_with_class_statistics_in_full_precision(tmp_path):
    """Under bf16 autocast, class means and covariances stay float32 and the Cholesky factors float64; the frozen
    matmul weights are held in bf16 (fp32 without amp)."""
    config = tiny_config(amp="bf16")
    engine = make_engine(config, tmp_path / "bf16")
    autocast_calls = []
    entered = engine.context.autocast
    engine.context.autocast = lambda: autocast_calls.append(1) or entered()
    accuracy = engine.run()["accuracy"].accuracies()
    assert ((accuracy >= 0) & (accuracy <= 100)).all() and accuracy[:, -1].sum() > 0
    assert autocast_calls and isinstance(entered(), torch.autocast)
    assert {param.dtype for param in engine.context.model.frozen_matmul_parameters()} == {torch.bfloat16}  # cast once, not per forward
    assert {param.dtype for param in make_engine(tiny_config(amp="none"), tmp_path / "fp32").context.model.frozen_matmul_parameters()} \
        == {torch.float32}
    for gaussians in (engine.method.tii_gaussians, engine.method.prompt_gaussians):
        state = gaussians.state_dict()
        assert len(state["labels"]) == NUM_CLASSES
        assert state["means"].dtype == state["covariances"].dtype == torch.float32
        assert state["factors"].dtype == torch.float64
        features, _ = gaussians.sample(gaussians.labels, 3)
        assert features.dtype == torch.float32 and torch.isfinite(features).all()


def test_features_cached_on_disk_survive_a_resume(tmp_path):
    config = tiny_config(**{"tii.augment": False, "cache_features_on_disk": True})
    tasks = make_tasks()
    failing = FailingDataset(tasks[2].train_eval, fail_at=1)  # crash on task 2's first frozen pass
    tasks[2] = TaskDatasets(tasks[2].classes, tasks[2].train, failing, tasks[2].test)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tmp_path, "disk", config, tasks=tasks)
    cached = sorted(p.name for p in (tmp_path / "disk" / "feature_cache").iterdir())
    assert cached == ["test_0.pt", "test_1.pt", "train_0.pt", "train_1.pt"]
    engine = make_engine(config, RunDirectory(tmp_path / "disk", create=False))
    engine.resume()
    engine.run()
    per_task = CLASSES_PER_TASK * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    assert engine.context.frozen_images_encoded == per_task  # only task 2's images; tasks 0-1 came from disk


class RandomlyShifted(torch.utils.data.Dataset):
    """Images plus noise drawn from the global torch generator: a stand-in for a random augmentation."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image + torch.randn(()), label


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_batches_replay_exactly_whatever_the_number_of_loader_workers(tmp_path, workers):
    """Each image's augmentation is seeded from (seed, task, epoch, image): loader workers change nothing."""
    config = tiny_config()
    tasks = [TaskDatasets(t.classes, RandomlyShifted(t.train), t.train_eval, t.test) for t in make_tasks()]

    def batches(workers: int, epoch: int) -> list[torch.Tensor]:
        config.data.workers = workers
        engine = make_engine(config, tmp_path / f"w{workers}e{epoch}-{len(list(tmp_path.iterdir()))}", tasks)
        return [batch.images for batch in engine.context.train_loader(0, epoch, 5)]

    single = batches(0, 0)
    assert all(torch.equal(a, b) for a, b in zip(batches(workers, 0), single, strict=True))
    assert not torch.equal(batches(workers, 1)[0], single[0])  # another epoch, other draws
