"""Per-layer feature statistics of old tasks' images, as sufficient statistics for VPT-NSP²'s projectors.

For one prompted block and old image tokens X, the two conditions of the paper (Eq. 24-25) need the Gram matrices of
- the affinity features Ω1 = [Q_h·W_k,h]_h (one D-vector per image token and head: queries mapped back through that
  head's key weight), C1 = Ω1ᵀΩ1 (D×D), and
- the aggregation features Ω2 = [S_P,h]_h (the image tokens' softmax attention on the M prompt keys), C2 = Ω2ᵀΩ2.

C1 is not accumulated as D×D: since the key weight is frozen, C1 = Σ_h W_k,hᵀ·(Σ q_hᵀq_h)·W_k,h, so per head the d×d
query Gram suffices (H·d² instead of D² numbers, and H·d² instead of H·D² work per token). Everything is
accumulated in float64, as sums, so the result does not depend on the order of the batches (to float64 rounding).
``per_batch_mean=True`` reproduces the official code, which adds each batch's Gram divided by its row count
(B·H·N), so a short last batch weighs as much as a full one; the paper's Algorithm 1 sums plainly (the default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

ACCUMULATE_MODES = ("sum", "mean")


def prompt_attention(queries: Tensor, image_keys: Tensor, prompt_keys: Tensor, scale: float) -> Tensor:
    """The image tokens' attention probabilities on the prompt keys, (B, H, N, M).

    queries (B, H, N, d) and image_keys (B, H, N, d) of the image tokens, prompt_keys (B or 1, H, M, d); the softmax
    runs over all N + M keys, as in the prompted block, and only its prompt columns are returned.
    """
    prompt_keys = prompt_keys.expand(queries.shape[0], -1, -1, -1)
    logits = torch.cat([queries @ image_keys.transpose(-2, -1), queries @ prompt_keys.transpose(-2, -1)], dim=-1)
    return logits.mul(scale).softmax(dim=-1)[..., image_keys.shape[-2]:]


def affinity_features(queries: Tensor, key_weight: Tensor) -> Tensor:
    """Ω1 rows, (B·H·N, D): each head's queries (B, H, N, d) times that head's rows of the key weight (H·d, D)."""
    batch, heads, tokens, head_dim = queries.shape
    per_head = key_weight.reshape(heads, head_dim, -1)
    return torch.einsum("bhnd,hde->bhne", queries, per_head).reshape(batch * heads * tokens, -1)


@dataclass
class LayerStatistics:
    """One block's sums: per-head query Grams (H, d, d), prompt-attention Gram (M, M), images and batches seen."""

    query_gram: Tensor
    attention_gram: Tensor
    per_batch_mean: bool = False
    images: int = 0
    batches: int = 0

    @classmethod
    def empty(cls, heads: int, head_dim: int, prompts: int, per_batch_mean: bool = False,
              device: torch.device | str = "cpu") -> LayerStatistics:
        return cls(torch.zeros(heads, head_dim, head_dim, dtype=torch.float64, device=device),
                   torch.zeros(prompts, prompts, dtype=torch.float64, device=device), per_batch_mean)

    def add(self, queries: Tensor, attention: Tensor) -> None:
        """Add one batch: image-token queries (B, H, N, d) and their prompt attention (B, H, N, M)."""
        batch, heads, tokens, head_dim = queries.shape
        if tuple(self.query_gram.shape) != (heads, head_dim, head_dim) or attention.shape[:3] != queries.shape[:3] \
                or attention.shape[-1] != self.attention_gram.shape[0]:
            raise ValueError(f"batch of queries {tuple(queries.shape)} and prompt attention {tuple(attention.shape)} "
                             f"does not match statistics for {self.query_gram.shape[0]} heads of width "
                             f"{self.query_gram.shape[-1]} and {self.attention_gram.shape[0]} prompts")
        q = queries.detach().to(torch.float64)  # the Grams are formed where the batch is, then moved (small)
        s = attention.detach().to(torch.float64).reshape(-1, attention.shape[-1])
        query_gram = torch.einsum("bhnd,bhne->hde", q, q).to(self.query_gram.device)
        attention_gram = (s.T @ s).to(self.attention_gram.device)
        if self.per_batch_mean:
            rows = batch * heads * tokens
            query_gram, attention_gram = query_gram / rows, attention_gram / rows
        self.query_gram += query_gram
        self.attention_gram += attention_gram
        self.images += batch
        self.batches += 1

    def affinity_covariance(self, key_weight: Tensor) -> Tensor:
        """C1 = Ω1ᵀΩ1 (D×D, float64) from the block's key weight (H·d, D)."""
        heads, head_dim, _ = self.query_gram.shape
        w = key_weight.detach().to(device=self.query_gram.device, dtype=torch.float64).reshape(heads, head_dim, -1)
        return torch.einsum("hdi,hde,hej->ij", w, self.query_gram, w)

    def aggregation_covariance(self) -> Tensor:
        """C2 = Ω2ᵀΩ2 (M×M, float64)."""
        return self.attention_gram.clone()

    def merged(self, task: LayerStatistics, mode: str = "sum") -> LayerStatistics:
        """History (self) and a new task's statistics combined: 'sum' (paper, official default) adds them; 'mean'
        weights each by its number of images (the official ``--null_interm_accum mean``)."""
        if mode not in ACCUMULATE_MODES:
            raise ValueError(f"unknown accumulation {mode!r}; choose one of {ACCUMULATE_MODES}")
        if task.per_batch_mean != self.per_batch_mean:
            raise ValueError("cannot merge statistics taken with and without per_batch_mean")
        old, new = (1.0, 1.0) if mode == "sum" or self.images == 0 else \
            (self.images / (self.images + task.images), task.images / (self.images + task.images))
        return LayerStatistics(old * self.query_gram + new * task.query_gram,
                               old * self.attention_gram + new * task.attention_gram, self.per_batch_mean,
                               self.images + task.images, self.batches + task.batches)

    def state_dict(self) -> dict:
        return {"query_gram": self.query_gram, "attention_gram": self.attention_gram,
                "per_batch_mean": torch.tensor(self.per_batch_mean), "images": torch.tensor(self.images),
                "batches": torch.tensor(self.batches)}

    @classmethod
    def from_state_dict(cls, state: dict) -> LayerStatistics:
        return cls(state["query_gram"].to(torch.float64), state["attention_gram"].to(torch.float64),
                   bool(state["per_batch_mean"]), int(state["images"]), int(state["batches"]))


@dataclass
class TaskStatistics:
    """Statistics of every prompted layer, keyed by the prompt parameter's name (never by ``id()``)."""

    layers: dict[str, LayerStatistics] = field(default_factory=dict)

    def merged(self, task: TaskStatistics, mode: str = "sum") -> TaskStatistics:
        if self.layers and set(self.layers) != set(task.layers):
            raise ValueError(f"statistics for layers {sorted(task.layers)} cannot be merged into {sorted(self.layers)}")
        return TaskStatistics({name: self.layers[name].merged(stats, mode) if name in self.layers else stats
                               for name, stats in task.layers.items()})

    def state_dict(self) -> dict:
        return {f"{name}.{key}": value for name, stats in self.layers.items() for key, value in stats.state_dict().items()}

    @classmethod
    def from_state_dict(cls, state: dict) -> TaskStatistics:
        names = sorted({key.rsplit(".", 1)[0] for key in state})
        return cls({name: LayerStatistics.from_state_dict({key.rsplit(".", 1)[1]: value for key, value in state.items()
                                                           if key.rsplit(".", 1)[0] == name}) for name in names})
