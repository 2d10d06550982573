"""RanPAC's head as HiDe-Prompt's / NoRGa's task-identity model (``tii.head ranpac``): the predicted task is the
argmax of the class scores summed over each seen task's classes, which equals the ridge fit to one-hot task targets
(a slow numpy reference on fresh data); it replaces the MLP's three phases by one solve; a run resumes exactly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_fixtures import Crash, crash_at, make_engine, run_fixture, tiny_config

from norga.engine.loop import Position
from norga.methods.hide.settings import TIISettings
from norga.methods.hide.task_identity import TaskIdentity, task_scores
from norga.methods.ranpac.ridge_head import RidgeSettings
from norga.runtime.features import FeatureSet
from norga.runtime.seeding import derive_seed

TINY_HEAD = {"tii.head": "ranpac", "tii.ranpac.projection_dim": 64}


def owner_over(tasks: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int, seed: int = 3):
    """The smallest owner of a task-identity component over hand-made frozen features."""
    class_to_task = torch.full((num_classes,), -1, dtype=torch.long)
    for index, (_, labels) in enumerate(tasks):
        class_to_task[labels.unique()] = index
    ctx = SimpleNamespace(
        model=SimpleNamespace(embed_dim=tasks[0][0].shape[1]), num_classes=num_classes,
        config=SimpleNamespace(seed=seed), class_to_task=class_to_task,
        classes=lambda task: tasks[task][1].unique().tolist(),
        frozen_train_features=lambda task: FeatureSet(tasks[task][0].float(), tasks[task][1]))
    return SimpleNamespace(ctx=ctx)


def test_the_predicted_task_is_the_argmax_of_summed_class_scores_and_of_the_task_target_ridge():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))  # fresh data each run
    classes, per_class, dim = 6, 30, 10
    centres = 2 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = (centres[labels] + 1.5 * torch.randn(len(labels), dim, generator=generator)).float()
    tasks = [(x[labels // 2 == t], labels[labels // 2 == t]) for t in range(3)]
    owner = owner_over(tasks, classes)
    settings = TIISettings(head="ranpac", ranpac=RidgeSettings(projection_dim=48, ridge_lambda=1.0))
    component = TaskIdentity(owner, settings)
    assert component.model is None and [p.name for p in component.phases(1)] == ["tii_ridge"]
    queries = (centres[torch.randint(0, classes, (200,), generator=generator)]
               + 2.0 * torch.randn(200, dim, generator=generator)).float()
    for task in range(3):
        component.run_phase(task, component.phases(task)[0], 0, lambda epoch, logs: None)
        seen = task + 1
        predicted = component.predict_tasks(queries, seen)
        # the slow reference: h = ReLU(xW) in numpy, ridge with the chosen λ on the seen tasks' one-hot *task*
        # targets, and on their class targets summed per task
        ridge = component.ridge.tasks[-1]["lambda"]
        weight = component.ridge.features.weight.double().numpy()
        fit_x = torch.cat([tasks[t][0] for t in range(seen)]).double().numpy()
        fit_y = torch.cat([tasks[t][1] for t in range(seen)]).numpy()
        h, hq = np.maximum(fit_x @ weight, 0), np.maximum(queries.double().numpy() @ weight, 0)
        system = h.T @ h + ridge * np.eye(h.shape[1])
        by_task = hq @ np.linalg.solve(system, h.T @ np.eye(seen)[fit_y // 2])
        by_class = (hq @ np.linalg.solve(system, h.T @ np.eye(classes)[fit_y])).reshape(200, classes // 2, 2).sum(-1)
        np.testing.assert_allclose(by_class[:, :seen], by_task, rtol=1e-8, atol=1e-8 * np.abs(by_task).max())
        ours = task_scores(component.ridge.class_scores(queries), owner.ctx.class_to_task, seen).numpy()
        bound = 1e3 * np.linalg.cond(system) * np.finfo(float).eps * np.abs(by_task).max()  # two solves' rounding
        np.testing.assert_allclose(ours, by_task, rtol=0, atol=bound)
        top = np.sort(by_task, axis=1)
        decided = top[:, -1] - top[:, -2] > 2 * bound if seen > 1 else np.ones(len(queries), bool)
        assert decided.mean() > 0.9
        assert np.array_equal(predicted.numpy()[decided], by_task.argmax(1)[decided])
        assert predicted.max() < seen  # only seen tasks


CONFIG = tiny_config("norga", **TINY_HEAD)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight")
    engine = make_engine(CONFIG, directory)
    assert [p.name for p in engine.method.phases(1)][:2] == ["tii_ridge", "wtp_train"]
    return directory, engine, engine.run()


def test_a_norga_run_with_the_ranpac_head_has_its_phases_record_and_no_mlp(uninterrupted):
    directory, engine, matrices = uninterrupted
    assert engine.method.tii is None and dict(engine.method.owned_modules()["tii"].state_dict()) == {}
    assert "task_identity" in matrices
    record = engine.method.run_record()["tii_ranpac"]
    assert record["projection_seed"] == derive_seed(CONFIG.seed, "tii-ranpac-projection")
    assert [task["task"] for task in record["tasks"]] == [1, 2, 3]
    saved = torch.load(directory / "checkpoints" / "task3.pt", weights_only=True)
    assert "tii_gaussians" not in saved and saved["tii_ridge"]["statistics"]["count"] == sum(
        len(task.train_eval) for task in engine.context.tasks)


def test_a_run_with_the_ranpac_head_resumes_bit_identically(tmp_path, uninterrupted):
    """Killed in task 2's prompt training, after its solve: the resume restores G, Q and W_o from the checkpoint."""
    straight_dir, _, straight = uninterrupted
    with pytest.raises(Crash):
        run_fixture(CONFIG, tmp_path / "crashed", after_epoch=crash_at(Position(1, 1, 1)))
    resumed = run_fixture(CONFIG, tmp_path / "crashed", resume=True)
    for name in straight:
        assert torch.equal(torch.as_tensor(straight[name].correct), torch.as_tensor(resumed[name].correct)), name
    first, second = (torch.load(directory / "checkpoints" / "task3.pt", weights_only=True)
                     for directory in (straight_dir, tmp_path / "crashed"))
    assert torch.equal(first["tii_ridge"]["readout"], second["tii_ridge"]["readout"])
    assert torch.equal(first["tii_ridge"]["statistics"]["gram_upper"], second["tii_ridge"]["statistics"]["gram_upper"])
    assert [t["lambda"] for t in first["tii_ridge"]["tasks"]] == [t["lambda"] for t in second["tii_ridge"]["tasks"]]
