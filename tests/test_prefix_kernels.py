"""Gated prefix attention: reference vs a per-(sample, head) loop, fused vs reference (outputs and gradients).

`NORGA_TEST_DEVICE=cuda` runs them on a GPU (every tensor made there by default), as `tools/device_check.sh` does."""

import os

import pytest
import torch

from norga.nn import (
    IdentityGate,
    NoRGaGate,
    fused_prefix_attention,
    reference_prefix_attention,
)

B, H, N, LP, D = 3, 4, 19, 5, 16
DEVICE = os.environ.get("NORGA_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def on_test_device():
    """Tensors and gates of every test are made on NORGA_TEST_DEVICE (default cpu)."""
    with torch.device(DEVICE):
        yield


def random_gate(activation="tanh", dtype=torch.float32):
    gate = NoRGaGate(activation).to(dtype)
    with torch.no_grad():
        gate.alpha.uniform_(0.3, 1.5)
        gate.tau.uniform_(0.3, 1.5)
    return gate


def random_inputs(dtype=torch.float32, requires_grad=True, shared_prefix=False):
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    batch = 1 if shared_prefix else B
    pk, pv = (torch.randn(batch, H, LP, D, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, pk, pv


def loop_attention(q, k, v, pk, pv, gate, scale):
    """Slow and obvious: one (sample, head) at a time, scores -> gate on prefix columns -> softmax."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            pb = 0 if pk.shape[0] == 1 else b
            prefix_scores = gate(q[b, h] @ pk[pb, h].T * scale)
            token_scores = q[b, h] @ k[b, h].T * scale
            weights = torch.softmax(torch.cat([prefix_scores, token_scores], dim=1), dim=1)
            out[b, h] = weights @ torch.cat([pv[pb, h], v[b, h]], dim=0)
    return out


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "identity"])
def test_reference_matches_loop(activation):
    gate = random_gate(activation, torch.float64)
    q, k, v, pk, pv = random_inputs(torch.float64)
    torch.testing.assert_close(
        reference_prefix_attention(q, k, v, pk, pv, gate, D**-0.5), loop_attention(q, k, v, pk, pv, gate, D**-0.5)
    )


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def assert_same_gradients(got_grads, want_grads):
    """Tensors: <= 1e-5 absolute. The scalars α and τ (last two) are sums over B·H·N·Lp terms whose fp32
    rounding alone is ~1e-5 (each path measured against fp64 over 200 seeds: up to 2.5e-5 and 4e-5), so two
    paths may differ by twice the larger, 8e-5, where the sum cancels to a small value (rtol 1e-4 elsewhere)."""
    *tensors, alpha, tau = zip(got_grads, want_grads)
    for got, want in tensors:
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5
    for got, want in (alpha, tau):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=8e-5)


@pytest.mark.parametrize("kernel", ["auto", "explicit", "bias"])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "softplus"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_fused_matches_reference_fp32(kernel, activation, shared_prefix):
    gate = random_gate(activation)
    q, k, v, pk, pv = random_inputs(shared_prefix=shared_prefix)
    inputs = [q, k, v, pk, pv, gate.alpha, gate.tau]
    expected = reference_prefix_attention(q, k, v, pk, pv, gate, D**-0.5)
    actual = fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5, kernel=kernel)
    grad_out = torch.randn_like(expected)
    assert (actual - expected).abs().max() <= 1e-5
    assert_same_gradients(grads(actual, inputs, grad_out), grads(expected, inputs, grad_out))


@pytest.mark.parametrize("kernel", ["explicit", "bias"])
def test_fused_is_exact_in_fp64(kernel):
    gate = random_gate("gelu", torch.float64)
    q, k, v, pk, pv = random_inputs(torch.float64)
    inputs = [q, k, v, pk, pv, gate.alpha, gate.tau]
    expected = reference_prefix_attention(q, k, v, pk, pv, gate, D**-0.5)
    actual = fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5, kernel=kernel)
    grad_out = torch.randn_like(expected)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads(actual, inputs, grad_out), grads(expected, inputs, grad_out)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "identity"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_flex_kernel_is_exact_in_fp64(activation, shared_prefix):
    """flex_attention with the gate as a score modification of the prefix columns: the output everywhere, the
    gradients (α and τ through the captured parameters too) where flex has a backward (not on CPU)."""
    gate = IdentityGate() if activation == "identity" else random_gate(activation, torch.float64)
    with_grad = DEVICE != "cpu"
    q, k, v, pk, pv = (t.detach().requires_grad_(with_grad)
                       for t in random_inputs(torch.float64, shared_prefix=shared_prefix))
    expected = loop_attention(q, k, v, pk, pv, gate, D**-0.5)
    actual = fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5, kernel="flex")
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    if with_grad:
        inputs = [q, k, v, pk, pv, *gate.gate_parameters()]
        grad_out = torch.randn_like(expected)
        for got, want in zip(grads(actual, inputs, grad_out), grads(expected, inputs, grad_out)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_flex_kernel_refuses_dropout():
    q, k, v, pk, pv = (t.detach() for t in random_inputs())
    with pytest.raises(ValueError, match="no attention dropout"):
        fused_prefix_attention(q, k, v, pk, pv, random_gate(), D**-0.5, dropout_p=0.1, kernel="flex")


def test_fused_first_layer_case_only_prompt_gradients():
    """Frozen input to the first prompted layer: q, k, v need no gradient, prompts and gate do."""
    gate = random_gate("sigmoid")
    q, k, v, pk, pv = random_inputs(requires_grad=False)
    inputs = [pk, pv, gate.alpha, gate.tau]
    expected = reference_prefix_attention(q, k, v, pk, pv, gate, D**-0.5)
    actual = fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5, kernel="explicit")
    grad_out = torch.randn_like(expected)
    assert_same_gradients(grads(actual, inputs, grad_out), grads(expected, inputs, grad_out))


def test_identity_gate_and_alpha_zero_are_plain_prefix_attention():
    q, k, v, pk, pv = random_inputs(torch.float64)
    gate = random_gate("tanh", torch.float64)
    with torch.no_grad():
        gate.alpha.zero_()
    plain = loop_attention(q, k, v, pk, pv, IdentityGate(), D**-0.5)
    torch.testing.assert_close(fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5), plain)
    for kernel in ("auto", "explicit", "bias", "sdpa"):
        torch.testing.assert_close(fused_prefix_attention(q, k, v, pk, pv, IdentityGate(), D**-0.5, kernel=kernel), plain)
    torch.testing.assert_close(reference_prefix_attention(q, k, v, pk, pv, gate, D**-0.5), plain)


def test_no_prefix_is_ordinary_attention():
    q, k, v, *_ = random_inputs(torch.float64)
    expected = torch.softmax(q @ k.transpose(-2, -1) * D**-0.5, dim=-1) @ v
    torch.testing.assert_close(fused_prefix_attention(q, k, v, None, None, None, D**-0.5), expected)
    torch.testing.assert_close(reference_prefix_attention(q, k, v, None, None, None, D**-0.5), expected)


def test_bfloat16_fused_is_close_to_fp32():
    """bf16 inputs (autocast) keep gate and softmax in fp32: vs fp32 on the same rounded inputs,
    documented tolerance 5e-2 absolute on outputs of unit scale (bf16 keeps 8 mantissa bits)."""
    gate = random_gate("tanh")
    low = [t.detach().bfloat16() for t in random_inputs(requires_grad=False)]
    expected = reference_prefix_attention(*(t.float() for t in low), gate, D**-0.5)
    actual = fused_prefix_attention(*low, gate, D**-0.5, kernel="explicit")
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max() <= 5e-2


def test_unknown_kernel_and_dropout_with_explicit_kernel():
    gate = random_gate()
    q, k, v, pk, pv = random_inputs()
    with pytest.raises(ValueError, match="unknown fused prefix-attention kernel 'magic'"):
        fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5, kernel="magic")
    with pytest.raises(ValueError, match="identity gate only"):
        fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5, kernel="sdpa")
    with pytest.raises(ValueError, match="no attention dropout"):
        fused_prefix_attention(q, k, v, pk, pv, gate, D**-0.5, dropout_p=0.1, kernel="explicit")


# ------------------------------------------------------------------ bf16 on CPU: the low-precision kernel
BF16_ROUNDING = 2.0**-8  # bf16 keeps 8 significant bits: unit roundoff 2^-8 relative


def _relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float((value.detach().double() - exact.detach()).norm() / exact.norm().clamp_min(1e-300))


def _bf16_case(seed: int, prefix: bool = True, token_grads: bool = True):
    """bf16 q, k, v (as under autocast), fp32 prompts and gate, and the same case in fp64 on the rounded values."""
    torch.manual_seed(seed)
    gate = random_gate("tanh")
    q, k, v = ((torch.randn(B, H, N, D) * 2).bfloat16().requires_grad_(token_grads) for _ in range(3))
    pk, pv = (torch.randn(B, H, LP, D).requires_grad_() if prefix else None for _ in range(2))
    exact_gate = random_gate("tanh", torch.float64)
    exact_gate.load_state_dict({name: value.double() for name, value in gate.state_dict().items()})
    # both paths multiply the prompts rounded to bf16: the exact case starts from those roundings
    exact = [t.detach().double().requires_grad_(token_grads) for t in (q, k, v)]
    exact += [t.detach().bfloat16().double().requires_grad_() if prefix else None for t in (pk, pv)]
    return (q, k, v, pk, pv, gate), (*exact, exact_gate), torch.randn(B, H, N, D).bfloat16()


def _outputs_and_grads(attend, inputs, grad_out, autocast=False):
    *tensors, gate = inputs
    gate_params = gate.gate_parameters() if tensors[3] is not None else ()
    wanted = [t for t in (*tensors, *gate_params) if t is not None and t.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = attend(*tensors, gate, D**-0.5)
    return [out, *torch.autograd.grad(out, wanted, grad_out.to(out.dtype))]


@pytest.mark.parametrize("token_grads", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_fused_is_as_accurate_as_the_reference_under_autocast(seed, token_grads):
    """The CPU bf16 kernel against the fp64 truth on the same rounded inputs, next to the reference path under
    autocast (what the official code computes in bf16). Both round every product's inputs and outputs to bf16, so
    their errors are a few units of bf16 rounding; measured over 30 seeds the kernel's error on the output and the
    tensor gradients is at most 1.21x the reference's. For the gate's scalars α and τ (sums over B·H·N·Lp terms
    that partly cancel) the reference's own error reaches 30 % of the value, the kernel's 6 % (it differentiates
    the gate block in fp32): bounded by 2x the reference's or 10 % of the value."""
    inputs, exact_inputs, grad_out = _bf16_case(seed, token_grads=token_grads)
    fused = _outputs_and_grads(fused_prefix_attention, inputs, grad_out)
    reference = _outputs_and_grads(reference_prefix_attention, inputs, grad_out, autocast=True)
    exact = _outputs_and_grads(reference_prefix_attention, exact_inputs, grad_out.double())
    assert fused[0].dtype == torch.bfloat16 and len(fused) == len(exact) == (8 if token_grads else 5)
    *tensors, alpha, tau = zip(fused, reference, exact)
    for got, ref, want in tensors:
        assert got.shape == want.shape
        assert _relative_error(got, want) <= 1.5 * _relative_error(ref, want) + BF16_ROUNDING / 4
    for got, ref, want in (alpha, tau):
        assert _relative_error(got, want) <= max(2 * _relative_error(ref, want), 0.1)


def test_bf16_attention_without_prefix_on_cpu_matches_exact_attention():
    """Unprompted blocks in bf16 take the same kernel (no flash). It rounds scores and probabilities to bf16 as
    explicit attention under autocast does: measured over 20 seeds 0.45-0.85 % from the fp64 truth (1.2-2.2 bf16
    roundings; the flash kernel, which rounds only its output, 0.16-0.55 %). Bound: 4 roundings."""
    inputs, exact_inputs, grad_out = _bf16_case(3, prefix=False)
    fused = _outputs_and_grads(fused_prefix_attention, inputs, grad_out)
    flash = _outputs_and_grads(lambda q, k, v, pk, pv, gate, scale: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=scale), inputs, grad_out)
    exact = _outputs_and_grads(reference_prefix_attention, exact_inputs, grad_out.double())
    assert len(fused) == 4 and fused[0].dtype == torch.bfloat16
    for got, sdpa, want in zip(fused, flash, exact):
        assert _relative_error(got, want) <= 4 * BF16_ROUNDING
        assert _relative_error(sdpa, want) <= 4 * BF16_ROUNDING  # the same inputs: the bound is not loose for them


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_attention_without_prefix_or_gradients_takes_flash_only_where_the_cpu_has_amx(monkeypatch, amx):
    """Forward only (inference, frozen features), plain bf16 attention takes the CPU flash kernel on a CPU with AMX
    (2.4x the explicit kernel's speed there) and the explicit kernel elsewhere; with gradients always the explicit
    one. Either way the output is within the bound of `test_bf16_attention_without_prefix_on_cpu_matches_exact_attention`."""
    from torch.profiler import profile

    from norga.nn import prefix_kernels

    monkeypatch.setattr(prefix_kernels, "_flash_forward_is_faster", lambda: amx)
    (q, k, v, _, _, gate), exact_inputs, _ = _bf16_case(5, prefix=False)
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    exact = reference_prefix_attention(*exact_inputs[:3], None, None, None, D**-0.5)

    def kernels(grad: bool) -> tuple[set[str], torch.Tensor]:
        with torch.set_grad_enabled(grad), profile() as prof:
            out = fused_prefix_attention(q, k, v, None, None, gate, D**-0.5)
        return {event.key for event in prof.key_averages()}, out

    without_grad, out = kernels(grad=False)
    assert (flash in without_grad) == amx and out.dtype == torch.bfloat16
    assert _relative_error(out, exact) <= 4 * BF16_ROUNDING
    with_grad, out = kernels(grad=True)
    assert flash not in with_grad and _relative_error(out, exact) <= 4 * BF16_ROUNDING
