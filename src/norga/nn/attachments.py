"""What a method attaches to a block of the host for one forward pass: the host's one extension point.

An attachment binds itself to one timm `Block` for the duration of a context (`Attachment.bind`) and leaves
the block as it was when the context ends, also when the forward inside raises. The host binds whatever a
method passes per call (`PromptedViT.forward_features(attachments=...)`) and knows no kind: a new kind is a
class with a ``bind``, not a host edit. Attachments hold no parameters of their own; the method owns the
modules whose tensors they carry (and checkpoints them, `norga.runtime.training.PhaseTraining`).

The kinds here:

- `Prefix`: prefix keys and values with a score gate in the block's `PrefixAttention` (prefix tuning, NoRGa);
- `RoutedPrefix`: a prefix chosen per call from the block's own queries (a mixture of prefix experts, SMoPE);
- `ProjectedPrefix`: prompts turned into prefixes by the block's own ``norm1`` and the key/value rows of its
  ``attn.qkv`` (VPT-NSP style);
- `PromptTokens`: tokens prepended to the sequence before the block (prompt tuning, L2P);
- `RowDelta`: an additive term on (a slice of the rows of) a sub-module's output, e.g. a LoRA delta on the key
  and value rows of timm's fused ``attn.qkv`` (`qkv_rows`), or on ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``;
- `ScaleShift`: SSF's ``y * scale + shift`` on a sub-module's output;
- `Adapter`: a residual adapter after a sub-module (``attn``, ``mlp``), sequential or parallel (AdaptFormer).

The hooked kinds also attach outside the blocks, under the key `BACKBONE`: their sites are then the timm model's
own sub-modules (``patch_embed``, the final ``norm``).

The hooked kinds are torch forward hooks on timm's own modules, so the backbone's modules, weights and
state-dict keys stay exactly timm's. A module that regional compile compiled would ignore a hook added later
(torch guards no hooks of a compiled module), so binding a hook first gives the region it lies in back its
eager forward (`norga.nn.regional_compile.uncompiled`), for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from norga.nn.gates import IdentityGate, ScoreGate
from norga.nn.prefix_attention import PrefixAttention, PrefixRoute
from norga.nn.regional_compile import is_compiled, uncompiled

log = logging.getLogger("norga")

_NO_GATE = IdentityGate()
#: The key under which `PromptedViT.forward_features` takes attachments to the timm model itself rather than to a
#: block: their sites are its sub-modules outside the blocks (``"patch_embed"``, the final ``"norm"``; SSF's).
BACKBONE = "backbone"


@runtime_checkable
class Attachment(Protocol):
    """Anything a method attaches to block `index` of the host for one forward pass.

    `bind` changes `block` while its context is active and undoes that at exit; `added_tokens` is how many
    tokens it puts in front of the sequence (the host drops them before pooling). A kind may also name a part
    of the block that one attachment at a time can hold (class attribute ``holds``, e.g. ``"prefix"``): the
    host refuses two of them on one block rather than let the later one hide the earlier.
    """

    added_tokens: int

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]: ...


# ------------------------------------------------------------------ prefixes
class Prefix(NamedTuple):
    """One block's prefix: keys and values, each (B or 1, heads, Lp, head_dim), and its score gate (None: none).

    Bound in the block's `PrefixAttention` (`PromptedViT.install_prefix_layers`)."""

    key: Tensor
    value: Tensor
    gate: ScoreGate | None = None
    added_tokens = 0  # a class attribute, not a field
    holds = "prefix"

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        return prefix_attention(block, index).bound(self.key, self.value, self.gate or _NO_GATE)


class RoutedPrefix(NamedTuple):
    """A prefix the block's `PrefixAttention` asks for with its own queries: ``route(q)``, q (B, heads, N, head_dim)
    after ``q_norm``, returns keys and values (B or 1, heads, Lp, head_dim); e.g. each sample's top-K experts of a
    pool scored by the mean query (SMoPE). Bound with its score gate as `Prefix`."""

    route: PrefixRoute
    gate: ScoreGate | None = None
    added_tokens = 0  # a class attribute, not a field
    holds = "prefix"

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        return prefix_attention(block, index).routed(self.route, self.gate or _NO_GATE)


