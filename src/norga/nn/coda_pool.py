"""CODA-Prompt (Smith et al., CVPR 2023): prompts as attention-weighted sums of learnable components.

Per prompted layer: components P (M, Lp, dim), keys K (M, key_dim) and attention vectors A (M, key_dim).
For a query q (the frozen CLS feature) the weight of component m is ``α_m = cos(q ⊙ A_m, K_m)`` and the
prompt is ``Σ_m α_m P_m``; its first Lp/2 vectors are the key prefix, the rest the value prefix (split per
head as every prefix here). The M components are split evenly over the tasks: task t trains slice
``[t·M/T, (t+1)·M/T)`` (re-initialised orthogonal to the earlier slices when the task starts), earlier
slices take part detached, later ones not at all. As GT-RIPL/CODA-Prompt ``models/zoo.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.nn.prefix_pool import LayerPrefix


def gram_schmidt(existing: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """`count` random unit rows orthonormal to each other and orthogonal to the span of the rows of `existing`.

    The official code orthogonalises Gaussian vectors one by one against each earlier row separately,
    which is exact only while those rows stay orthogonal; after training they are not, so here the new
    rows are projected off an orthonormal basis of their span (float64 QR), then orthonormalised.
    """
    rows, dim = existing.shape
    if rows + count > dim:
        raise ValueError(f"cannot have {rows + count} orthogonal vectors of dimension {dim}: use fewer components")
    new = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    if rows:
        basis = torch.linalg.qr(existing.detach().cpu().double().T).Q  # (dim, rows)
        new = new - (new @ basis) @ basis.T
    orthonormal = torch.linalg.qr(new.T).Q.T
    return orthonormal.to(device=existing.device, dtype=existing.dtype)


def ortho_penalty(matrix: Tensor) -> Tensor:
    """``((W Wᵀ − I)²).mean()``: zero exactly when the rows of W are orthonormal."""
    gram = matrix @ matrix.T
    return ((gram - torch.eye(len(matrix), device=matrix.device, dtype=matrix.dtype)) ** 2).mean()


class CodaPool(nn.Module):
    """CODA-Prompt components, keys and attention vectors for `num_layers` prefix layers."""

    def __init__(self, num_layers: int, pool_size: int, length: int, num_heads: int, head_dim: int,
                 num_tasks: int, key_dim: int | None = None) -> None:
        super().__init__()
        dim = num_heads * head_dim
        key_dim = key_dim or dim
        if length < 2 or length % 2:
            raise ValueError(f"CODA prompt length must be even (half key, half value prefix), got {length}")
        if pool_size < num_tasks:
            raise ValueError(f"CODA needs at least one component per task: pool_size {pool_size} < {num_tasks} tasks")
        if pool_size > key_dim:
            raise ValueError(f"CODA keys must be orthogonal: pool_size {pool_size} exceeds the key dimension {key_dim}")
        self.num_heads, self.head_dim, self.num_tasks = num_heads, head_dim, num_tasks
        self.components = nn.Parameter(torch.zeros(num_layers, pool_size, length, dim))
        self.keys = nn.Parameter(torch.zeros(num_layers, pool_size, key_dim))
        self.attention = nn.Parameter(torch.zeros(num_layers, pool_size, key_dim))

    @property
    def num_layers(self) -> int:
        return self.components.shape[0]

    @property
    def per_task(self) -> int:
        return self.components.shape[1] // self.num_tasks

    def task_slice(self, task: int) -> slice:
        """Components trained by `task`."""
        return slice(task * self.per_task, (task + 1) * self.per_task)

    @torch.no_grad()
    def init_task(self, task: int, generator: torch.Generator | None = None) -> None:
        """Re-initialise `task`'s components, keys and attention vectors orthogonal to the earlier tasks'."""
        part = self.task_slice(task)
        for param in (self.components, self.keys, self.attention):
            for layer in range(self.num_layers):
                rows = param[layer].flatten(1)
                rows[part] = gram_schmidt(rows[: part.start], part.stop - part.start, generator)

    def _used(self, param: Tensor, layer: int, task: int, train: bool) -> Tensor:
        """Rows of tasks ≤ `task`; while training, the earlier tasks' rows detached."""
        part = self.task_slice(task)
        rows = param[layer, : part.stop]
        return torch.cat([rows[: part.start].detach(), rows[part.start :]]) if train else rows

    def weights(self, query: Tensor, layer: int, task: int, train: bool = False) -> Tensor:
        """``α (B, m) = cos(q ⊙ A_m, K_m)`` over the components of tasks ≤ `task`."""
        keys, attention = self._used(self.keys, layer, task, train), self._used(self.attention, layer, task, train)
        attended = query.unsqueeze(1) * attention.unsqueeze(0)  # (B, m, key_dim)
        return torch.einsum("bmd,md->bm", F.normalize(attended, dim=2), F.normalize(keys, dim=1))

    def prefixes(self, query: Tensor, task: int, train: bool = False) -> list[LayerPrefix]:
        """Per layer, the (key, value) prefixes, each (B, heads, Lp/2, head_dim), for queries (B, key_dim)."""
        query = query.float()
        out = []
        for layer in range(self.num_layers):
            prompt = torch.einsum("bm,mld->bld", self.weights(query, layer, task, train),
                                  self._used(self.components, layer, task, train))
            half = prompt.shape[1] // 2
            per_head = prompt.unflatten(2, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, Lp, d)
            out.append((per_head[:, :, :half], per_head[:, :, half:]))
        return out

    def ortho_loss(self, task: int) -> Tensor:
        """Σ over layers of the orthogonality penalty of K, A and the flattened P (training view of `task`)."""
        total = self.keys.new_zeros(())
        for layer in range(self.num_layers):
            for param in (self.keys, self.attention, self.components):
                total = total + ortho_penalty(self._used(param, layer, task, train=True).flatten(1))
        return total
