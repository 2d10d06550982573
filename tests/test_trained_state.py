"""Checkpoints hold exactly what a method owns and trains, wherever it sits: a method that trains a parameter of the
frozen backbone resumes bit-identically after a kill, a checkpoint without that parameter is refused on resume, a
tensor trained but not owned is refused at the first checkpoint, and nothing of the frozen backbone is saved."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import Crash, build, crash_at, tiny_config
from torch import nn
from tuning_methods import NormTuning, registered, run_engine

from norga.engine.loop import Position
from norga.storage import CheckpointError, load_checkpoint

NORM = "backbone.blocks.0.norm1.weight"
MID_TASK_2 = Position(1, 0, 1)  # task 2, its training phase, after epoch 1 of 2


def norm_config():
    return tiny_config(NormTuning.name, **{"train.epochs": 2})


def norm_weight(engine) -> torch.Tensor:
    return engine.method.model.backbone.blocks[0].norm1.weight.detach()


def test_a_method_training_a_backbone_parameter_resumes_bit_identically_after_a_kill(tmp_path):
    with registered(NormTuning):
        config = norm_config()
        straight = run_engine(config, tmp_path / "straight")
        with pytest.raises(Crash):
            run_engine(config, tmp_path / "crashed", after_epoch=crash_at(MID_TASK_2))
        resumed = run_engine(config, tmp_path / "crashed", resume=True)
        untrained = build(config).model.backbone.blocks[0].norm1.weight.detach()
    assert not torch.equal(norm_weight(straight), untrained)  # it trained
    assert torch.equal(norm_weight(resumed), norm_weight(straight))
    for name, matrix in straight.matrices.items():
        assert torch.equal(torch.as_tensor(resumed.matrices[name].correct), torch.as_tensor(matrix.correct)), name
    for run in ("straight", "crashed"):
        saved = load_checkpoint(tmp_path / run / "checkpoints" / "task3.pt")["method"]["model"]
        # exactly what it trains, nothing of the frozen backbone
        assert set(saved) == {"backbone.head.weight", "backbone.head.bias", NORM}
        assert torch.equal(saved[NORM], norm_weight(straight))


def test_a_checkpoint_without_the_trained_backbone_parameter_is_refused_on_resume(tmp_path):
    with registered(NormTuning):
        config = norm_config()
        with pytest.raises(Crash):
            run_engine(config, tmp_path / "run", after_epoch=crash_at(MID_TASK_2))
        state = load_checkpoint(tmp_path / "run" / "state.pt")
        del state["method"]["model"][NORM]
        torch.save(state, tmp_path / "run" / "state.pt")
        with pytest.raises(CheckpointError, match=rf"Missing key\(s\) in the checkpoint: model\.{NORM}: the method "
                                                  r"owns and trains these.*start the run again in a new directory"):
            run_engine(config, tmp_path / "run", resume=True)


class Forgetful(NormTuning):
    """Trains a bias on the logits that it keeps outside everything it owns."""

    name = "test_forgetful"

    def __init__(self, context, settings) -> None:
        super().__init__(context, settings)
        self.logit_bias = nn.Parameter(torch.zeros(context.num_classes))

    def trained_parameters(self):
        return [*super().trained_parameters(), self.logit_bias]

    def logits(self, images):
        return super().logits(images) + self.logit_bias


def test_a_trained_tensor_the_method_does_not_own_is_refused_at_the_first_checkpoint(tmp_path):
    with registered(Forgetful):
        with pytest.raises(RuntimeError, match="Forgetful trains logit_bias but does not own it, so its checkpoints "
                                               "would lose it"):
            run_engine(tiny_config(Forgetful.name), tmp_path / "run")
        assert not (tmp_path / "run" / "state.pt").exists()


def test_unfreeze_makes_backbone_parameters_trained_and_refuses_what_it_cannot_train():
    host = build(tiny_config("linear_probe")).model
    assert set(host.trained_parameters()) == {"backbone.head.weight", "backbone.head.bias"}
    (norm,) = host.unfreeze(["blocks.0.norm1.weight"])
    assert norm is host.backbone.blocks[0].norm1.weight and norm.requires_grad
    assert set(host.trained_parameters()) == {"backbone.head.weight", "backbone.head.bias", NORM}
    with pytest.raises(ValueError, match="the backbone has no parameter 'blocks.0.norm3.weight' to train"):
        host.unfreeze(["blocks.0.norm3.weight"])
    host.hold_frozen_weights_in(torch.bfloat16)
    with pytest.raises(ValueError, match=r"backbone parameter blocks.1.attn.qkv.weight is held in torch.bfloat16 for "
                                         r"autocast \(amp=bf16\) and cannot train from its pre-trained value: run "
                                         r"with amp=none"):
        host.unfreeze(["blocks.0.norm2.weight", "blocks.1.attn.qkv.weight"])
    assert set(host.trained_parameters()) == {"backbone.head.weight", "backbone.head.bias", NORM}  # none of them
