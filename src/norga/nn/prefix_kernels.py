"""Gated prefix attention as functions of per-head tensors: an explicit reference and a fused path.

All functions take ``q, k, v`` shaped (B, H, N, d) (the N real tokens), per-sample prefix keys and
values shaped (B, H, Lp, d) (or (1, H, Lp, d) to share one prefix across the batch) and a
`ScoreGate` applied to the prefix columns only. They compute

    softmax([gate(q·Pkᵀ·scale), q·Kᵀ·scale]) · [Pv; V]

The fused path picks, by device and dtype:
- CPU, no dropout, bf16/fp16 inputs (autocast), with or without a prefix: `_LowPrecisionPrefixAttention`, explicit
  attention whose passes over the scores stay in the input dtype (the CPU flash kernel's bf16 backward is ~2x
  slower than it; the fp32-accumulating kernel below adds four fp32 conversions of the score matrix);
- CPU, no dropout, fp32, any gate: `_GatedPrefixAttention`, one autograd Function with a hand-written backward that
  makes fewer passes over the (N × (Lp+N)) score matrix than autograd does, and skips the token-side
  gradients when q, k, v need none (the first prompted layer of a frozen backbone). On CPU the fused
  flash kernel is no faster (its backward is ~2x slower than explicit batched matmuls here), and
  attention is then bound by its six batched matmuls;
- no prefix otherwise, and in bf16/fp16 without gradients on a CPU with AMX (`_flash_forward_is_faster`):
  ``scaled_dot_product_attention`` (with AMX the CPU flash kernel's forward is ~2.4x the explicit one at ViT-B
  shapes; without it, and backward everywhere, the explicit kernel is faster);
- elsewhere, identity gate: one ``scaled_dot_product_attention`` over [prefix; tokens] (no mask);
- otherwise (CUDA, dropout): SDPA with the gate's residual ``gate(s) - s`` as an additive bias on the
  prefix columns.
``kernel="flex"`` is `flex_attention` with the gate as a score modification of the prefix columns (no dropout):
`benchmarks/gpu_check.py` times it against "bias" on a GPU, where "auto" keeps "bias" until a device says otherwise.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from norga.nn.gates import ScoreGate


def reference_prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    gate: ScoreGate,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """The obvious implementation (the official code's): explicit scores, gate, softmax, weighted sum."""
    scores = (q @ k.transpose(-2, -1)) * scale
    values = v
    if prefix_k is not None:
        prefix_scores = gate((q @ prefix_k.transpose(-2, -1)) * scale)
        scores = torch.cat([prefix_scores, scores], dim=-1)
        values = torch.cat([_batch_like(prefix_v, v), v], dim=2)
    attn = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ values


def fused_prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    gate: ScoreGate,
    scale: float,
    dropout_p: float = 0.0,
    kernel: str = "auto",
) -> Tensor:
    """Same result as `reference_prefix_attention` through fused kernels; `kernel` forces "explicit", "bias",
    "flex" or "sdpa" (identity gate only)."""
    explicit_here = q.device.type == "cpu" and dropout_p == 0.0
    if prefix_k is None:
        flash_wins = kernel == "auto" and _flash_forward_is_faster() and not _needs_grad(q, k, v)
        if kernel in ("auto", "explicit") and explicit_here and q.dtype in LOW_PRECISION and not flash_wins:
            return _LowPrecisionPrefixAttention.apply(q, k, v, None, None, scale, None)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    prefix_k = _batch_like(prefix_k, k).to(q.dtype)
    prefix_v = _batch_like(prefix_v, v).to(q.dtype)
    if kernel == "auto":
        kernel = "explicit" if explicit_here else "sdpa" if gate.is_identity else "bias"
    if kernel == "sdpa":
        if not gate.is_identity:
            raise ValueError("kernel='sdpa' has no gate: use it with the identity gate only")
        keys = torch.cat([prefix_k, k], dim=2)
        values = torch.cat([prefix_v, v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p, scale=scale)
    if kernel == "explicit":
        if dropout_p != 0.0:
            raise ValueError("the explicit fused prefix kernel has no attention dropout; use kernel='bias'")
        function = _LowPrecisionPrefixAttention if q.dtype in LOW_PRECISION else _GatedPrefixAttention
        return function.apply(q, k, v, prefix_k, prefix_v, scale, gate, *gate.gate_parameters())
    if kernel == "bias":
        return _bias_prefix_attention(q, k, v, prefix_k, prefix_v, gate, scale, dropout_p)
    if kernel == "flex":
        if dropout_p != 0.0:
            raise ValueError("the flex prefix kernel has no attention dropout; use kernel='bias'")
        if not gate.elementwise:
            raise ValueError(f"the flex prefix kernel modifies each score alone, but {type(gate).__name__} reads "
                             "the other scores: use kernel='explicit' or 'bias'")
        return _flex_prefix_attention(q, k, v, prefix_k, prefix_v, gate, scale)
    raise ValueError(f"unknown fused prefix-attention kernel {kernel!r}; use 'auto', 'explicit', 'bias', 'flex' or "
                     "'sdpa'")


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


@cache
def _flash_forward_is_faster() -> bool:
    """Whether this CPU has AMX tiles, where the CPU flash kernel's bf16 forward beats the explicit kernel (plain
    attention at ViT-B shapes, B 8, 2 threads: 4.5 against 10.6 ms on an Intel Xeon with AMX; on an AMD EPYC with
    AVX512-BF16 and no AMX 11.9 against 9.2 ms)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


#: Input dtypes the explicit kernel computes in their own precision (`_LowPrecisionPrefixAttention`).
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _batch_like(prefix: Tensor, tokens: Tensor) -> Tensor:
    """Expand a batch-shared (1, H, Lp, d) prefix to the token batch size."""
    if prefix.shape[0] == tokens.shape[0]:
        return prefix
    return prefix.expand(tokens.shape[0], -1, -1, -1)


def _bias_prefix_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: ScoreGate, scale: float, dropout_p: float
) -> Tensor:
    """SDPA over [prefix; tokens] with ``gate(s) - s`` added to the prefix columns as a float mask."""
    prefix_scores = (q @ prefix_k.transpose(-2, -1)) * scale
    residual = gate(prefix_scores) - prefix_scores
    token_bias = residual.new_zeros(*residual.shape[:-1], k.shape[2])
    bias = torch.cat([residual, token_bias], dim=-1).to(q.dtype)
    keys = torch.cat([prefix_k, k], dim=2)
    values = torch.cat([prefix_v, v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def _flex_prefix_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: ScoreGate, scale: float
) -> Tensor:
    """`flex_attention` over [prefix; tokens] with the gate as a score modification of the first Lp columns (its
    parameters captured, so they get gradients). Eager here; on CUDA it is fused when the caller compiles it."""
    from torch.nn.attention.flex_attention import flex_attention

    length, params = prefix_k.shape[2], gate.gate_parameters()

    def gated(score: Tensor, batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        return torch.where(key < length, gate.gate(score, *params), score)

    keys = torch.cat([prefix_k, k], dim=2)
    values = torch.cat([prefix_v, v], dim=2)
    return flex_attention(q, keys, values, score_mod=gated, scale=scale)


def _accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs (gate and softmax are computed there), else the input's own."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _GatedPrefixAttention(torch.autograd.Function):
    """Explicit gated prefix attention with a fused backward (CPU fast path).

    Forward: ``S = scale·q·[Pk; K]ᵀ`` in one batched matmul, gate on the Lp prefix columns in place,
    ``P = softmax(S)``, ``O = P·[Pv; V]``. Saved: P, the raw prefix scores and the inputs.
    Backward: ``dS = P ∘ (dO·[Pv; V]ᵀ − rowsum(dO ∘ O))`` in place, the gate differentiated by autograd
    on the small (N × Lp) block, then dq and d[Pk; K] by two batched matmuls. When q, k and v need no
    gradient only the Lp prefix columns are touched.
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, scale, gate, *gate_params):
        acc = _accumulation_dtype(q)
        length = prefix_k.shape[2]
        keys = torch.cat([prefix_k, k], dim=2)
        values = torch.cat([prefix_v, v], dim=2)
        scores = torch.matmul(q, keys.transpose(-2, -1)).to(acc).mul_(scale)
        prefix_scores = scores[..., :length].clone()
        scores[..., :length] = gate.gate(prefix_scores, *gate_params)
        probs = torch.softmax(scores, dim=-1)
        del scores
        out = torch.matmul(probs.to(q.dtype), values)
        ctx.scale, ctx.gate = scale, gate
        ctx.save_for_backward(q, keys, values, prefix_scores, probs, out, *gate_params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, keys, values, prefix_scores, probs, out, *gate_params = ctx.saved_tensors
        length = prefix_scores.shape[-1]
        acc = probs.dtype
        needs_tokens = any(ctx.needs_input_grad[:3])
        delta = (grad_out.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)  # rowsum(dO ∘ O)

        if needs_tokens:
            grad_values = torch.matmul(probs.to(q.dtype).transpose(-2, -1), grad_out)
            grad_scores = torch.matmul(grad_out, values.transpose(-2, -1)).to(acc)
        else:  # only the prefix columns matter
            probs = probs[..., :length]
            grad_values = torch.matmul(probs.transpose(-2, -1), grad_out.to(acc)).to(q.dtype)
            grad_scores = torch.matmul(grad_out.to(acc), values[:, :, :length].to(acc).transpose(-2, -1))
        grad_scores.sub_(delta).mul_(probs)  # softmax backward

        leaves = [prefix_scores.detach().requires_grad_(), *(p.detach().requires_grad_(need)
                  for p, need in zip(gate_params, ctx.needs_input_grad[7:]))]
        with torch.enable_grad():
            gated = ctx.gate.gate(*leaves)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(gated, wanted, grad_scores[..., :length]))
        grad_prefix_scores, *grad_params = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        grad_scores[..., :length] = grad_prefix_scores
        grad_scores = grad_scores.to(q.dtype)  # d/d(unscaled scores) = scale · this, applied to the results

        grad_q = grad_k = grad_v = None
        if needs_tokens:
            grad_q = torch.matmul(grad_scores, keys).mul_(ctx.scale)
            grad_keys = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(ctx.scale)
            grad_k, grad_v = grad_keys[:, :, length:], grad_values[:, :, length:]
            grad_pk, grad_pv = grad_keys[:, :, :length], grad_values[:, :, :length]
        else:
            grad_pk, grad_pv = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(ctx.scale), grad_values
        return (grad_q, grad_k, grad_v, grad_pk, grad_pv, None, None, *grad_params)


