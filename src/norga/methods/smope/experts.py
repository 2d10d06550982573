"""SMoPE's shared pool of prefix experts and its routing (SMOPE_REPARAM_SPEC A4-A7).

Per prompted block and head, `num_experts` experts, each a length-1 key/value prefix in the head's key/value space.
Each sample scores a block's experts with the mean of the block's queries (`expert_scores`), keeps its top-K per
head after a usage penalty (`penalised`, `top_experts`) and attends to them with the raw score on every query token
(`norga.nn.TokenMeanGate`): the prefix is chosen inside the block's attention from its own queries
(`norga.nn.RoutedPrefix`). The pool's routing state (usage counts, the sticky "frequently used" flags, the key
snapshot of the last task boundary) is buffers, so checkpoints hold it.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from norga.nn import Attachment, Prefix, RoutedPrefix, TokenMeanGate

#: How a forward routes: every expert (task 0's warm-up), top-K with the training penalty, top-K with the evaluation one.
RoutingMode = Literal["dense", "train", "eval"]
_TOKEN_MEAN = TokenMeanGate()


class Routed(NamedTuple):
    """What routing one prompted block recorded: its pool index, the raw scores (B, heads, experts) and the
    selected experts (B, heads, K)."""

    layer: int
    scores: Tensor
    selected: Tensor


def expert_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Each expert's score per sample and head, unscaled: the tokens' mean query (queries (B, heads, N, d)) dotted
    with its key (keys (heads, experts, d)), in float32 at least: (B, heads, experts)."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        return torch.einsum("bhd,hed->bhe", queries.to(dtype).mean(dim=2), keys.to(dtype))


def score_range(scores: Tensor) -> Tensor:
    """max - min of each (sample, head)'s scores over the experts, without gradient: (B, heads, 1)."""
    scores = scores.detach()
    return scores.amax(dim=-1, keepdim=True) - scores.amin(dim=-1, keepdim=True)


def penalised(scores: Tensor, penalty: Tensor) -> Tensor:
    """The scores routing ranks by: ``s - penalty · range`` with penalty (heads, experts); attention uses the raw s."""
    return scores - penalty * score_range(scores)


def top_experts(label: Tensor, k: int) -> Tensor:
    """The `k` best experts of each (sample, head): (B, heads, k)."""
    return label.topk(k, dim=-1).indices


def gather_experts(pool: Tensor, selected: Tensor) -> Tensor:
    """Rows `selected` (B, heads, K) of one block's pool (heads, experts, d): (B, heads, K, d)."""
    batch, dim = selected.shape[0], pool.shape[-1]
    expanded = pool.unsqueeze(0).expand(batch, -1, -1, -1)
    return expanded.gather(2, selected.unsqueeze(-1).expand(-1, -1, -1, dim))


def router_loss(scores: Tensor, selected: Tensor, margin: float) -> Tensor:
    """Per sample: Σ over heads and the K selected experts of the cross-entropy of the scores (B, heads, experts) with
    that expert as target; the unselected experts' scores are raised by ``margin · range`` first (0: none)."""
    logits = scores
    if margin:
        unselected = torch.ones_like(scores).scatter_(-1, selected, 0.0)
        logits = scores + margin * score_range(scores) * unselected
    return -logits.log_softmax(dim=-1).gather(-1, selected).sum(dim=(1, 2))


def prototype_loss(old_keys: Tensor, keys: Tensor, frequent: Tensor, k: int) -> Tensor:
    """Σ over blocks and heads of the mean, over the frequently used experts' snapshot keys p, of Σ over the top-k
    experts j of ``old_keys·p`` of the cross-entropy of ``keys·p`` with target j. Pools (blocks, heads, experts, d),
    `frequent` (blocks, heads, experts)."""
    dtype = torch.promote_types(keys.dtype, torch.float32)
    with torch.autocast(keys.device.type, enabled=False):
        old_keys, keys = old_keys.to(dtype), keys.to(dtype)
        targets = (old_keys @ old_keys.transpose(-2, -1)).topk(k, dim=-1).indices  # (L, H, E rows, k)
        log_probs = (old_keys @ keys.transpose(-2, -1)).log_softmax(dim=-1)
        per_row = -log_probs.gather(-1, targets).sum(dim=-1)  # (L, H, E)
        rows = frequent.to(per_row.dtype)
        return ((per_row * rows).sum(dim=-1) / rows.sum(dim=-1).clamp_min(1.0)).sum()