class ProjectedPrefix(NamedTuple):
    """Prompts (B or 1, Lp, dim) made prefixes by the block itself: ``norm1``, then the key and value rows of
    ``attn.qkv`` (and ``attn.k_norm`` on the keys, as on the tokens' keys), split into heads (VPT-NSP).

    The projections are the block's modules, so hooks already bound on them (e.g. a `RowDelta` listed
    before this attachment) act on the prompts too. Needs the block's `PrefixAttention`."""

    prompts: Tensor
    gate: ScoreGate | None = None
    added_tokens = 0  # a class attribute, not a field
    holds = "prefix"

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        attention = prefix_attention(block, index)
        if self.prompts.dim() != 3:
            raise ValueError(f"prompts must be shaped (batch or 1, length, dim), got {tuple(self.prompts.shape)}")
        batch, length, _ = self.prompts.shape
        qkv = attention.qkv(block.norm1(self.prompts))
        heads = qkv.reshape(batch, length, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
        _, key, value = heads.unbind(0)
        return attention.bound(attention.k_norm(key), value, self.gate or _NO_GATE)


def prefix_attention(block: nn.Module, index: int) -> PrefixAttention:
    """The block's prefix attention, or a TypeError naming the call that installs it."""
    if not isinstance(block.attn, PrefixAttention):
        raise TypeError(
            f"block {index} has no prefix attention: call model.install_prefix_layers([{index}]) first")
    return block.attn


# ------------------------------------------------------------- prompt tokens
class PromptTokens(NamedTuple):
    """Tokens (B or 1, N, dim) prepended to the sequence before the block (a forward pre-hook on it). They stay in
    the sequence through the later blocks (prompt tuning, L2P), or, `per_block`, are removed from the block's output
    (a forward hook), so each block sees only its own (VPT-deep)."""

    tokens: Tensor
    per_block: bool = False

    @property
    def added_tokens(self) -> int:
        return 0 if self.per_block else self.tokens.shape[1]

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        if self.tokens.dim() != 3:
            raise ValueError(
                f"prompt tokens must be shaped (batch or 1, length, dim), got {tuple(self.tokens.shape)}")
        tokens, length = self.tokens, self.tokens.shape[1]

        def prepend(_module: nn.Module, args: tuple) -> tuple:
            x, *rest = args
            return (torch.cat([tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1), *rest)

        def remove(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            return output[:, length:]

        if not self.per_block:
            return _hooked(lambda: block.register_forward_pre_hook(prepend))
        return _hooked(lambda: block.register_forward_pre_hook(prepend), lambda: block.register_forward_hook(remove))


# ------------------------------------------------------ hooks on sub-modules
def qkv_rows(part: Literal["q", "k", "v"], width: int) -> slice:
    """The output rows of timm's fused ``qkv`` Linear that hold the queries, keys or values (`width` each)."""
    return slice(*{"q": (0, width), "k": (width, 2 * width), "v": (2 * width, 3 * width)}[part])


class OutputHook(NamedTuple):
    """The output of sub-module `site` of the block (a dotted path: ``"attn.qkv"``, ``"mlp"``) replaced by
    ``transform(input, output)`` (a forward hook); the other kinds of this module are this with a transform."""

    site: str
    transform: Callable[[Tensor, Tensor], Tensor]
    added_tokens = 0  # a class attribute, not a field

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        transform = self.transform

        def hook(_module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            return transform(args[0], output)

        module = open_site(block, self.site, index)
        return _hooked(lambda: module.register_forward_hook(hook))


class RowDelta(NamedTuple):
    """``output[..., rows] += delta(input)`` on sub-module `site` (all rows when `rows` is None): a LoRA delta
    ``delta(x) = x Aᵀ Bᵀ`` on the key rows of ``attn.qkv`` is ``RowDelta("attn.qkv", delta, qkv_rows("k", dim))``."""

    site: str
    delta: Callable[[Tensor], Tensor]
    rows: slice | None = None
    added_tokens = 0  # a class attribute, not a field

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        delta, rows = self.delta, self.rows

        def add(x: Tensor, output: Tensor) -> Tensor:
            change = delta(x).to(output.dtype)
            if rows is None:
                return output + change
            start, stop, _ = rows.indices(output.shape[-1])
            return torch.cat([output[..., :start], output[..., start:stop] + change, output[..., stop:]], dim=-1)

        return OutputHook(self.site, add).bind(block, index)


class ScaleShift(NamedTuple):
    """SSF: the output of sub-module `site` scaled and shifted feature-wise, ``y * scale + shift`` (each (dim,))."""

    site: str
    scale: Tensor
    shift: Tensor
    added_tokens = 0  # a class attribute, not a field

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        scale, shift = self.scale, self.shift
        return OutputHook(self.site, lambda _x, y: y * scale.to(y.dtype) + shift.to(y.dtype)).bind(block, index)


class Adapter(NamedTuple):
    """A residual adapter on sub-module `site` (``"attn"`` or ``"mlp"``): ``y + adapter(y)`` (sequential) or
    ``y + adapter(x)`` with x the sub-module's input (parallel), or with `input_site` the input of that other
    sub-module (AdaptFormer as RanPAC runs it: ``Adapter("mlp", f, parallel=True, input_site="norm2")`` reads the
    residual stream before the MLP's norm)."""

    site: str
    adapter: Callable[[Tensor], Tensor]
    parallel: bool = False
    input_site: str | None = None
    added_tokens = 0  # a class attribute, not a field

    def bind(self, block: nn.Module, index: int) -> AbstractContextManager[None]:
        adapter, parallel = self.adapter, self.parallel
        if self.input_site is None:
            return OutputHook(self.site, lambda x, y: y + adapter(x if parallel else y).to(y.dtype)).bind(block, index)
        if not parallel:
            raise ValueError("an adapter that reads another sub-module's input (input_site) runs in parallel: "
                             "give parallel=True")
        seen: list[Tensor] = []

        def remember(_module: nn.Module, args: tuple) -> None:
            seen[:] = [args[0]]

        source = open_site(block, self.input_site, index)
        hooked = OutputHook(self.site, lambda _x, y: y + adapter(seen.pop()).to(y.dtype))
        return _stacked(_hooked(lambda: source.register_forward_pre_hook(remember)), hooked.bind(block, index))


def open_site(block: nn.Module, site: str, index: int | str) -> nn.Module:
    """Sub-module `site` of `block`, with every compiled module on the way there made eager again (a compiled
    module runs the hooks it had when it was compiled, and would skip the one about to be added)."""
    module = block
    for name in site.split("."):
        child = dict(module.named_children()).get(name)
        if child is None:
            where = "the backbone" if index == BACKBONE else f"block {index}"
            raise ValueError(f"{where} has no sub-module {site!r} to attach to (its modules: "
                             f"{', '.join(n for n, _ in block.named_children())})")
        if is_compiled(child):
            log.info("block %s: %s runs eager from now on (something is attached inside it)", index, name)
            child = uncompiled(child)
            setattr(module, name, child)
        module = child
    return module


@contextmanager
def _hooked(*registers: Callable[[], RemovableHandle]) -> Iterator[None]:
    """Hooks registered by each ``register()`` on entering the context and removed at its exit."""
    handles: list[RemovableHandle] = []
    try:
        for register in registers:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _stacked(*contexts: AbstractContextManager[None]) -> Iterator[None]:
    """Several binding contexts entered in order and exited in reverse."""
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield
