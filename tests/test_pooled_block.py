"""The last block computed for the pooled row only (`norga.nn.pooled_block`): equal to timm's full forward to
rounding (features and every gradient, fp64, fp32 and bf16 autocast), taken in the plain case, and never taken when
something could see the block's other rows."""

import math
from contextlib import ExitStack, contextmanager

import pytest
import torch
from timm.models.vision_transformer import Block

import norga.nn.prompted_vit as prompted_vit
from norga.nn import BACKBONE, IdentityGate, PromptedViT, ScaleShift, TaskPrompts
from norga.runtime.precision import prepare_for_bf16

IMG, DIM, CLASSES, BATCH = 32, 192, 5, 3
#: LayerScale, q/k norms and the attention's output norm, so that a row computation skipping any of them changes
#: the result.
EVERY_BLOCK_STEP = dict(init_values=0.5, qk_norm=True, scale_attn_norm=True)


def build(depth=3, **timm_kwargs) -> PromptedViT:
    """A randomly initialised ViT-Ti (32 px, 4 px patches: 65 tokens) whose norms, biases and layer scales are
    random too (timm starts them at 1, 0 and `init_values`, where a skipped step could go unnoticed)."""
    kwargs = dict(img_size=IMG, patch_size=4, depth=depth, **timm_kwargs)
    model = PromptedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=kwargs, num_classes=CLASSES)
    with torch.no_grad():
        for param in model.backbone.parameters():
            param.add_(torch.randn_like(param), alpha=0.2 if param.dim() == 1 else 0.02)
    return model


@contextmanager
def full_forward(model: PromptedViT):
    """timm's full forward (the last block on every token) inside the context: the reference."""
    model._last_block_row_only = False
    try:
        yield
    finally:
        del model._last_block_row_only


@pytest.fixture
def row_calls(monkeypatch):
    """The rows the host asked `pooled_row` for, one per call that took the row-only path."""
    rows = []

    def counted(block, x, row):
        rows.append(row)
        return pooled_row(block, x, row)

    pooled_row = prompted_vit.pooled_row
    monkeypatch.setattr(prompted_vit, "pooled_row", counted)
    return rows


def with_prompts(model: PromptedViT, setup: str, dtype=torch.float32) -> tuple[dict, list[torch.nn.Parameter]]:
    """Keyword arguments for `forward_features` that attach `setup` to the blocks before the last, and the
    tensors they train: nothing; prompt tokens prepended at block 0; or prefixes on blocks 0..depth-2 (every
    block, the last included, then has an unbound prefix attention)."""
    if setup == "plain":
        return {}, []
    if setup == "prompt_tokens":
        tokens = torch.randn(1, 4, DIM, dtype=dtype, requires_grad=True)
        return {"prompt_tokens": {0: tokens}}, [tokens]
    prompts = TaskPrompts(model, num_slots=2, length=3, layers=range(model.depth - 1), gate="tanh").to(dtype)
    model.install_prefix_layers(range(model.depth))
    trained = prompts.train_slot(1, "all")
    return {"prefixes": prompts.prefixes(1, BATCH)}, trained


def features_and_gradients(model, x, prompts, trained, weights):
    """Features, logits and the gradients of a random linear function of both with respect to `trained` and x."""
    x = x.detach().requires_grad_(True)
    out = model(x, **prompts)
    loss = (out.features * weights[0]).sum() + (out.logits * weights[1]).sum()
    grads = torch.autograd.grad(loss, [*trained, x], allow_unused=True)
    return [out.features, out.logits, *grads]