def usage_flags(counts: Tensor, rule: str) -> Tensor:
    """Experts used at least as often as the mean (over the experts with a non-zero count: "mean_nonzero", the
    code's; over all: "mean_all", the poster's); a head whose counts are all zero flags every expert."""
    total = counts.sum(dim=-1, keepdim=True).double()
    if rule == "mean_nonzero":
        mean = total / (counts > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    elif rule == "mean_all":
        mean = total / counts.shape[-1]
    else:
        raise ValueError(f"unknown usage threshold {rule!r}; choose 'mean_nonzero' or 'mean_all'")
    return counts.double() >= mean


def selection_counts(scores: Tensor, k: int) -> Tensor:
    """How often each expert is among a sample's top-k raw scores (B, heads, experts), summed over the batch."""
    chosen = torch.zeros_like(scores, dtype=torch.long).scatter_(-1, scores.topk(k, dim=-1).indices, 1)
    return chosen.sum(dim=0)


class ExpertPool(nn.Module):
    """Keys and values (blocks, heads, experts, head_dim), U(0, 1) as the official code, and the routing state:
    ``usage`` (how often each expert was in a training image's top-K, over all tasks), ``frequent`` (sticky flags)
    and ``old_keys`` (the keys at the last task boundary)."""

    def __init__(self, blocks: list[int], heads: int, experts: int, head_dim: int, top_k: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.blocks, self.top_k = list(blocks), top_k
        shape = (len(self.blocks), heads, experts, head_dim)
        self.keys = nn.Parameter(torch.rand(shape, generator=generator))
        self.values = nn.Parameter(torch.rand(shape, generator=generator))
        self.register_buffer("usage", torch.zeros(shape[:3], dtype=torch.long))
        self.register_buffer("frequent", torch.zeros(shape[:3], dtype=torch.bool))
        self.register_buffer("old_keys", torch.zeros(shape))

    def attachments(self, penalties: Tensor | None, record: list[Routed] | None = None) -> dict[int, Attachment]:
        """What one forward attaches to the prompted blocks: every expert (`penalties` None, dense), or each
        sample's top-K per head ranked with `penalties` (blocks, heads, experts), recording each block's routing."""
        if penalties is None:
            return {block: Prefix(self.keys[i][None], self.values[i][None], _TOKEN_MEAN)
                    for i, block in enumerate(self.blocks)}
        return {block: RoutedPrefix(functools.partial(self._route, i, penalties[i], record), _TOKEN_MEAN)
                for i, block in enumerate(self.blocks)}

    def _route(self, layer: int, penalty: Tensor, record: list[Routed] | None, queries: Tensor) -> tuple[Tensor, Tensor]:
        scores = expert_scores(queries, self.keys[layer])
        selected = top_experts(penalised(scores, penalty), self.top_k)
        if record is not None:
            record.append(Routed(layer, scores, selected))
        return gather_experts(self.keys[layer], selected), gather_experts(self.values[layer], selected)

    def training_penalties(self, noise: float) -> Tensor:
        """ε on the frequently used experts, 0 elsewhere."""
        return self.frequent.float() * noise

    def evaluation_penalties(self, unused: float) -> Tensor:
        """`unused` on the experts no training image has selected yet, 0 elsewhere."""
        return (self.usage == 0).float() * unused

    def usage_of(self, record: list[Routed]) -> Tensor:
        """The usage counts (blocks, heads, experts) one forward's routing adds: each sample's top-K raw scores."""
        counts = torch.zeros_like(self.usage)
        for routed in record:
            counts[routed.layer] += selection_counts(routed.scores, self.top_k).to(counts.device)
        return counts

    @torch.no_grad()
    def cross_boundary(self, rule: str) -> None:
        """At the start of a task after the first: snapshot the keys, flag the frequently used experts (sticky)."""
        self.old_keys.copy_(self.keys)
        self.frequent |= usage_flags(self.usage, rule)

    def routing_summary(self) -> dict[str, list[int]]:
        """Per prompted block: how many (head, expert) pairs were ever used and how many are flagged frequent."""
        return {"blocks": self.blocks, "used": (self.usage > 0).sum(dim=(1, 2)).tolist(),
                "frequent": self.frequent.sum(dim=(1, 2)).tolist()}
