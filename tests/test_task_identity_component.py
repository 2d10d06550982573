"""The task-identity component (`TaskIdentity`) owned by a method other than HiDe-Prompt: its phases run in the
owner's training loop, a diverged phase names the owner's setting, it predicts tasks from the seen classes' argmax,
and its state round-trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from engine_fixtures import make_engine, tiny_config

from norga.config import OptimConfig
from norga.methods.hide.settings import TAPConfig, TIISettings
from norga.methods.hide.task_identity import TaskIdentity
from norga.runtime.divergence import TrainingDiverged
from norga.runtime.training import PhaseTraining

NO_LOG = lambda epoch, logs: None  # noqa: E731


@dataclass
class ProbeSettings:
    """A method's settings with the component's section under another name than HiDe-Prompt's."""

    identity: TIISettings = field(default_factory=lambda: TIISettings(
        mlp_hidden=[1], augment=False, train=OptimConfig(epochs=1, lr=0.01, batch_size=4),
        tap=TAPConfig(epochs=1, lr=0.01, samples_per_class=4)))


class Owner(PhaseTraining):
    """The smallest owner: a name, settings, the run context and its model."""

    name = "probe"

    def __init__(self, context: Any, settings: ProbeSettings) -> None:
        self.ctx, self.model, self.settings = context, context.model, settings


@pytest.fixture
def owner(tmp_path):
    context = make_engine(tiny_config("linear_probe"), tmp_path / "run").context
    return Owner(context, ProbeSettings())


def run_task(component: TaskIdentity, task: int) -> list[str]:
    names = []
    for phase in component.phases(task):
        component.run_phase(task, phase, 0, NO_LOG)
        names.append(phase.name)
    return names


def test_its_phases_train_predict_and_keep_their_state_for_any_owner(owner):
    component = TaskIdentity(owner, owner.settings.identity)
    before = {k: v.clone() for k, v in component.state_dict().items()}
    assert run_task(component, 0) == ["tii_train", "tii_stats"]
    assert run_task(component, 1) == ["tii_train", "tii_stats", "tii_tap"]
    assert any(not torch.equal(v, before[k]) for k, v in component.state_dict().items())
    assert component.gaussians.labels == owner.ctx.classes_until(1)

    features = torch.randn(7, owner.ctx.model.embed_dim)
    with torch.no_grad():
        logits = component.model(features)
    seen = owner.ctx.classes_until(1)
    expected = owner.ctx.class_to_task[torch.tensor(seen)[logits[:, seen].argmax(dim=1)]]
    assert torch.equal(component.predict_tasks(features, seen_tasks=2), expected)

    copy = TaskIdentity(owner, owner.settings.identity)
    copy.load_state_dict(component.state_dict())
    copy.load_heavy_state_dict(component.heavy_state_dict())
    assert torch.equal(copy.predict_tasks(features, seen_tasks=2), expected)
    assert torch.equal(copy.gaussians.means(seen), component.gaussians.means(seen))


def test_a_diverged_phase_names_the_owners_setting(owner):
    owner.settings.identity.train.lr = 1e5
    with pytest.raises(TrainingDiverged) as caught:
        run_task(TaskIdentity(owner, owner.settings.identity), 0)
    assert caught.value.setting == "probe.identity.train.lr"
