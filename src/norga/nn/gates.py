"""Score gates: what happens to the pre-softmax attention scores of prefix (prompt) keys.

`IdentityGate` is plain prefix tuning (HiDe-Prompt). `NoRGaGate` is the non-linear residual gate of
NoRGa, ``s + α·σ(τ·s)``, with α and τ learnable scalars (one pair per prompted layer, shared across
heads, positions and tasks, as in the official code's ``act_scale``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.config import OneOf

#: Activations σ the NoRGa gate supports (the official code's ``--gate_act`` choices).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,  # erf GELU, as torch.nn.GELU() in the official code
    "relu": F.relu,
    "softplus": F.softplus,
    "elu": F.elu,
    "identity": lambda s: s,
}


class ScoreGate(nn.Module):
    """Maps prefix scores ``s`` (already divided by sqrt(head_dim)) to gated scores.

    `gate(s, *params)` is a pure function of its tensor inputs so that fused attention kernels can
    recompute it (and differentiate it) from saved inputs; `forward` binds the module's own parameters.
    """

    #: True when the gate is exactly the identity (lets attention take the plain fused path).
    is_identity: bool = False
    #: True when each gated score depends on that score alone (what a per-score modification, flex, can express).
    elementwise: bool = True

    def gate_parameters(self) -> tuple[Tensor, ...]:
        """The tensors `gate` depends on besides the scores, in the order `gate` takes them."""
        return ()

    def gate(self, scores: Tensor, *params: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, scores: Tensor) -> Tensor:
        return self.gate(scores, *self.gate_parameters())


class IdentityGate(ScoreGate):
    """No gate: prefix scores enter the softmax unchanged (HiDe-Prompt / plain prefix tuning)."""

    is_identity = True

    def gate(self, scores: Tensor, *params: Tensor) -> Tensor:
        return scores


class NoRGaGate(ScoreGate):
    """Non-linear residual gate ``s + α·σ(τ·s)`` with learnable scalars α (outside) and τ (inside σ)."""

    def __init__(self, activation: str = "tanh", alpha: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown NoRGa gate activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        self.activation = activation
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.tau = nn.Parameter(torch.tensor(float(tau)))

    def gate_parameters(self) -> tuple[Tensor, ...]:
        return (self.alpha, self.tau)

    def gate(self, scores: Tensor, *params: Tensor) -> Tensor:
        alpha, tau = params
        return scores + alpha * ACTIVATIONS[self.activation](tau * scores)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class TokenMeanGate(ScoreGate):
    """Each prefix column's score replaced by its mean over the query tokens: every token sees the same score
    toward a prefix, the score of the tokens' mean query (SMoPE's aggregated expert score; linear, so exact).
    Not a ``gate`` setting's kind: a method that scores its prefixes this way passes it itself."""

    elementwise = False

    def gate(self, scores: Tensor, *params: Tensor) -> Tensor:
        return scores.mean(dim=-2, keepdim=True).expand_as(scores)


#: Gate kinds by config name: a factory per name. A new kind of gate is one `ScoreGate` subclass plus
#: ``register_gate(name, factory)``; every ``gate`` setting then accepts its name.
GATE_KINDS: dict[str, Callable[[], ScoreGate]] = {}


def register_gate(name: str, factory: Callable[[], ScoreGate]) -> None:
    """Make `factory` available to ``gate`` settings as `name` (a name can be registered once)."""
    if name in GATE_KINDS:
        raise ValueError(f"gate kind {name!r} is already registered")
    GATE_KINDS[name] = factory


register_gate("none", IdentityGate)
for _activation in ACTIVATIONS:
    register_gate(_activation, lambda activation=_activation: NoRGaGate(activation))


def gate_kinds() -> list[str]:
    """Every registered gate name (the values a ``gate`` setting takes)."""
    return list(GATE_KINDS)


def score_gate_kinds() -> list[str]:
    """The registered gates other than ``none`` (what a gated method such as NoRGa may use)."""
    return [kind for kind in GATE_KINDS if kind != "none"]


#: The type of a ``gate`` setting: a registered gate kind.
GateKind = Annotated[str, OneOf(gate_kinds)]
#: The type of a gated method's ``gate`` setting: a registered gate other than ``none``.
ScoreGateKind = Annotated[str, OneOf(score_gate_kinds)]
#: The type of a ``gate_train_tasks`` setting (`GateSchedule`).
GateTrainTasks = Literal["first", "all", "none"]


def make_gate(kind: str | None) -> ScoreGate:
    """A gate from a config value: ``None``/``"none"`` -> identity, else a registered gate kind."""
    if kind is None:
        kind = "none"
    if kind not in GATE_KINDS:
        raise ValueError(f"unknown gate {kind!r}; choose one of {sorted(GATE_KINDS)}")
    return GATE_KINDS[kind]()


class GateSchedule(str, enum.Enum):
    """When the gate scalars are trained (`gate_train_tasks`); the official code trains them on task 0 only."""

    FIRST = "first"
    ALL = "all"
    NONE = "none"

    def trainable_at(self, task: int) -> bool:
        """Whether the gate scalars receive gradient while training `task` (0-based)."""
        if self is GateSchedule.ALL:
            return True
        if self is GateSchedule.FIRST:
            return task == 0
        return False


def apply_gate_schedule(gates: Iterable[ScoreGate], schedule: GateSchedule | str, task: int) -> None:
    """Set ``requires_grad`` of every gate parameter for training `task` according to `schedule`."""
    trainable = GateSchedule(schedule).trainable_at(task)
    for gate in gates:
        for param in gate.parameters():
            param.requires_grad_(trainable)
