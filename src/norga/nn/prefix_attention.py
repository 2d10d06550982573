"""A prefix-aware drop-in for timm's ViT `Attention` that reuses the block's own frozen weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from timm.layers import Attention
from torch import Tensor, nn

from norga.nn.gates import ScoreGate
from norga.nn.prefix_kernels import fused_prefix_attention, reference_prefix_attention

ATTENTION_IMPLS = ("fused", "reference")

#: Chooses a block's prefix from its own queries: ``route(q)`` with q (B, heads, N, head_dim) after ``q_norm``
#: returns prefix keys and values, each (B or 1, heads, Lp, head_dim) (`PrefixAttention.routed`).
PrefixRoute = Callable[[Tensor], tuple[Tensor, Tensor]]


class PrefixAttention(nn.Module):
    """Multi-head self-attention whose keys/values are extended by per-sample prefixes.

    Built from a timm `Attention`, it adopts that module's sub-modules under the same names (``qkv``,
    ``q_norm``, ``k_norm``, ``norm``, ``proj`` ...), so state-dict keys and weights stay those of the
    backbone. Prefixes are injected directly in per-head key/value space (not through ``qkv``), as in
    the official code; ``k_norm`` applies to the tokens' keys only. Without a bound prefix it computes
    exactly the original attention. A prefix is either given (`bound`) or chosen per call from the block's
    queries (`routed`, e.g. a mixture of prefix experts routed by the mean query).
    """

    def __init__(self, attention: Attention, impl: str = "fused") -> None:
        super().__init__()
        if not isinstance(attention, Attention):
            raise TypeError(
                f"PrefixAttention wraps timm.layers.Attention, got {type(attention).__name__}; "
                "this backbone's attention variant is not supported yet"
            )
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.scale = attention.scale
        self.qkv = attention.qkv
        self.q_norm = attention.q_norm
        self.k_norm = attention.k_norm
        self.attn_drop = attention.attn_drop
        self.norm = getattr(attention, "norm", nn.Identity())
        self.gate = getattr(attention, "gate", None)  # timm's optional output gate, not the score gate
        self.proj = attention.proj
        self.proj_drop = attention.proj_drop
        self.impl = impl
        self._prefix: tuple[PrefixRoute, ScoreGate] | None = None

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {value!r}; choose one of {ATTENTION_IMPLS}")
        self._impl = value

    @property
    def has_prefix(self) -> bool:
        """Whether a prefix is bound (`bound` or `routed`) for the forward passes now."""
        return self._prefix is not None

    def bound(self, prefix_k: Tensor, prefix_v: Tensor, gate: ScoreGate) -> AbstractContextManager[None]:
        """Use these prefixes, each (B or 1, heads, Lp, head_dim), and this score gate inside the block.

        Scoped and re-entrant: leaving the context restores whatever was bound before it (nothing, or an
        outer binding), also when the forward inside raises.
        """
        self._check_prefix(prefix_k, prefix_v)
        return self.routed(lambda _q: (prefix_k, prefix_v), gate)

    @contextmanager
    def routed(self, route: PrefixRoute, gate: ScoreGate) -> Iterator[None]:
        """Use the prefix ``route(q)`` of each call's queries (checked as `bound`'s) and this score gate; scoped
        and re-entrant as `bound`."""
        outer, self._prefix = self._prefix, (route, gate)
        try:
            yield
        finally:
            self._prefix = outer

    def _check_prefix(self, prefix_k: Tensor, prefix_v: Tensor) -> None:
        expected = (self.num_heads, self.head_dim)
        for name, prefix in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if prefix.dim() != 4 or (prefix.shape[1], prefix.shape[3]) != expected:
                raise ValueError(
                    f"{name} must be shaped (batch, {expected[0]}, length, {expected[1]}), got {tuple(prefix.shape)}"
                )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None = None, prefix_v: Tensor | None = None,
               gate: ScoreGate | None = None) -> Tensor:
        """The attention of queries q over keys k and values v (each (B, heads, length, head_dim), after the q/k
        norms) and the prefix, if any, through this module's kernel (`impl`), with its dropout when training."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        kernel = fused_prefix_attention if self.impl == "fused" else reference_prefix_attention
        return kernel(q, k, v, prefix_k, prefix_v, gate, self.scale, dropout_p)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("prefix attention does not support attention masks")
        batch, tokens, _ = x.shape
        output_gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        prefix_k = prefix_v = gate = None
        if self._prefix is not None:
            route, gate = self._prefix
            prefix_k, prefix_v = route(q)
            self._check_prefix(prefix_k, prefix_v)
        x = self.attend(q, k, v, prefix_k, prefix_v, gate)
        x = x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        x = self.norm(x)
        if output_gate is not None:
            x = x * output_gate
        x = self.proj(x)
        return self.proj_drop(x)
