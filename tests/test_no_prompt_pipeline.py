"""HiDe-Prompt's pipeline without prompts (``hide.prompt.length=0``): the baseline that shows what the prompts add.

Everything but the prompts runs as in HiDe-Prompt (task-identity model, class statistics, both task-adaptive
stages, evaluation); the prompt stage trains the head alone on the frozen backbone's features.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import NUM_TASKS, TINY, make_engine, tiny_config
from test_hide_pipeline import pipeline, run_phases, run_phases_named, slow_masked_ce, task_images

from norga.cli import main
from norga.config import ConfigError
from norga.methods.base import PredictRequest
from norga.nn.prefix_attention import PrefixAttention


def no_prompts(tmp_path, **changes):
    return pipeline(tmp_path, method="hide", **{"prompt.length": 0, "wtp.train.epochs": 1, **changes})


def test_it_builds_no_prompts_and_no_prefix_attention(tmp_path):
    engine = no_prompts(tmp_path)
    assert engine.method.prompts is None
    assert not any(isinstance(block.attn, PrefixAttention) for block in engine.context.model.backbone.blocks)
    assert "no prompts" in type(engine.method).summary(engine.method.settings)


def test_its_prompt_stage_is_one_step_of_the_head_alone_on_the_frozen_features(tmp_path):
    """One SGD step: the head moves by -lr·scale·∇ masked CE of the frozen features; the backbone never moves (the
    contrastive term has no trainable input)."""
    engine = no_prompts(tmp_path, **{"wtp.head_lr_scale": 0.3, "wtp.contrastive_weight": 0.7})
    method, host = engine.method, engine.context.model
    run_phases(engine, 0)
    run_phases(engine, 1, until="wtp_train")
    backbone = {name: p.detach().clone() for name, p in host.backbone.named_parameters() if "head" not in name}
    head = [p.detach().clone().requires_grad_(True) for p in host.head_parameters()]
    images, labels = task_images(engine, 1)
    with torch.no_grad():
        features = host.forward_features(images)
    grads = torch.autograd.grad(slow_masked_ce(F.linear(features, *head), labels, engine.context.classes(1)), head)

    host.train()
    run_phases_named(engine, 1, "wtp_train")
    scale = method.settings.wtp.head_lr_scale * method.settings.wtp.train.lr
    for after, before, grad in zip(host.head_parameters(), head, grads):
        torch.testing.assert_close(after.detach(), before.detach() - scale * grad, rtol=1e-4, atol=1e-6)
        assert (after.detach() - before.detach()).abs().max() > 1e-6
    assert all(torch.equal(p.detach(), backbone[name]) for name, p in host.backbone.named_parameters()
               if "head" not in name)


def test_its_class_statistics_are_those_of_the_frozen_features_without_a_second_pass(tmp_path, monkeypatch):
    engine = no_prompts(tmp_path)
    method = engine.method
    monkeypatch.setattr(method, "encode", lambda *args: pytest.fail("the frozen features were encoded again"))
    run_phases(engine, 0)
    for label in engine.context.classes(0):
        torch.testing.assert_close(method.prompt_gaussians.means([label])[0], method.tii_gaussians.means([label])[0],
                                   rtol=1e-5, atol=1e-6)


def test_every_slot_mode_gives_the_same_classes_and_tasks_are_still_inferred(tmp_path, monkeypatch):
    engine = no_prompts(tmp_path)
    for task in range(2):
        run_phases(engine, task)
    images, _ = task_images(engine, 1)
    true_tasks = torch.ones(len(images), dtype=torch.long)
    monkeypatch.setattr(engine.method, "encode", lambda *args: pytest.fail("a pipeline without prompts encoded"))
    by_mode = {mode: engine.method.predict(PredictRequest(images, 2, slots=mode, true_tasks=true_tasks))
               for mode in engine.method.slot_modes}
    assert by_mode["predicted"].tasks is not None and len(by_mode["predicted"].tasks) == len(images)
    for prediction in by_mode.values():
        assert torch.equal(prediction.classes, by_mode["predicted"].classes)
        assert torch.equal(prediction.within_task, by_mode["predicted"].within_task)


def test_a_whole_run_without_prompts_records_it_and_resumes_from_its_checkpoints(tmp_path):
    config = tiny_config("hide", **{"prompt.length": 0})
    engine = make_engine(config, tmp_path / "run")
    engine.run()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tasks_finished"] == NUM_TASKS and results["settings"]["prompt"]["length"] == 0
    assert results["gate"] == "none"
    state = engine.method.state_dict()
    assert state["prompts"] == {}
    again = make_engine(config, tmp_path / "again")
    again.method.load_state_dict(state)  # a checkpoint of the pipeline without prompts loads into one


def test_norga_without_prompts_is_refused_at_config_load_with_the_setting_that_runs_it(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"method=hide --set hide.prompt.length=0"):
        tiny_config("norga", **{"prompt.length": 0})
    run = tmp_path / "run"
    assert main(["run", str(TINY), "--set", "norga.prompt.length=0", "--run-dir", str(run)]) == 2
    assert "norga.prompt.length=0 leaves no prompt scores" in capsys.readouterr().err
    assert not run.exists()  # refused before any run directory is made


def test_a_checkpoint_with_prompts_does_not_load_into_the_pipeline_without(tmp_path):
    with_prompts = pipeline(tmp_path / "a", method="hide").method.state_dict()
    with pytest.raises(ValueError, match="checkpoint has prompts"):
        no_prompts(tmp_path / "b").method.load_state_dict(with_prompts)
