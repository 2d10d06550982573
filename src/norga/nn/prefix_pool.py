"""Per-task prefix prompts (HiDe-Prompt / NoRGa E-prompts) and how a batch picks its slots."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from norga.nn.prefix_reparam import PREFIX_PARAMS, VIT_B16_PATCH_INPUTS, PrefixMLP

PREFIX_LAYOUTS = ("correct", "official")

#: A prompted layer's prefixes for a batch: keys and values, each (B, heads, Lp, head_dim).
LayerPrefix = tuple[Tensor, Tensor]


class PrefixPool(nn.Module):
    """Prefix slots, one per task, uniform(-1, 1) init; `prompts` stacks them in the official layout
    (layers, 2 = key/value, slots, Lp, heads, head_dim).

    Each slot is its own parameter (layers, 2, Lp, heads, head_dim), so a finished task's slot can be
    frozen (`set_trainable_slot`) and no optimizer (weight decay, stale moments) can move it.

    ``param="mlp"`` reparameterizes the slots that train (`norga.nn.prefix_reparam`): `begin_slots` binds one
    `PrefixMLP` each to up to `trained_at_once` slots, whose values are then the networks' outputs (momentum
    blends included); `commit` folds a slot's output into its plain parameter and unbinds it, so a finished slot
    is a plain one (nothing extra at inference) that no later training moves. The slot parameters themselves
    never train then; the networks, and which slot each is bound to (``bound``), are state like the slots.
    `patch_inputs` (channels x patch area of the backbone) sets the embeddings' official init.
    """

    def __init__(self, num_layers: int, num_slots: int, length: int, num_heads: int, head_dim: int,
                 generator: torch.Generator | None = None, param: str = "raw", trained_at_once: int = 1,
                 patch_inputs: int = VIT_B16_PATCH_INPUTS) -> None:
        super().__init__()
        if param not in PREFIX_PARAMS:
            raise ValueError(f"unknown prefix parameterization {param!r}; choose one of {PREFIX_PARAMS}")
        shape = (num_layers, 2, length, num_heads, head_dim)
        self.slots = nn.ParameterList(nn.Parameter(torch.empty(shape).uniform_(-1.0, 1.0, generator=generator))
                                      for _ in range(num_slots))
        self.reparameterized = param == "mlp"
        if self.reparameterized:
            self.slots.requires_grad_(False)
            self.networks = nn.ModuleList(PrefixMLP(num_layers, length, num_heads, head_dim, patch_inputs,
                                                    generator=generator) for _ in range(trained_at_once))
            self.register_buffer("bound", torch.full((trained_at_once,), -1, dtype=torch.long))
            self._bound_cache: tuple[Tensor, int, tuple[int, ...]] | None = None

    def _bound_slots(self) -> tuple[int, ...]:
        """The slot each network is bound to (-1: none), read from ``bound`` once per change of it (no device
        sync per forward; a checkpoint load writes it in place, which changes its version)."""
        cache = self._bound_cache
        if cache is None or cache[0] is not self.bound or cache[1] != self.bound._version:
            self._bound_cache = cache = (self.bound, self.bound._version, tuple(self.bound.tolist()))
        return cache[2]

    def network_of(self, slot: int) -> PrefixMLP | None:
        """The network producing `slot` now (None: the slot is its plain parameter)."""
        if not self.reparameterized:
            return None
        bound = self._bound_slots()
        return self.networks[bound.index(slot)] if slot in bound else None

    def slot(self, index: int) -> Tensor:
        """Slot `index`'s prefixes now (layers, 2, Lp, heads, head_dim): its network's output while one is bound
        to it, else its parameter."""
        network = self.network_of(index)
        return self.slots[index] if network is None else network()

    def slot_parameters(self, index: int) -> list[nn.Parameter]:
        """The tensors slot `index`'s prefixes are computed from now (its parameter, and its network's)."""
        network = self.network_of(index)
        return [self.slots[index], *(network.parameters() if network is not None else ())]

    @property
    def prompts(self) -> Tensor:
        """All slots stacked as the official ``e_prompt.prompt`` tensor (differentiable)."""
        return torch.stack([self.slot(index) for index in range(self.num_slots)], dim=2)

    @property
    def num_layers(self) -> int:
        return self.slots[0].shape[0]

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def length(self) -> int:
        return self.slots[0].shape[2]

    def set_trainable_slot(self, slot: int | None) -> None:
        """Only `slot` keeps ``requires_grad`` (None: every slot frozen); reparameterized, the network bound to
        `slot` does instead (the slot parameters never train)."""
        if self.reparameterized:
            bound = self._bound_slots()
            for network, target in zip(self.networks, bound):
                network.requires_grad_(slot is not None and target == slot)
            return
        for index, param in enumerate(self.slots):
            param.requires_grad_(index == slot)

    @torch.no_grad()
    def begin_slots(self, slots: Sequence[int], sources: Sequence[int] | None = None,
                    generator: torch.Generator | None = None) -> None:
        """Ready `slots` to train. With `sources` (sequential init: the slots trained just before, one each) raw
        slots start as copies of them, and reparameterized ones keep the networks that produced them, so each
        starts from what its source was produced as (before its momentum blend); without, raw slots stay as they
        are and the networks are drawn afresh from `generator`. Reparameterized, network j is bound to
        ``slots[j]``. Repeating it (a resumed run) gives the same state."""
        if sources is not None and len(sources) != len(slots):
            raise ValueError(f"sequential init needs one source slot per slot, got {list(sources)} for {list(slots)}")
        if not self.reparameterized:
            for source, target in zip(sources or (), slots):
                if source != target:
                    self.copy_slot(source, target)
            return
        if len(slots) > len(self.networks):
            raise ValueError(f"{len(slots)} slots train at once but this pool has {len(self.networks)} networks")
        for index, slot in enumerate(slots):
            if not 0 <= slot < self.num_slots:
                raise IndexError(f"prompt slots must be in [0, {self.num_slots}), got {slot}")
            if sources is None:
                self.networks[index].reset_parameters(generator)
            self.bound[index] = slot

    @torch.no_grad()
    def commit(self, slot: int, momentum: float = 0.0) -> None:
        """The end of `slot`'s training: raw, its momentum blend written in place (nothing when there is none);
        reparameterized, its produced prefixes (momentum-blended) folded into its parameter and its network
        unbound, so evaluating the slot costs what a plain one costs. Committing a folded slot does nothing."""
        if not self.reparameterized:
            if momentum and slot:
                self.commit_blend(slot, momentum)
            return
        if self.network_of(slot) is None:
            return
        self.slots[slot].copy_(self.blended(slot, momentum))
        self.bound[self._bound_slots().index(slot)] = -1

    @torch.no_grad()
    def load_prompts(self, prompts: Tensor) -> None:
        """Overwrite every slot from a tensor in the official (layers, 2, slots, Lp, heads, head_dim) layout."""
        if prompts.shape != self.prompts.shape:
            raise ValueError(f"prompts must be shaped {tuple(self.prompts.shape)}, got {tuple(prompts.shape)}")
        for index, param in enumerate(self.slots):
            param.copy_(prompts[:, :, index])

    @torch.no_grad()
    def copy_slot(self, source: int, target: int) -> None:
        """Initialise slot `target` from slot `source` (all layers, key and value): sequential init."""
        self.slots[target].copy_(self.slots[source])

    def blended(self, slot: int, momentum: float) -> Tensor:
        """Slot `slot` as ``(1-m)·P_slot + m·stopgrad(mean of slots < slot)`` (layers, 2, Lp, heads, head_dim).

        This is HiDe-Prompt's prompt ensemble used while training task `slot`; slot 0 and m = 0 are
        left as they are. Gradient flows to slot `slot` only (reparameterized: to its network); `P` is
        each slot's value now (`slot`).
        """
        current = self.slot(slot)
        if momentum == 0.0 or slot == 0:
            return current
        earlier = torch.stack([self.slot(i).detach() for i in range(slot)]).mean(dim=0)
        return (1.0 - momentum) * current + momentum * earlier

    @torch.no_grad()
    def commit_blend(self, slot: int, momentum: float) -> None:
        """Overwrite `slot` in place by its momentum blend (done once, after the last epoch of its task)."""
        self.slots[slot].copy_(self.blended(slot, momentum))

    def gather(
        self, slots: Tensor | int, layout: str = "correct", momentum: float = 0.0, batch_size: int = 1
    ) -> list[LayerPrefix]:
        """Per prompted layer, the (key, value) prefixes of a batch whose sample b uses ``slots[b]``.

        An int `slots` means one slot for the whole batch (training): the correct layout then returns
        batch-1 prefixes that broadcast; the official layout needs `batch_size` to mix halves as it does.

        ``layout="correct"``: sample b gets K = P[l, 0, slots[b]] and V = P[l, 1, slots[b]].
        ``layout="official"``: the official code's reshape of the gathered (L, 2, B, ...) tensor into
        (L, B, 2, ...), which pairs halves of different samples' slots (NORGA_SPEC §1.6); only for
        reproducing published numbers. `momentum` (int `slots` only) uses the `blended` training slot.
        """
        if isinstance(slots, int):
            if not 0 <= slots < self.num_slots:
                raise IndexError(f"prompt slots must be in [0, {self.num_slots}), got {slots}")
            one = self.blended(slots, momentum).unsqueeze(2)
            picked = one.expand(-1, -1, batch_size if layout == "official" else 1, -1, -1, -1)
        else:
            if momentum:
                raise ValueError("prompt momentum applies to one training slot: pass slots as an int")
            slots = torch.as_tensor(slots, device=self.slots[0].device).long().reshape(-1)
            # checked on the CPU only: on an accelerator the check would wait for the device every step
            if slots.device.type == "cpu" and slots.numel() and (slots.min() < 0 or slots.max() >= self.num_slots):
                raise IndexError(f"prompt slots must be in [0, {self.num_slots}), got {slots.tolist()}")
            picked = self.prompts[:, :, slots]  # (L, 2, B, Lp, H, d)
        if layout == "correct":
            per_layer = picked.permute(0, 2, 1, 3, 4, 5)  # (L, B, 2, Lp, H, d) by a permute, not a reshape
        elif layout == "official":
            layers, _, batch, length, heads, dim = picked.shape
            per_layer = picked.reshape(layers, batch, 2, length, heads, dim)
        else:
            raise ValueError(f"unknown prefix layout {layout!r}; choose one of {PREFIX_LAYOUTS}")
        # (B, 2, Lp, H, d) -> keys and values, each (B, H, Lp, d)
        return [(layer[:, 0].transpose(1, 2), layer[:, 1].transpose(1, 2)) for layer in per_layer]

    def gather_top_k(self, indices: Tensor, layout: str = "correct") -> list[LayerPrefix]:
        """Like `gather`, for (B, k) slot indices: a sample's k slots concatenated along the prefix length.

        k = 1 is `gather` itself (either layout); k > 1 only in the correct layout.
        """
        if indices.dim() != 2:
            raise ValueError(f"indices must be shaped (batch, top_k), got {tuple(indices.shape)}")
        if indices.shape[1] == 1:
            return self.gather(indices[:, 0], layout)
        if layout != "correct":
            raise ValueError("the official prefix layout is only reproduced for top_k = 1; use prefix_layout=correct")
        columns = [self.gather(indices[:, j], layout) for j in range(indices.shape[1])]
        return [(torch.cat([c[layer][0] for c in columns], dim=2), torch.cat([c[layer][1] for c in columns], dim=2))
                for layer in range(self.num_layers)]

    def extra_repr(self) -> str:
        layers, _, slots, length, heads, dim = self.prompts.shape
        return f"layers={layers}, slots={slots}, length={length}, heads={heads}, head_dim={dim}"
