"""What every registered method owes the engine and the user, checked for each one through the registry:
config round trip, `norga methods`, the run record (its own settings and nothing of another method's), exact
resume after a crash, and bf16 + regional compile. A new method gets these tests by registering."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from engine_fixtures import make_tasks, run_fixture, tiny_config

from norga.commands.methods import setting_rows
from norga.config import NonNegativeFloat  # noqa: F401 - the test method's settings are annotated with it
from norga.config_io import dump_config, load_config
from norga.engine.loop import Position
from norga.engine.run_dir import RunDirectory
from norga.methods import METHODS, ContinualMethod, Phase, Prediction, register_method

ALL = sorted(METHODS)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method", ALL)
def test_config_round_trips_and_norga_methods_lists_every_setting(tmp_path, method, capsys):
    from norga.cli import main

    config = tiny_config(method)
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert main(["methods", method]) == 0
    shown = capsys.readouterr().out
    for key, _, default in setting_rows(METHODS[method].Settings):
        assert f"{method}.{key}" in shown and repr(default) in shown


@pytest.mark.parametrize("method", ALL)
def test_the_run_record_holds_the_methods_own_settings_and_nothing_of_another(tmp_path, method):
    config = tiny_config(method)
    matrices = run_fixture(config, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert results["method"] == stored["method"] == method
    assert results["settings"] == stored[method] == json.loads(json.dumps(dataclasses.asdict(config.settings)))
    assert not set(stored) & (set(METHODS) - {method})  # no other method's section
    if "gate" in results:  # what ran: the section's gate, "none" for plain prefix tuning
        assert results["gate"] == (results["settings"].get("gate") or "none")
    assert ("gate" in results) == (method not in ("l2p", "linear_probe", "ncm"))  # no prefixes, no gate
    engine_infers = "task_identity" in matrices
    assert (results["task_identity_accuracy"] is not None) == engine_infers
    assert (tmp_path / "run" / "task_identity_matrix.csv").exists() == engine_infers
    for name in matrices:
        assert (tmp_path / "run" / f"{name}_matrix.csv").is_file()


def first_checkpoint_of_task(directory, task: int) -> Position:
    """Where a crash in the middle of task `task` lands: its first phase boundary or epoch checkpoint."""
    return Position(task, 1, 0)


@pytest.mark.parametrize("method", ALL)
def test_resume_after_a_crash_gives_the_uninterrupted_results(tmp_path, method):
    config = tiny_config(method)
    straight = run_fixture(config, tmp_path / "straight")
    crash_at = first_checkpoint_of_task(tmp_path, 1)

    def crash(position):
        if position == crash_at:
            raise Crash(f"injected at {position}")

    with pytest.raises(Crash):
        run_fixture(config, tmp_path / "crashed", after_epoch=crash)
    state, _ = RunDirectory(tmp_path / "crashed", create=False).load_state()
    assert Position(**state["position"]) == crash_at
    resumed = run_fixture(config, tmp_path / "crashed", resume=True)
    assert set(resumed) == set(straight)
    for name in straight:
        assert torch.equal(torch.as_tensor(straight[name].correct), torch.as_tensor(resumed[name].correct)), name
    final = [torch.load(tmp_path / run / "checkpoints" / "task3.pt", weights_only=True)["method"]
             for run in ("straight", "crashed")]
    flat = [torch.cat([t.flatten().float() for t in _tensors(state)]) for state in final]
    assert torch.equal(flat[0], flat[1])


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_bf16_and_regional_compile_run_every_method(tmp_path, method):
    config = tiny_config(method, amp="bf16", compile=True)
    matrices = run_fixture(config, tmp_path / "run")
    accuracy = matrices["accuracy"].accuracies()
    assert ((accuracy >= 0) & (accuracy <= 100)).all() and matrices["accuracy"].total[:, -1].sum() == sum(
        len(task.test) for task in make_tasks())


def test_a_method_defined_outside_the_package_is_one_class_and_its_registration(tmp_path):
    """No file of norga changes: the class registers, configs address its section, the engine runs it, the
    run record holds its settings."""
    @dataclass
    class MajoritySettings:
        smoothing: NonNegativeFloat = 0.0

    @register_method
    class Majority(ContinualMethod):
        """Predicts the seen class with the most training images."""

        name = "majority"
        Settings = MajoritySettings

        def __init__(self, context, settings):
            super().__init__(context, settings)
            self.counts = torch.full((context.num_classes,), settings.smoothing)

        def phases(self, task):
            return [Phase("count")]

        def run_phase(self, task, phase, start_epoch, on_epoch_end):
            for label in self.ctx.frozen_train_features(task).labels:
                self.counts[label] += 1

        def predict(self, images, seen_tasks, frozen_features=None, image_ids=None, slots="predicted",
                    true_tasks=None):
            seen = self.ctx.class_mask_until(seen_tasks - 1).cpu()
            best = int(torch.where(seen, self.counts, -1.0).argmax())
            counts = self.counts.expand(len(images), -1)
            within = None if true_tasks is None else self.within_task_classes(counts, true_tasks)
            return Prediction(torch.full((len(images),), best), within_task=within)

        def state_dict(self):
            return {"counts": self.counts.clone()}

        def load_state_dict(self, state):
            self.counts.copy_(state["counts"])

    try:
        config = load_config(None, ["method=majority", "majority.smoothing=0.5"])
        assert config.settings == MajoritySettings(0.5)
        with pytest.raises(Exception, match="majority.smoothing must be a finite number >= 0"):
            load_config(None, ["method=majority", "majority.smoothing=-1"])
        config = tiny_config("majority", smoothing=0.5)
        matrices = run_fixture(config, tmp_path / "run")
        assert set(matrices) == {"accuracy", "task_incremental"} and matrices["accuracy"].final_average_accuracy() > 0
        # given the true task, the most frequent class of that task: one of its classes, right for some images
        assert matrices["task_incremental"].final_average_accuracy() >= matrices["accuracy"].final_average_accuracy()
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert results["method"] == "majority" and results["settings"] == {"smoothing": 0.5}
    finally:
        del METHODS["majority"]
