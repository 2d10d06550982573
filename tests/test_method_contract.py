"""What every registered method owes the engine and the user, checked for each one through the registry:
config round trip, `norga methods`, the run record (its own settings and nothing of another method's), exact
resume after a crash, and bf16 + regional compile. A new method gets these tests by registering."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from engine_fixtures import make_tasks, run_fixture, tiny_config

from norga.commands.methods import setting_rows
from norga.config_io import dump_config, load_config
from norga.engine.loop import Position
from norga.engine.run_dir import RunDirectory
from norga.methods import METHODS, Capabilities, register_method

ALL = sorted(METHODS)
EXTERNAL = Path(__file__).with_name("external_method")


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
    assert ("gate" in results) == results["capabilities"]["score_gate"]  # what the method declares, it records
    engine_infers = "task_identity" in matrices
    assert engine_infers == results["capabilities"]["infers_tasks"]
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


def test_a_method_defined_outside_the_package_is_one_class_and_its_registration(tmp_path, monkeypatch):
    """No file of norga changes: the class (tests/external_method's, imported here from its file) registers, configs
    address its section, the engine runs it, the run record holds its settings (test_external_method.py installs the
    same class through its package's entry point)."""
    spec = importlib.util.spec_from_file_location("norga_majority_vote", EXTERNAL / "norga_majority_vote.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    register_method(module.MajorityVote)
    try:
        config = load_config(None, ["method=majority_vote", "majority_vote.smoothing=0.5"])
        assert config.settings == module.MajorityVoteSettings(0.5)
        with pytest.raises(Exception, match="majority_vote.smoothing must be a finite number >= 0"):
            load_config(None, ["method=majority_vote", "majority_vote.smoothing=-1"])
        config = tiny_config("majority_vote", smoothing=0.5)
        matrices = run_fixture(config, tmp_path / "run")
        assert set(matrices) == {"accuracy", "task_incremental"} and matrices["accuracy"].final_average_accuracy() > 0
        # given the true task, the most frequent class of that task: one of its classes, right for some images
        assert matrices["task_incremental"].final_average_accuracy() >= matrices["accuracy"].final_average_accuracy()
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert results["method"] == "majority_vote" and results["settings"] == {"smoothing": 0.5}
        assert results["capabilities"] == Capabilities().to_dict()
    finally:
        del METHODS["majority_vote"]
