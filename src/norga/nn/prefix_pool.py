"""Per-task prefix prompts (HiDe-Prompt / NoRGa E-prompts) and how a batch picks its slots."""

from __future__ import annotations

import torch
from torch import Tensor, nn

PREFIX_LAYOUTS = ("correct", "official")

#: A prompted layer's prefixes for a batch: keys and values, each (B, heads, Lp, head_dim).
LayerPrefix = tuple[Tensor, Tensor]


class PrefixPool(nn.Module):
    """Prefix slots shaped (layers, 2 = key/value, slots, Lp, heads, head_dim), uniform(-1, 1) init.

    Slot i belongs to task i. The official code's tensor layout is kept so its checkpoints load as is.
    """

    def __init__(self, num_layers: int, num_slots: int, length: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        shape = (num_layers, 2, num_slots, length, num_heads, head_dim)
        self.prompts = nn.Parameter(torch.empty(shape).uniform_(-1.0, 1.0))

    @property
    def num_layers(self) -> int:
        return self.prompts.shape[0]

    @property
    def num_slots(self) -> int:
        return self.prompts.shape[2]

    @property
    def length(self) -> int:
        return self.prompts.shape[3]

    @torch.no_grad()
    def copy_slot(self, source: int, target: int) -> None:
        """Initialise slot `target` from slot `source` (all layers, key and value): sequential init."""
        self.prompts[:, :, target] = self.prompts[:, :, source]

    def blended(self, slot: int, momentum: float) -> Tensor:
        """The whole pool with `slot` replaced by ``(1-m)·P_slot + m·stopgrad(mean of slots < slot)``.

        This is HiDe-Prompt's prompt ensemble used while training task `slot`; slot 0 and m = 0 are
        left as they are. Gradient flows to slot `slot` only.
        """
        if momentum == 0.0 or slot == 0:
            return self.prompts
        earlier = self.prompts[:, :, :slot].detach().mean(dim=2)
        mixed = (1.0 - momentum) * self.prompts[:, :, slot] + momentum * earlier
        return torch.cat([self.prompts[:, :, :slot], mixed.unsqueeze(2), self.prompts[:, :, slot + 1 :]], dim=2)

    @torch.no_grad()
    def commit_blend(self, slot: int, momentum: float) -> None:
        """Overwrite `slot` in place by its momentum blend (done once, after the last epoch of its task)."""
        self.prompts.copy_(self.blended(slot, momentum))

    def gather(
        self, slots: Tensor | int, layout: str = "correct", pool: Tensor | None = None, batch_size: int = 1
    ) -> list[LayerPrefix]:
        """Per prompted layer, the (key, value) prefixes of a batch whose sample b uses ``slots[b]``.

        An int `slots` means one slot for the whole batch (training): the correct layout then returns
        batch-1 prefixes that broadcast; the official layout needs `batch_size` to mix halves as it does.

        ``layout="correct"``: sample b gets K = P[l, 0, slots[b]] and V = P[l, 1, slots[b]].
        ``layout="official"``: the official code's reshape of the gathered (L, 2, B, ...) tensor into
        (L, B, 2, ...), which pairs halves of different samples' slots (NORGA_SPEC §1.6); only for
        reproducing published numbers. `pool` overrides the parameters (e.g. a `blended` pool).
        """
        prompts = self.prompts if pool is None else pool
        if isinstance(slots, int):
            slots = [slots] * (batch_size if layout == "official" else 1)
        slots = torch.as_tensor(slots, device=prompts.device).long().reshape(-1)
        if slots.numel() and (slots.min() < 0 or slots.max() >= prompts.shape[2]):
            raise IndexError(f"prompt slots must be in [0, {prompts.shape[2]}), got {slots.tolist()}")
        picked = prompts[:, :, slots]  # (L, 2, B, Lp, H, d)
        if layout == "correct":
            per_layer = picked.permute(0, 2, 1, 3, 4, 5)  # (L, B, 2, Lp, H, d) by a permute, not a reshape
        elif layout == "official":
            layers, _, batch, length, heads, dim = picked.shape
            per_layer = picked.reshape(layers, batch, 2, length, heads, dim)
        else:
            raise ValueError(f"unknown prefix layout {layout!r}; choose one of {PREFIX_LAYOUTS}")
        # (B, 2, Lp, H, d) -> keys and values, each (B, H, Lp, d)
        return [(layer[:, 0].transpose(1, 2), layer[:, 1].transpose(1, 2)) for layer in per_layer]

    def extra_repr(self) -> str:
        layers, _, slots, length, heads, dim = self.prompts.shape
        return f"layers={layers}, slots={slots}, length={length}, heads={heads}, head_dim={dim}"
