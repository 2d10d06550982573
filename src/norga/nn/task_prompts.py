"""HiDe-Prompt / NoRGa's prompts: one prefix slot per task in a few blocks, and a score gate per prompted block.

A `TaskPrompts` module is what the HiDe-Prompt method owns (the host `PromptedViT` holds none of it): it
turns a slot choice into the ``prefixes`` argument of `PromptedViT.forward`, with the prompt momentum of
the training slot and the prefix layout (correct, or the official one for reproducing published numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from norga.nn.attachments import Prefix
from norga.nn.gates import GateSchedule, apply_gate_schedule, make_gate
from norga.nn.prefix_pool import PREFIX_LAYOUTS, PrefixPool
from norga.nn.prompted_vit import PromptedViT


class TaskPrompts(nn.Module):
    """A `PrefixPool` of `num_slots` slots over blocks `layers` of `host`, and one gate per such block.

    ``gate`` is a gate kind (`norga.nn.gates.GATE_KINDS`: ``"none"`` is plain prefix tuning, an activation
    name the NoRGa gate). Building it gives the host's `layers` prefix attention; the slots' uniform(-1, 1)
    init draws from `generator` (default: torch's global one). ``param="mlp"``: the training slot is produced
    by a reparameterizing network until it is committed (`PrefixPool`).
    """

    def __init__(self, host: PromptedViT, num_slots: int, length: int, layers: Sequence[int],
                 gate: str | None = "none", prefix_layout: str = "correct",
                 generator: torch.Generator | None = None, param: str = "raw") -> None:
        super().__init__()
        layers = tuple(sorted(set(layers)))
        if not layers or layers[0] < 0 or layers[-1] >= host.depth:
            raise ValueError(f"prompt layers must be block indices in [0, {host.depth}), got {list(layers)}")
        if prefix_layout not in PREFIX_LAYOUTS:
            raise ValueError(f"unknown prefix layout {prefix_layout!r}; choose one of {PREFIX_LAYOUTS}")
        host.install_prefix_layers(layers)
        self.layers = layers
        self.prefix_layout = prefix_layout
        self.pool = PrefixPool(len(layers), num_slots, length, host.num_heads, host.head_dim, generator, param,
                               patch_inputs=host.patch_inputs)
        self.gates = nn.ModuleList(make_gate(gate) for _ in layers)

    def prefixes(self, slots: Tensor | int, batch_size: int, momentum: float = 0.0) -> dict[int, Prefix]:
        """The ``prefixes`` argument for a batch whose sample b uses slot ``slots[b]`` (an int: all of them).

        `momentum` (an int slot only) blends the training slot with the mean of the earlier ones (HiDe-Prompt).
        """
        gathered = self.pool.gather(slots, self.prefix_layout, momentum=momentum, batch_size=batch_size)
        return {layer: Prefix(k, v, gate) for layer, gate, (k, v) in zip(self.layers, self.gates, gathered)}

    def train_slot(self, slot: int, gate_schedule: GateSchedule | str) -> list[nn.Parameter]:
        """Make only `slot` (its network, reparameterized; and the gates, if `gate_schedule` trains them at task
        `slot`) trainable; returns them."""
        self.pool.set_trainable_slot(slot)
        apply_gate_schedule(self.gates, gate_schedule, slot)
        return [p for p in self.parameters() if p.requires_grad]

    def freeze(self) -> None:
        """Nothing trainable (between training phases)."""
        self.requires_grad_(False)


class TaskPromptedViT(nn.Module):
    """A host and one `TaskPrompts`, called as HiDe-Prompt calls them: ``model(x, slots, momentum)``.

    A convenience for library use (and the README's example): the parts stay separate modules, ``host`` owning
    the backbone and head, ``prompts`` the slots and gates. Methods use the two directly.
    """

    def __init__(self, host: PromptedViT, prompts: TaskPrompts) -> None:
        super().__init__()
        self.host, self.prompts = host, prompts

    def forward(self, x: Tensor, slots: Tensor | int | None = None, momentum: float = 0.0, **prompts):
        """`slots` None: the plain frozen backbone (or the host with the other prompts given)."""
        if slots is not None:
            prompts["prefixes"] = self.prompts.prefixes(slots, len(x), momentum)
        return self.host(x, **prompts)