def assert_close(actual, expected, tolerance):
    """Each pair within `tolerance` relative to the expected tensor's largest entry (at least 1)."""
    for got, want in zip(actual, expected, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            scale = max(1.0, want.abs().max().item())
            assert (got.double() - want.double()).abs().max().item() <= tolerance * scale


def last_block_parameters(model: PromptedViT) -> list[torch.nn.Parameter]:
    """Unfreezes parameters of the last block: its MLP, its fused qkv (read by slices) and norm1."""
    last = model.depth - 1
    return model.unfreeze(f"blocks.{last}.{name}" for name in
                          ("mlp.fc1.weight", "mlp.fc2.bias", "attn.qkv.weight", "attn.qkv.bias", "norm1.weight"))


def compare_paths(model, x, prompts, trained, dtype):
    weights = torch.randn(BATCH, DIM, dtype=dtype), torch.randn(BATCH, CLASSES, dtype=dtype)
    row_only = features_and_gradients(model, x, prompts, trained, weights)
    with full_forward(model):
        full = features_and_gradients(model, x, prompts, trained, weights)
    return row_only, full


@pytest.mark.parametrize("timm_kwargs", [{}, EVERY_BLOCK_STEP], ids=["plain_vit", "every_block_step"])
@pytest.mark.parametrize("setup", ["plain", "prompt_tokens", "prefixes"])
def test_fp64_features_and_gradients_equal_the_full_forward(setup, timm_kwargs, row_calls):
    """fp64: the row-only last block and timm's full one agree to 1e-10 (relative to the largest entry) in the
    features, logits and the gradients of the prompts, the head, the last block's weights and the images."""
    model = build(**timm_kwargs).train()  # no dropout: training mode changes nothing but the branches taken
    last_block_parameters(model)  # unfrozen in fp32 (the host refuses others), then the same parameters in fp64
    model.double()
    prompts, trained = with_prompts(model, setup, torch.float64)
    trained = [*trained, *model.trained_parameters().values()]
    x = torch.randn(BATCH, 3, IMG, IMG, dtype=torch.float64)
    row_only, full = compare_paths(model, x, prompts, trained, torch.float64)
    assert row_calls == [4 if setup == "prompt_tokens" else 0]  # the class token behind the prompt tokens
    assert_close(row_only, full, 1e-10)


def test_fp64_features_equal_timms_own_forward_and_pool(row_calls):
    model = build(**EVERY_BLOCK_STEP).double().eval()
    x = torch.randn(BATCH, 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = model.backbone.pool(model.backbone.forward_features(x))
    assert row_calls == [0]
    assert features.shape == expected.shape == (BATCH, DIM)
    assert (features - expected).abs().max() <= 1e-10 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("setup", ["plain", "prefixes"])
def test_fp32_equals_the_full_forward_to_rounding(setup, row_calls):
    """fp32: only the last block's sums are ordered differently (a row alone vs a row of a (B·N)-row product, one
    query vs all in the attention kernel), each a sum of at most 4D terms off by a few ulps × the square root of its
    length; the gradients carry that back through the depth blocks: 4 ε · sqrt(depth · 4D) ≈ 2.3e-5 relative to
    the largest entry (seen: ~6e-7)."""
    depth = 3
    model = build(depth, **EVERY_BLOCK_STEP).train()
    last_block_parameters(model)
    prompts, trained = with_prompts(model, setup)
    trained = [*trained, *model.trained_parameters().values()]
    x = torch.randn(BATCH, 3, IMG, IMG)
    row_only, full = compare_paths(model, x, prompts, trained, torch.float32)
    assert row_calls == [0]
    assert_close(row_only, full, 4 * torch.finfo(torch.float32).eps * math.sqrt(depth * 4 * DIM))


@pytest.mark.parametrize("setup", ["plain", "prefixes"])
def test_bf16_autocast_with_bf16_weights_equals_the_full_forward_to_bf16_rounding(setup, row_calls):
    """bf16 autocast, frozen weights held in bf16 (`prepare_for_bf16`): the last block's products are rounded to
    bf16 (ε = 2⁻⁷) in both paths but from differently ordered sums and through different attention kernels, so
    they differ by a few bf16 roundings of each of its outputs: 4 ε relative to the largest entry (seen: < 0.7 ε)."""
    model = build(**EVERY_BLOCK_STEP).train()
    prepare_for_bf16(model)
    prompts, trained = with_prompts(model, setup)
    trained = [*trained, *model.head_parameters()]
    x = torch.randn(BATCH, 3, IMG, IMG)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row_only, full = compare_paths(model, x, prompts, trained, torch.float32)
    assert row_calls == [0]
    assert_close(row_only, full, 4 * torch.finfo(torch.bfloat16).eps)


def test_the_last_blocks_mlp_sees_one_row_per_image(row_calls, monkeypatch):
    """The plain case takes the row-only path: the last block's MLP gets (B, 1, D), the others (B, N, D). The MLPs'
    forwards are wrapped (not hooked: a hook would rightly make the host fall back)."""
    model = build(depth=2).eval()
    seen = {}
    for index, block in enumerate(model.backbone.blocks):
        forward = block.mlp.forward
        monkeypatch.setattr(block.mlp, "forward", lambda x, index=index, forward=forward: (
            seen.setdefault(index, []).append(tuple(x.shape)), forward(x))[1])
    with torch.no_grad():
        model(torch.randn(BATCH, 3, IMG, IMG))
    assert seen == {0: [(BATCH, 65, DIM)], 1: [(BATCH, 1, DIM)]}
    assert row_calls == [0]


def scale_shift(site):
    return ScaleShift(site, 1 + 0.1 * torch.randn(DIM), 0.1 * torch.randn(DIM))


def attached_to_last_block(model, _stack):
    return {"attachments": {model.depth - 1: scale_shift("mlp")}}


def prefix_on_last_block(model, _stack):
    prompts = TaskPrompts(model, num_slots=2, length=3, layers=range(model.depth), gate="tanh")
    return {"prefixes": prompts.prefixes(0, BATCH)}


def attached_to_backbone(model, _stack):
    return {"attachments": {BACKBONE: scale_shift("norm")}}


def hooked_last_block(model, _stack):
    model.backbone.blocks[-1].register_forward_hook(lambda _module, _args, output: output * 1.5)
    return {}


def pre_hooked_last_fc1(model, _stack):
    model.backbone.blocks[-1].mlp.fc1.register_forward_pre_hook(lambda _module, args: (args[0] * 0.5,))
    return {}


def hooked_final_norm(model, _stack):
    model.backbone.norm.register_forward_hook(lambda _module, _args, output: output - output.mean())
    return {}


def global_hook(_model, stack):
    stack.callback(torch.nn.modules.module.register_module_forward_hook(lambda _module, _args, output: None).remove)
    return {}


def prefix_bound_outside_the_host(model, stack):
    heads, head_dim = model.num_heads, model.head_dim
    prefix = torch.randn(1, heads, 3, head_dim), torch.randn(1, heads, 3, head_dim)
    stack.enter_context(model.backbone.blocks[-1].attn.bound(*prefix, IdentityGate()))
    return {}


def grad_checkpointing(model, _stack):
    model.backbone.set_grad_checkpointing(True)
    return {}


def subclassed_last_block(model, _stack):
    model.backbone.blocks[-1].__class__ = type("OwnBlock", (Block,), {})
    return {}


FALLBACKS = [attached_to_last_block, prefix_on_last_block, attached_to_backbone, hooked_last_block,
             pre_hooked_last_fc1, hooked_final_norm, global_hook, prefix_bound_outside_the_host, grad_checkpointing,
             subclassed_last_block]


@pytest.mark.parametrize("make_fallback", FALLBACKS, ids=lambda f: f.__name__)
def test_anything_that_could_see_other_rows_falls_back_to_timms_forward(make_fallback, row_calls):
    """With an attachment on the last block or the backbone, a hook on the last block, its sub-modules, the final
    norm or every module, a prefix bound in the last block, gradient checkpointing, or a block timm's `Block` does
    not describe exactly, the host runs timm's forward: the same tensors as forcing it."""
    model = build(depth=2).train()
    model.install_prefix_layers([1])
    x = torch.randn(BATCH, 3, IMG, IMG)
    with ExitStack() as stack:
        prompts = make_fallback(model, stack)
        features = model.forward_features(x, **prompts)
        with full_forward(model):
            expected = model.forward_features(x, **prompts)
    assert row_calls == []
    assert torch.equal(features, expected)


@pytest.mark.parametrize("global_pool", ["avg", "max"])
def test_other_pooling_falls_back_and_equals_timm(global_pool, row_calls):
    model = build(depth=2, global_pool=global_pool).eval()
    x = torch.randn(BATCH, 3, IMG, IMG)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
    assert row_calls == []
    assert torch.equal(model.backbone.fc_norm(features), expected)