class _LowPrecisionPrefixAttention(torch.autograd.Function):
    """Explicit (gated prefix) attention for bf16/fp16 inputs on CPU: every pass over the score matrix in the
    input's dtype.

    It computes what `reference_prefix_attention` computes under autocast (scores from a bf16 matrix product,
    scaled in bf16, softmax accumulated in fp32 and written in bf16, bf16 products), with the gate applied in
    fp32 on the small prefix block and its result rounded to the input dtype. Its memory passes over the
    (N × (Lp+N)) scores are the minimum an explicit attention makes: softmax forward and backward
    (``_softmax_backward_data``, the kernel autograd uses) and one scaling, against the four extra fp32
    conversions of `_GatedPrefixAttention`; it keeps bf16 probabilities (half the memory). Without a prefix it is
    plain attention: on CPU the flash kernel's bf16 backward is slower than this.
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, scale, gate, *gate_params):
        length = 0 if prefix_k is None else prefix_k.shape[2]
        keys = k if prefix_k is None else torch.cat([prefix_k, k], dim=2)
        values = v if prefix_v is None else torch.cat([prefix_v, v], dim=2)
        scores = torch.matmul(q, keys.transpose(-2, -1)).mul_(scale)
        prefix_scores = None
        if length:
            prefix_scores = scores[..., :length].float()
            scores[..., :length] = gate.gate(prefix_scores, *gate_params)
        probs = torch.softmax(scores, dim=-1)
        del scores
        out = torch.matmul(probs, values)
        ctx.scale, ctx.gate, ctx.length = scale, gate, length
        ctx.save_for_backward(q, keys, values, prefix_scores, probs, out, *gate_params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, keys, values, prefix_scores, probs, out, *gate_params = ctx.saved_tensors
        length = ctx.length
        if ctx.needs_input_grad[:3] == (False, False, False):  # only the prefix columns matter
            probs, values = probs[..., :length], values[:, :, :length]
        grad_values = torch.matmul(probs.transpose(-2, -1), grad_out)
        grad_probs = torch.matmul(grad_out, values.transpose(-2, -1))
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype) if any(
            ctx.needs_input_grad[:3]) else None
        grad_params: list[Tensor | None] = [None] * len(gate_params)
        if length:  # the gate's block in fp32, as the reference (fp32 gate output) differentiates it
            delta = (grad_out.float() * out.float()).sum(dim=-1, keepdim=True)  # rowsum(dP ∘ P) = rowsum(dO ∘ O)
            grad_gated = (grad_probs[..., :length].float() - delta).mul_(probs[..., :length].float())
            leaves = [prefix_scores.detach().requires_grad_(), *(p.detach().requires_grad_(need)
                      for p, need in zip(gate_params, ctx.needs_input_grad[7:]))]
            with torch.enable_grad():
                gated = ctx.gate.gate(*leaves)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(gated, wanted, grad_gated))
            grad_prefix_scores, *grad_params = [next(grads) if leaf.requires_grad else None for leaf in leaves]
            if grad_scores is None:
                grad_scores = grad_prefix_scores.to(q.dtype)
            else:
                grad_scores[..., :length] = grad_prefix_scores

        grad_q = grad_k = grad_v = grad_pk = grad_pv = None
        grad_keys = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(ctx.scale)
        if any(ctx.needs_input_grad[:3]):
            grad_q = torch.matmul(grad_scores, keys).mul_(ctx.scale)
            grad_k, grad_v = grad_keys[:, :, length:], grad_values[:, :, length:]
        if length:
            grad_pk, grad_pv = grad_keys[:, :, :length], grad_values[:, :, :length]
        return (grad_q, grad_k, grad_v, grad_pk, grad_pv, None, None, *grad_params)
