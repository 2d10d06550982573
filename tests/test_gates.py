"""Score gates against hand computation, and the gate training schedule."""

import math

import pytest
import torch

from norga.nn import ACTIVATIONS, GateSchedule, IdentityGate, NoRGaGate, apply_gate_schedule, make_gate

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
    from norga.config import GATE_ACTIVATIONS

    assert set(ACTIVATIONS) == set(HAND_ACTIVATIONS) == set(GATE_ACTIVATIONS)


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
