"""The LoRA deltas of InfLoRA and SD-LoRA, one low-rank pair per task and block, attached to the host as `RowDelta`s
on slices of timm's fused ``attn.qkv`` (the backbone's modules and state-dict keys stay timm's).

Notation (LORA_SPEC §0): a delta on the rows W (d_out × d) of ``qkv`` is ΔW = B·A with the down-projection A (r × d)
and the up-projection B (d_out × r); a block's input x (its ``norm1`` output) gets ``x·ΔWᵀ`` added to those rows.
Both banks preallocate every task's tensors, so a checkpoint has the same shapes at every point of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from norga.nn.attachments import RowDelta, qkv_rows

QKV = "attn.qkv"


def low_rank_delta(down: Tensor, up: Tensor, scale: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``x ↦ ((x·downᵀ) ⊙ scale)·upᵀ``: a sum of LoRA terms stacked along the rank (down (R, d), up (d_out, R),
    scale (R,) or None), computed factored (two thin products, never the d_out × d matrix)."""

    def delta(x: Tensor) -> Tensor:
        hidden = nn.functional.linear(x, down)
        if scale is not None:
            hidden = hidden * scale.to(hidden.dtype)
        return nn.functional.linear(hidden, up)

    return delta


class InfLoRABank(nn.Module):
    """InfLoRA's deltas on the key and value rows: per task t and block l a designed down-projection A (r × d,
    frozen: a buffer, the same for k and v as officially) and a trained up-projection [B_k; B_v] (2d × r, zero at
    the start of its task). The forward of task t sums every task's term up to t (LORA_SPEC §2.1)."""

    def __init__(self, tasks: int, depth: int, dim: int, rank: int) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        self.register_buffer("down", torch.zeros(tasks, depth, rank, dim))
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(depth, 2 * dim, rank)) for _ in range(tasks))

    @property
    def depth(self) -> int:
        return self.down.shape[1]

    def train_only(self, task: int | None) -> list[nn.Parameter]:
        """Make task `task`'s up-projection the only trainable tensor of the bank (None: none); returns it."""
        for index, up in enumerate(self.up):
            up.requires_grad_(index == task)
        return [] if task is None else [self.up[task]]

    def block_weights(self, block: int, upto: int) -> tuple[Tensor, Tensor]:
        """Tasks 0..`upto` stacked along the rank at `block`: down ((upto+1)·r, d) and up (2d, (upto+1)·r)."""
        down = self.down[: upto + 1, block].reshape(-1, self.dim)
        up = torch.cat([self.up[task][block] for task in range(upto + 1)], dim=1)
        return down, up

    def delta_weight(self, block: int, upto: int) -> Tensor:
        """Σ_{i ≤ upto} B_i·A_i at `block`, (2d, d): the dense form, for tests and merging."""
        down, up = self.block_weights(block, upto)
        return up @ down

    def attachments(self, upto: int) -> dict[int, RowDelta]:
        """Every block's delta with the tasks 0..`upto`, on the key and value rows of ``attn.qkv``."""
        rows = slice(qkv_rows("k", self.dim).start, qkv_rows("v", self.dim).stop)
        return {block: RowDelta(QKV, low_rank_delta(*self.block_weights(block, upto)), rows)
                for block in range(self.depth)}


#: SD-LoRA's targets, in the order of the bank's first dimension.
SD_TARGETS = ("q", "v")


