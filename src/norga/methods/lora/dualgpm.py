"""InfLoRA's protected subspaces (DualGPM) and its interference-free down-projections (LORA_SPEC §2.4-2.5).

Per block, after each task, the inputs' uncentred second moment C (d × d) updates a stored orthonormal basis U:
``remove`` (U spans the old tasks' input subspace, protected) or ``retain`` (U spans its complement, the free space;
used once the protected part is wider than d/2, so the stored basis never is). The energy criterion squares the
singular values of C, i.e. fourth powers of the data's, as the official code does (§2.5). Everything here is float64;
the official update runs in numpy float64, its A design in torch float32.

The down-projection of a new task is the top-r left singular vectors of C projected off the protected subspace,
divided by √3 (A·Aᵀ = I/3): A·u = 0 for every protected u, so whatever B learns, BAx = 0 for old inputs x there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

DOWN_SCALE = 1 / math.sqrt(3)  # the official designed A's rows: orthonormal / √3


@dataclass
class Subspace:
    """One block's stored basis (d × k, orthonormal columns, float64) and what it spans."""

    basis: Tensor
    kind: Literal["remove", "retain"]

    def projector(self) -> Tensor:
        return self.basis @ self.basis.T


def energy_threshold(first: float, end: float, task: int, tasks: int) -> float:
    """ε_t = first + (end − first)·t/T (official ``lamb``, ``lame``, ``total_sessions``)."""
    return first + (end - first) * task / tasks


def _svd(matrix: Tensor, full: bool = False) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values (descending) in float64."""
    u, s, _ = torch.linalg.svd(matrix.to(torch.float64), full_matrices=full)
    return u, s


def first_subspace(moment: Tensor, threshold: float, official_retain_basis: bool = False) -> Subspace:
    """The first task's basis: r = #{cumulative energy share < ε} leading directions (at least 1; the official
    ``+1`` is commented out, so the kept share can be below ε). Past half the width the type is ``retain`` and the
    stored basis is the complement of those r directions; the official code (`official_retain_basis`) stores the
    r leading directions themselves there (§2.5 item 4), which its own check then refuses."""
    u, s = _svd(moment)
    energy = s**2
    r = int((torch.cumsum(energy, 0) / energy.sum() < threshold).sum())
    kept = max(r, 1)
    if r < moment.shape[0] / 2:
        return Subspace(u[:, :kept], "remove")
    return flipped(Subspace(u[:, :kept] if official_retain_basis else u[:, kept:], "retain"))


def updated_subspace(subspace: Subspace, moment: Tensor, threshold: float) -> Subspace:
    """The basis after a later task with second moment `moment` (official ``update_DualGPM``), then flipped to its
    complement if a ``remove`` basis grew past half the width (`flipped`)."""
    total = float((_svd(moment)[1] ** 2).sum())
    u, p = subspace.basis, subspace.projector()
    if subspace.kind == "remove":
        new, s = _svd(moment - p @ moment.to(torch.float64))
        ratios = (s**2 / total).tolist()
        captured, r = (total - float((s**2).sum())) / total, 0  # the share U already holds
        while r < len(ratios) and captured < threshold:
            captured, r = captured + ratios[r], r + 1
        if r == 0:
            return flipped(subspace)
        basis = torch.cat([u, new[:, :r]], dim=1)[:, : moment.shape[0]]
        return flipped(Subspace(basis, "remove"))
    new, s = _svd(p @ moment.to(torch.float64))
    ratios = (s**2 / total).tolist()
    free, r = float((s**2).sum()) / total, 0  # the share still unprotected
    while r < len(ratios) and free >= 1 - threshold:
        free, r = free - ratios[r], r + 1
    if r == 0:
        return flipped(subspace)
    taken = new[:, :r]
    remaining = _svd(u - taken @ (taken.T @ u), full=True)[0]
    return flipped(Subspace(remaining[:, : u.shape[1] - r], "retain"))


def flipped(subspace: Subspace) -> Subspace:
    """A ``remove`` basis wider than d/2 replaced by its orthogonal complement (type ``retain``); a ``retain`` basis
    wider than d/2 (only the official first-task branch makes one) is refused, as the official assertion does."""
    d, k = subspace.basis.shape
    if k <= d / 2:
        return subspace
    if subspace.kind == "retain":
        raise ValueError(f"a retain basis of {k} of {d} directions: the official first-task branch stored the kept "
                         "directions instead of their complement and its check stops here; run with "
                         "inflora.official_retain_basis=false")
    return Subspace(_svd(subspace.basis, full=True)[0][:, k:], "retain")


def designed_down(moment: Tensor, subspace: Subspace | None, rank: int) -> Tensor:
    """A (rank × d, float64): the top-`rank` left singular vectors of C off the protected subspace — C itself on the
    first task, (I − P)C for a ``remove`` basis, PC for a ``retain`` one — as rows, divided by √3."""
    moment = moment.to(torch.float64)
    if subspace is not None:
        projected = subspace.projector() @ moment
        moment = moment - projected if subspace.kind == "remove" else projected
    u, _ = _svd(moment)
    if u.shape[1] < rank:
        raise ValueError(f"rank {rank} exceeds the block's width {u.shape[0]}: lower inflora.rank")
    return u[:, :rank].T * DOWN_SCALE
