"""Score gates against hand computation, and the gate training schedule."""

import math

import pytest
import torch

from norga.nn import (
    ACTIVATIONS,
    GateSchedule,
    IdentityGate,
    NoRGaGate,
    apply_gate_schedule,
    make_gate,
)

# σ written out per element with the math module: the "obvious" definitions.
HAND_ACTIVATIONS = {
    "tanh": math.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + math.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0))),
    "relu": lambda z: max(z, 0.0),
    "softplus": lambda z: math.log1p(math.exp(z)),
    "elu": lambda z: z if z > 0 else math.exp(z) - 1.0,
    "identity": lambda z: z,
}


def test_every_supported_activation_has_a_hand_reference_and_a_config_name():
    from norga.config_io import load_config
    from norga.nn import gate_kinds

    assert set(ACTIVATIONS) == set(HAND_ACTIVATIONS) == set(gate_kinds()) - {"none"}
    for activation in ACTIVATIONS:
        assert load_config(None, [f"norga.gate={activation}"]).settings.gate == activation
    with pytest.raises(ValueError, match="norga.gate must be one of .* \\(did you mean 'tanh'\\?\\)"):
        load_config(None, ["norga.gate=tahn"])


def test_a_new_kind_of_gate_is_one_class_and_its_registration():
    """A gate that is not a NoRGa activation: register it, and configs, TaskPrompts and the attention use it."""
    import timm

    from norga.config_io import load_config
    from norga.nn import GATE_KINDS, PromptedViT, ScoreGate, TaskPrompts, register_gate

    class ScaledGate(ScoreGate):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(3.0))

        def gate_parameters(self):
            return (self.scale,)

        def gate(self, scores, *params):
            return scores * params[0]

    register_gate("scaled", ScaledGate)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_gate("scaled", ScaledGate)
        assert load_config(None, ["norga.gate=scaled"]).settings.gate == "scaled"
        host = PromptedViT(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2))
        prompts = TaskPrompts(host, 2, 3, (0,), gate="scaled")
        x = torch.randn(2, 3, 32, 32)
        scaled = host(x, prefixes=prompts.prefixes(0, 2)).logits
        torch.nn.init.ones_(prompts.gates[0].scale)  # a scale of 1 is plain prefix tuning
        plain = TaskPrompts(host, 2, 3, (0,), gate="none")
        plain.load_state_dict({k: v for k, v in prompts.state_dict().items() if "gates" not in k})
        torch.testing.assert_close(host(x, prefixes=prompts.prefixes(0, 2)).logits,
                                   host(x, prefixes=plain.prefixes(0, 2)).logits)
        assert (scaled - host(x, prefixes=plain.prefixes(0, 2)).logits).abs().max() > 1e-4  # the gate acts
    finally:
        del GATE_KINDS["scaled"]


@pytest.mark.parametrize("activation", sorted(HAND_ACTIVATIONS))
def test_norga_gate_matches_hand_computation(activation):
    gate = NoRGaGate(activation).double()
    alpha, tau = torch.rand(2).tolist()
    alpha, tau = alpha * 3 - 1, tau * 2 + 0.1
    with torch.no_grad():
        gate.alpha.fill_(alpha)
        gate.tau.fill_(tau)
    scores = torch.randn(3, 4, 5, dtype=torch.float64) * 3
    expected = torch.tensor(
        [s + alpha * HAND_ACTIVATIONS[activation](tau * s) for s in scores.flatten().tolist()], dtype=torch.float64
    ).reshape(scores.shape)
    torch.testing.assert_close(gate(scores), expected, rtol=1e-12, atol=1e-12)


def test_identity_activation_is_a_linear_rescaling():
    gate = NoRGaGate("identity")
    with torch.no_grad():
        gate.alpha.fill_(torch.rand(()).item() + 0.5)
        gate.tau.fill_(torch.rand(()).item() + 0.5)
    scores = torch.randn(10, 7)
    torch.testing.assert_close(gate(scores), (1 + gate.alpha * gate.tau).detach() * scores)


def test_alpha_zero_is_the_identity_and_scalars_start_at_one():
    gate = NoRGaGate("tanh")
    assert gate.alpha.item() == 1.0 and gate.tau.item() == 1.0
    with torch.no_grad():
        gate.alpha.zero_()
    scores = torch.randn(4, 9)
    assert torch.equal(gate(scores), scores)
    assert torch.equal(IdentityGate()(scores), scores)


def test_gate_gradients_reach_alpha_and_tau():
    gate = NoRGaGate("sigmoid")
    scores = torch.randn(6, 5)
    gate(scores).sum().backward()
    expected_alpha = torch.sigmoid(scores).sum()
    expected_tau = (torch.sigmoid(scores) * (1 - torch.sigmoid(scores)) * scores).sum()
    torch.testing.assert_close(gate.alpha.grad, expected_alpha)
    torch.testing.assert_close(gate.tau.grad, expected_tau)


def test_make_gate_and_unknown_activation():
    assert isinstance(make_gate(None), IdentityGate) and isinstance(make_gate("none"), IdentityGate)
    assert make_gate("gelu").activation == "gelu"
    with pytest.raises(ValueError, match="unknown NoRGa gate activation 'swish'.*tanh"):
        NoRGaGate("swish")
    with pytest.raises(ValueError, match="unknown gate 'swish'"):
        make_gate("swish")


@pytest.mark.parametrize(
    ("schedule", "trainable"),
    [("first", [True, False, False]), ("all", [True, True, True]), ("none", [False, False, False])],
)
def test_gate_schedule(schedule, trainable):
    gates = [NoRGaGate("tanh"), NoRGaGate("gelu")]
    for task, expected in enumerate(trainable):
        assert GateSchedule(schedule).trainable_at(task) is expected
        apply_gate_schedule(gates, schedule, task)
        assert all(p.requires_grad is expected for g in gates for p in g.parameters())
    with pytest.raises(ValueError):
        GateSchedule("sometimes")