class SDLoRABank(nn.Module):
    """SD-LoRA's deltas on the query and value rows (LORA_SPEC §3.1-3.2): per task i, target and block a pair
    (A_i, B_i) (A Kaiming-uniform, B zero at the start of task i), and one magnitude m_i per task shared by every
    block and both targets. While task t trains, the delta is ``Σ_{i<t} m_i·B_iA_i/n_i + m_t·B_tA_t`` with n_i the
    old direction's norm: ‖B_iA_i‖_F (the paper), or ‖B_i‖_F·‖A_i‖_F (`norm_product`, the official code). A term
    whose norm is zero (its B never moved) is left out."""

    def __init__(self, tasks: int, depth: int, dim: int, rank: int, init_magnitude: float,
                 generator: torch.Generator | None = None, norm_product: bool = False) -> None:
        super().__init__()
        self.dim, self.rank, self.norm_product = dim, rank, norm_product
        bound = 1 / math.sqrt(dim)  # kaiming_uniform_(a=√5) on a (r, d) weight: U(-1/√d, 1/√d), as nn.Linear
        self.down = nn.ParameterList(
            nn.Parameter(torch.empty(len(SD_TARGETS), depth, rank, dim).uniform_(-bound, bound, generator=generator))
            for _ in range(tasks))
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(len(SD_TARGETS), depth, dim, rank)) for _ in range(tasks))
        self.magnitudes = nn.ParameterList(nn.Parameter(torch.tensor(float(init_magnitude))) for _ in range(tasks))

    @property
    def depth(self) -> int:
        return self.down[0].shape[1]

    def train_only(self, task: int | None) -> list[nn.Parameter]:
        """Make task `task`'s (A, B) and the magnitudes m_0..m_task the bank's only trainable tensors; returns them."""
        upto = -1 if task is None else task
        for index in range(len(self.down)):
            self.down[index].requires_grad_(index == task)
            self.up[index].requires_grad_(index == task)
            self.magnitudes[index].requires_grad_(index <= upto)
        return [] if task is None else [self.down[task], self.up[task], *self.magnitudes[: task + 1]]

    @torch.no_grad()
    def direction_norm(self, task: int, target: int, block: int) -> Tensor:
        """n_i of one old direction: ‖B A‖_F (via the r × r Grams), or ‖B‖_F·‖A‖_F with `norm_product`."""
        down, up = self.down[task][target, block].double(), self.up[task][target, block].double()
        if self.norm_product:
            return (torch.linalg.matrix_norm(up) * torch.linalg.matrix_norm(down)).float()
        return torch.trace((up.T @ up) @ (down @ down.T)).clamp_min(0).sqrt().float()

    def scales(self, target: int, block: int, upto: int) -> Tensor:
        """Per rank column of tasks 0..`upto`: m_i/n_i for the old tasks (0 where n_i is 0) and m_upto for the current."""
        parts = []
        for task in range(upto + 1):
            magnitude = self.magnitudes[task]
            if task < upto:
                norm = self.direction_norm(task, target, block)
                magnitude = torch.where(norm > 0, magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                                        torch.zeros_like(magnitude))
            parts.append(magnitude.expand(self.rank))
        return torch.cat(parts)

    def block_weights(self, target: int, block: int, upto: int) -> tuple[Tensor, Tensor, Tensor]:
        """Tasks 0..`upto` stacked along the rank: down ((upto+1)·r, d), up (d, (upto+1)·r) and their scales."""
        down = torch.cat([self.down[task][target, block] for task in range(upto + 1)])
        up = torch.cat([self.up[task][target, block] for task in range(upto + 1)], dim=1)
        return down, up, self.scales(target, block, upto)

    def delta_weight(self, target: int, block: int, upto: int) -> Tensor:
        """``Σ_{i<upto} m_i·B_iA_i/n_i + m_upto·B_uptoA_upto`` at `block`, (d, d): the dense form."""
        down, up, scale = self.block_weights(target, block, upto)
        return (up * scale) @ down

    @torch.no_grad()
    def finish_task(self, task: int) -> None:
        """Task `task`'s raw term m·B_lA_l (per block and target l) becomes an old direction m'·D_l with D_l =
        B_lA_l/n_l, keeping the magnitude learned (the paper; the official code resets it). One magnitude serves every
        block and target while the norms n_l differ, so no m' keeps every block's function exactly: m' is the
        closest in weight space, argmin Σ_l ‖m·n_l·D_l − m'·D_l‖²_F = m·Σ_l n_l‖D_l‖² / Σ_l ‖D_l‖² (m times the mean
        of the n_l when each ‖D_l‖ is 1, the paper's normalisation); exact when all n_l are equal."""
        weighted = total = 0.0
        for target in range(len(SD_TARGETS)):
            for block in range(self.depth):
                norm = float(self.direction_norm(task, target, block))
                if norm == 0:
                    continue
                raw = self.up[task][target, block].double() @ self.down[task][target, block].double()
                squared = float(torch.linalg.matrix_norm(raw)) ** 2 / norm**2  # ‖D_l‖²
                weighted, total = weighted + norm * squared, total + squared
        if total > 0:
            self.magnitudes[task].mul_(weighted / total)

    @torch.no_grad()
    def reset_magnitudes(self, upto: int, value: float) -> None:
        """Every magnitude m_0..m_upto set to `value` (the official code's per-task re-creation at 0.8)."""
        for task in range(upto + 1):
            self.magnitudes[task].fill_(value)

    def attachments(self, upto: int) -> dict[int, list[RowDelta]]:
        """Every block's deltas with the tasks 0..`upto`, on the query and value rows of ``attn.qkv``."""
        return {block: [RowDelta(QKV, low_rank_delta(*self.block_weights(target, block, upto)),
                                 qkv_rows(name, self.dim))
                        for target, name in enumerate(SD_TARGETS)]
                for block in range(self.depth)}
