"""Every knob of a phase's optimizer comes from its settings (`OptimConfig`: SGD's momentum, Adam's betas and eps,
at today's values when left out), and a knob of the other optimizer is refused at config load."""

from __future__ import annotations

import pytest
import torch
from cli_fixture import norga
from hand_optimizer import HandOptimizer

from norga.config import ConfigError, OptimConfig
from norga.config_io import load_config
from norga.runtime.optim import build_optimizer

STEPS = 3


def steps_agree(config: OptimConfig, hand: HandOptimizer) -> None:
    """`STEPS` steps of `build_optimizer(config)` on fresh float64 tensors and gradients equal the hand-written ones."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    live = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    optimizer = build_optimizer([{"params": list(live.values())}], config)
    for _ in range(STEPS):
        grads = {name: torch.randn_like(value) for name, value in params.items()}
        for name, tensor in live.items():
            tensor.grad = grads[name].clone()
        optimizer.step()
        params = hand.step(params, grads, config.lr)
    for name, tensor in live.items():
        torch.testing.assert_close(tensor.detach(), params[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [None, 0.0, 0.5])
def test_sgd_steps_with_the_momentum_of_its_settings(momentum):
    config = OptimConfig(lr=0.1, optimizer="sgd", weight_decay=0.01, momentum=momentum)
    steps_agree(config, HandOptimizer("sgd", 0.01, None, momentum=0.9 if momentum is None else momentum))


@pytest.mark.parametrize(("betas", "eps"), [(None, None), ([0.5, 0.9], 1e-3)])
def test_adam_steps_with_the_betas_and_eps_of_its_settings(betas, eps):
    config = OptimConfig(lr=0.1, optimizer="adam", weight_decay=0.01, betas=betas, eps=eps)
    hand = HandOptimizer("adam", 0.01, None, **({} if betas is None else {"betas": tuple(betas), "eps": eps}))
    steps_agree(config, hand)


@pytest.mark.parametrize(("override", "message"), [
    ("linear_probe.train.momentum=0.5", "linear_probe.train.momentum is a knob of sgd, but linear_probe.train.optimizer "
     "is adam: remove linear_probe.train.momentum or set linear_probe.train.optimizer=sgd"),
    ("norga.tii.train.betas=[0, 0.9]", None),
    ("norga.wtp.train.eps=0.001", "norga.wtp.train.eps is a knob of adam, but norga.wtp.train.optimizer is sgd"),
    ("linear_probe.train.betas=[0.9, 1.0]", "linear_probe.train.betas must be two numbers in [0, 1)"),
    ("linear_probe.train.betas=[0.9]", "linear_probe.train.betas must be two numbers in [0, 1)"),
])
def test_a_knob_the_optimizer_does_not_have_is_refused_at_config_load(override, message):
    method = override.split(".")[0]
    sgd = [f"{method}.wtp.train.optimizer=sgd"] if ".wtp." in override else []
    overrides = [f"method={method}", *sgd, override]
    if message is None:  # Adam's knob on an Adam phase: taken (an integer as a number)
        assert load_config(None, overrides).settings.tii.train.betas == [0.0, 0.9]
        return
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert str(caught.value).startswith(message)


def test_the_sgd_phases_take_their_momentum_and_the_command_line_refuses_a_foreign_knob_in_one_line(tmp_path):
    config = load_config(None, ["method=norga", "norga.wtp.tap.momentum=0.5", "norga.tii.train.optimizer=sgd",
                                "norga.tii.train.momentum=0.25", "norga.tii.train.betas=null"])
    assert (config.settings.wtp.tap.momentum, config.settings.tii.train.momentum) == (0.5, 0.25)
    result = norga("run", "quickstart", "--set", "norga.wtp.train.momentum=0.5", "--run-dir", tmp_path / "run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "norga.wtp.train.momentum is a knob of sgd" in lines[0]
    assert not (tmp_path / "run").exists()
