"""The open host: every kind of attachment equals the same model written out with explicit matmuls (outputs and
gradients, fresh random inputs), leaves timm's modules, keys and plain forward as they were, is honoured inside
regionally compiled blocks, and trains through the real engine (test-only LoRA and SSF methods), checkpointed by
ownership: an SSF run resumes bit-identically after a kill and refuses a checkpoint without its tensors."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from engine_fixtures import Crash, crash_at, tiny_config
from torch import Tensor, nn
from tuning_methods import TinyTuning, registered, run_engine

from norga.engine.loop import Position
from norga.nn import (
    BACKBONE,
    Adapter,
    Prefix,
    ProjectedPrefix,
    PromptedViT,
    PromptTokens,
    RowDelta,
    ScaleShift,
    make_gate,
    qkv_rows,
)
from norga.nn.regional_compile import is_compiled
from norga.storage import CheckpointError, load_checkpoint

DIM, HEADS, DEPTH, HIDDEN = 32, 2, 2, 128  # a tiny ViT: 16 px images, 8 px patches, 5 tokens


def tiny_vit() -> nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, img_size=16, patch_size=8,
                              depth=DEPTH, embed_dim=DIM, num_heads=HEADS).eval()
    with torch.no_grad():  # norms that are not the identity at init, so that they matter
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


def host_of(model: nn.Module) -> PromptedViT:
    return PromptedViT(copy.deepcopy(model)).eval()


# ------------------------------------------------------------ the slow model
def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    return x @ layer.weight.T + layer.bias


def heads(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], HEADS, DIM // HEADS).transpose(1, 2)


def slow_block(block, x: Tensor, edit, prompts=None) -> Tensor:
    """timm's Block written out; ``edit(site, input, output)`` changes the output of each named step, `prompts`
    (P, gate) become prefixes through norm1 and the key/value rows of qkv."""
    h = edit("norm1", x, layer_norm(x, block.norm1))
    qkv = edit("attn.qkv", h, linear(h, block.attn.qkv))
    q, k, v = (heads(qkv[..., i * DIM:(i + 1) * DIM]) for i in range(3))
    scale = 1.0 / math.sqrt(DIM // HEADS)
    scores, values = q @ k.transpose(-1, -2) * scale, v
    if prompts is not None:
        p, gate = prompts
        pkv = linear(layer_norm(p, block.norm1), block.attn.qkv)
        pk, pv = heads(pkv[..., DIM:2 * DIM]), heads(pkv[..., 2 * DIM:])
        scores = torch.cat([gate(q @ pk.transpose(-1, -2) * scale), scores], dim=-1)
        values = torch.cat([pv.expand(len(x), -1, -1, -1), values], dim=2)
    attended = (scores.softmax(-1) @ values).transpose(1, 2).reshape(x.shape)
    out = edit("attn", h, edit("attn.proj", attended, linear(attended, block.attn.proj)))
    x = x + out
    h = edit("norm2", x, layer_norm(x, block.norm2))
    hidden = edit("mlp.fc1", h, linear(h, block.mlp.fc1))
    hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
    out = edit("mlp", h, edit("mlp.fc2", hidden, linear(hidden, block.mlp.fc2)))
    return x + out


def slow_features(model, images: Tensor, edits=None, prompts=None, block_tokens=None) -> Tensor:
    """The class token after the final norm, every block written out; `edits` maps (block, site) to
    ``f(input, output)`` (block "backbone": the patch embedding's and final norm's outputs), `prompts` a block to
    (P, gate), `block_tokens` a block to tokens (1, N, dim) appended to its input and dropped from its output."""
    edits, prompts, block_tokens = edits or {}, prompts or {}, block_tokens or {}

    def edit(site, inp, out, index="backbone"):
        change = edits.get((index, site))
        return out if change is None else change(inp, out)

    x = model.norm_pre(model.patch_drop(model._pos_embed(edit("patch_embed", images, model.patch_embed(images)))))
    for index, block in enumerate(model.blocks):
        tokens, length = block_tokens.get(index), x.shape[1]
        if tokens is not None:
            x = torch.cat([x, tokens.expand(len(x), -1, -1)], dim=1)
        x = slow_block(block, x, lambda *args, index=index: edit(*args, index=index), prompts.get(index))[:, :length]
    return edit("norm", x, layer_norm(x, model.norm))[:, 0]


def assert_same(got: Tensor, want: Tensor) -> None:
    """fp32 sums of at most a few hundred O(1) terms per step, reordered: 1e-5 of the values' scale."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.detach().abs().max())))


def leaves(*shapes) -> list[Tensor]:
    return [(torch.randn(*shape) * 0.3).requires_grad_(True) for shape in shapes]


def check(model, attachments, edits, parameters, prompts=None) -> None:
    """Host with `attachments` == slow model with `edits`: features and the gradients of `parameters`."""
    host = host_of(model)
    images = torch.randn(3, 3, 16, 16)
    got = host.forward_features(images, attachments)
    got_grads = torch.autograd.grad(got.square().sum(), parameters)
    want = slow_features(model, images, edits, prompts)
    want_grads = torch.autograd.grad(want.square().sum(), parameters)
    assert_same(got, want)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert_same(got_grad, want_grad)
    assert (got - host.forward_features(images)).abs().max() > 1e-3  # the attachments do act


# ------------------------------------------------------------------- kinds
def test_lora_deltas_on_the_key_and_value_rows_of_qkv_equal_explicit_matmuls():
    model = tiny_vit()
    rank = 3
    a_k, b_k, a_v, b_v, a_0, b_0 = leaves((rank, DIM), (DIM, rank), (rank, DIM), (DIM, rank), (rank, DIM), (DIM, rank))
    attachments = {0: RowDelta("attn.qkv", lambda h: h @ a_0.T @ b_0.T, qkv_rows("k", DIM)),
                   1: [RowDelta("attn.qkv", lambda h: h @ a_k.T @ b_k.T, qkv_rows("k", DIM)),
                       RowDelta("attn.qkv", lambda h: h @ a_v.T @ b_v.T, qkv_rows("v", DIM))]}
    zeros = torch.zeros(DIM)

    def explicit(h, a_key, b_key, a_value=None, b_value=None):
        key = h @ a_key.T @ b_key.T
        value = h @ a_value.T @ b_value.T if a_value is not None else zeros.expand_as(key)
        return torch.cat([zeros.expand_as(key), key, value], dim=-1)

    edits = {(0, "attn.qkv"): lambda h, y: y + explicit(h, a_0, b_0),
             (1, "attn.qkv"): lambda h, y: y + explicit(h, a_k, b_k, a_v, b_v)}
    check(model, attachments, edits, [a_k, b_k, a_v, b_v, a_0, b_0])


def test_ssf_scale_and_shift_equals_explicit_matmuls():
    model = tiny_vit()
    s_norm, t_norm, s_qkv, t_qkv, s_fc1, t_fc1 = leaves((DIM,), (DIM,), (3 * DIM,), (3 * DIM,), (HIDDEN,), (HIDDEN,))
    with torch.no_grad():
        for scale in (s_norm, s_qkv, s_fc1):
            scale += 1.0
    attachments = {0: [ScaleShift("norm1", s_norm, t_norm), ScaleShift("mlp.fc1", s_fc1, t_fc1)],
                   1: ScaleShift("attn.qkv", s_qkv, t_qkv)}
    edits = {(0, "norm1"): lambda x, y: y * s_norm + t_norm, (0, "mlp.fc1"): lambda x, y: y * s_fc1 + t_fc1,
             (1, "attn.qkv"): lambda x, y: y * s_qkv + t_qkv}
    check(model, attachments, edits, [s_norm, t_norm, s_qkv, t_qkv, s_fc1, t_fc1])


def test_deltas_on_proj_fc1_fc2_and_adapters_after_attention_and_mlp_equal_explicit_matmuls():
    model = tiny_vit()
    proj, fc1, fc2, down, up, down2, up2 = leaves((DIM, DIM), (64, DIM), (DIM, HIDDEN), (4, DIM), (DIM, 4), (4, DIM),
                                                  (DIM, 4))

    def adapter(x, d, u):
        return torch.relu(x @ d.T) @ u.T

    attachments = {0: [RowDelta("attn.proj", lambda x: x @ proj.T), RowDelta("mlp.fc1", lambda x: x @ fc1.T,
                                                                             slice(32, 96)),
                       Adapter("attn", lambda y: adapter(y, down, up))],
                   1: [RowDelta("mlp.fc2", lambda x: x @ fc2.T),
                       Adapter("mlp", lambda x: adapter(x, down2, up2), parallel=True)]}
    pad = torch.zeros(32)
    edits = {(0, "attn.proj"): lambda x, y: y + x @ proj.T,
             (0, "mlp.fc1"): lambda x, y: y + torch.cat([pad.expand(*x.shape[:2], 32), x @ fc1.T,
                                                         pad.expand(*x.shape[:2], 32)], dim=-1),
             (0, "attn"): lambda x, y: y + adapter(y, down, up),
             (1, "mlp.fc2"): lambda x, y: y + x @ fc2.T,
             (1, "mlp"): lambda x, y: y + adapter(x, down2, up2)}
    check(model, attachments, edits, [proj, fc1, fc2, down, up, down2, up2])


def test_a_parallel_adapter_reading_another_sites_input_equals_adaptformer_written_out():
    """AdaptFormer as RanPAC runs it: the MLP's output plus adapter(x), x the residual stream before norm2."""
    model = tiny_vit()
    down, up = leaves((4, DIM), (DIM, 4))

    def adapter(x):
        return torch.relu(x @ down.T) @ up.T

    residual = {}

    def remember(x, y):
        residual["x"] = x
        return y

    attachments = {1: Adapter("mlp", adapter, parallel=True, input_site="norm2")}
    edits = {(1, "norm2"): remember, (1, "mlp"): lambda x, y: y + adapter(residual["x"])}
    check(model, attachments, edits, [down, up])
    with pytest.raises(ValueError, match="give parallel=True"):
        host_of(model).forward_features(torch.randn(1, 3, 16, 16), {1: Adapter("mlp", adapter, input_site="norm2")})


def test_per_block_prompt_tokens_equal_vpt_deep_written_out():
    """VPT-deep: each block sees its own tokens (officially appended after the sequence), dropped from its output."""
    model = tiny_vit()
    first, second = leaves((1, 3, DIM), (1, 2, DIM))
    attachments = {0: PromptTokens(first, per_block=True), 1: PromptTokens(second, per_block=True)}
    host = host_of(model)
    images = torch.randn(3, 3, 16, 16)
    got = host.forward_features(images, attachments)
    want = slow_features(model, images, block_tokens={0: first, 1: second})
    assert_same(got, want)
    for got_grad, want_grad in zip(torch.autograd.grad(got.square().sum(), [first, second]),
                                   torch.autograd.grad(want.square().sum(), [first, second])):
        assert_same(got_grad, want_grad)
    kept = host.forward_features(images, {0: PromptTokens(first), 1: PromptTokens(second)})
    assert (kept - got).abs().max() > 1e-3  # tokens that stay in the sequence are another model


def test_attachments_outside_the_blocks_go_under_the_backbone_key():
    """SSF after the patch embedding and the final norm (`BACKBONE`), next to one inside a block."""
    model = tiny_vit()
    s_embed, t_embed, s_norm, t_norm, s_fc2, t_fc2 = leaves(*[(DIM,)] * 6)
    with torch.no_grad():
        for scale in (s_embed, s_norm, s_fc2):
            scale += 1.0
    attachments = {BACKBONE: [ScaleShift("patch_embed", s_embed, t_embed), ScaleShift("norm", s_norm, t_norm)],
                   0: ScaleShift("mlp.fc2", s_fc2, t_fc2)}
    edits = {("backbone", "patch_embed"): lambda x, y: y * s_embed + t_embed,
             ("backbone", "norm"): lambda x, y: y * s_norm + t_norm, (0, "mlp.fc2"): lambda x, y: y * s_fc2 + t_fc2}
    check(model, attachments, edits, [s_embed, t_embed, s_norm, t_norm, s_fc2, t_fc2])
    with pytest.raises(ValueError, match="the backbone has no sub-module 'head_norm'"):
        host_of(model).forward_features(torch.randn(1, 3, 16, 16),
                                        {BACKBONE: ScaleShift("head_norm", s_norm, t_norm)})
    with pytest.raises(ValueError, match="block 'trunk' does not exist .* go under 'backbone'"):
        host_of(model).forward_features(torch.randn(1, 3, 16, 16), {"trunk": ScaleShift("norm", s_norm, t_norm)})


def test_prompts_through_the_blocks_own_norm_and_key_value_rows_equal_explicit_prefixes():
    model = tiny_vit()
    (prompts,) = leaves((1, 4, DIM))
    gate = make_gate("sigmoid")
    host_model = host_of(model)
    host_model.install_prefix_layers([1])
    images = torch.randn(3, 3, 16, 16)
    got = host_model.forward_features(images, {1: ProjectedPrefix(prompts, gate)})
    want = slow_features(model, images, prompts={1: (prompts, gate)})
    assert_same(got, want)
    gate_params = list(gate.parameters())
    got_grads = torch.autograd.grad(got.square().sum(), [prompts, *gate_params])
    want_grads = torch.autograd.grad(want.square().sum(), [prompts, *gate_params])
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert_same(got_grad, want_grad)
    with pytest.raises(TypeError, match=r"block 0 has no prefix attention: call model.install_prefix_layers\(\[0\]\)"):
        host_model.forward_features(images, {0: ProjectedPrefix(prompts, gate)})


# ------------------------------------------------------------------ the host
def every_kind() -> dict:
    """One attachment of each kind over two blocks (both need prefix attention)."""
    per_head = (1, HEADS, 3, DIM // HEADS)
    return {0: [ScaleShift("norm1", torch.rand(DIM) + 0.5, torch.randn(DIM)), PromptTokens(torch.randn(1, 2, DIM)),
                RowDelta("attn.qkv", lambda h: h * 0.5, qkv_rows("v", DIM)),
                Prefix(torch.randn(per_head), torch.randn(per_head))],
            1: [ProjectedPrefix(torch.randn(1, 2, DIM)), Adapter("mlp", lambda y: y * 0.1)]}


def test_with_nothing_attached_the_host_is_timms_model_with_timms_keys():
    model = tiny_vit()
    host = host_of(model)
    host.install_prefix_layers([0, 1])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = host.forward_features(images)  # the last block computes the class token only: timm's sums reordered
        assert_same(plain, model.forward_head(model.forward_features(images), pre_logits=True))
        attached = host.forward_features(images, every_kind())
        assert (attached - plain).abs().max() > 1e-3
        with pytest.raises(AssertionError, match="Input height"):  # a forward that raises inside the bindings
            host.forward_features(images[:, :, :5], every_kind())
        assert torch.equal(host.forward_features(images), plain)  # nothing stays attached
    assert list(host.state_dict()) == [f"backbone.{key}" for key in model.state_dict()]
    assert all(torch.equal(host.state_dict()[f"backbone.{k}"], v) for k, v in model.state_dict().items())


def test_an_attachment_names_the_modules_it_can_go_to_and_a_block_takes_one_prefix():
    host = host_of(tiny_vit())
    host.install_prefix_layers([1])
    per_head = torch.zeros(1, HEADS, 3, DIM // HEADS)
    with pytest.raises(ValueError, match="block 1 got 2 attachments that each bind the prefix: join them into one"):
        host.forward_features(torch.randn(1, 3, 16, 16), {1: [ProjectedPrefix(torch.randn(1, 2, DIM)),
                                                             Prefix(per_head, per_head)]})
    with pytest.raises(ValueError, match=r"block 1 has no sub-module 'mlp.fc3' to attach to \(its modules: norm1, "
                                         r"attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2\)"):
        host.forward_features(torch.randn(1, 3, 16, 16), {1: ScaleShift("mlp.fc3", torch.ones(1), torch.zeros(1))})


def test_an_attachment_inside_a_compiled_region_is_honoured_and_that_region_runs_eager():
    """A compiled module runs the hooks it was compiled with: attaching inside one makes it eager, not ignored."""
    model = tiny_vit()
    eager, compiled = host_of(model), host_of(model)
    compiled.compile_blocks(backend="eager")
    images = torch.randn(2, 3, 16, 16)
    scale, shift = torch.rand(HIDDEN) + 0.5, torch.randn(HIDDEN)
    with torch.no_grad():
        assert_same(compiled.forward_features(images), eager.forward_features(images))
        attached = {1: ScaleShift("mlp.fc1", scale, shift)}
        want = eager.forward_features(images, attached)
        assert_same(compiled.forward_features(images, attached), want)
    block = compiled.backbone.blocks[1]
    assert not is_compiled(block.mlp) and is_compiled(block.norm1) and is_compiled(compiled.backbone.blocks[0].mlp)
    assert list(compiled.state_dict()) == [f"backbone.{key}" for key in model.state_dict()]
    assert block.mlp.fc1.weight is compiled.backbone.blocks[1].mlp.fc1.weight  # the same parameters, not copies


# ------------------------------------------------- trained through the engine
class KeyValueLoRA(nn.Module):
    """LoRA on the key and value rows of one block's qkv: ``delta(h) = h Aᵀ Bᵀ`` each, B zero at init."""

    def __init__(self, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, rank, DIM, generator=generator) / math.sqrt(DIM))
        self.b = nn.Parameter(torch.zeros(2, DIM, rank))

    def attachments(self) -> list[RowDelta]:
        return [RowDelta("attn.qkv", lambda h, i=i: h @ self.a[i].T @ self.b[i].T, qkv_rows(part, DIM))
                for i, part in enumerate("kv")]


class LoRATuning(TinyTuning):
    name = "test_kv_lora"

    def __init__(self, context, settings) -> None:
        super().__init__(context, settings)
        self.lora = nn.ModuleList(KeyValueLoRA(2, context.init_generator) for _ in range(DEPTH)).to(context.device)

    def owned_modules(self) -> dict[str, nn.Module]:
        return {"lora": self.lora}

    def trained_parameters(self) -> list[nn.Parameter]:
        return [*super().trained_parameters(), *self.lora.parameters()]

    def logits(self, images: Tensor) -> Tensor:
        return self.model(images, {index: lora.attachments() for index, lora in enumerate(self.lora)}).logits


class SSF(nn.Module):
    """SSF on one block: scale and shift of qkv's and fc1's outputs (ones and zeros at init)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_scale, self.qkv_shift = nn.Parameter(torch.ones(3 * DIM)), nn.Parameter(torch.zeros(3 * DIM))
        self.fc1_scale, self.fc1_shift = nn.Parameter(torch.ones(HIDDEN)), nn.Parameter(torch.zeros(HIDDEN))

    def attachments(self) -> list[ScaleShift]:
        return [ScaleShift("attn.qkv", self.qkv_scale, self.qkv_shift),
                ScaleShift("mlp.fc1", self.fc1_scale, self.fc1_shift)]


class SSFTuning(TinyTuning):
    name = "test_ssf"

    def __init__(self, context, settings) -> None:
        super().__init__(context, settings)
        self.ssf = nn.ModuleList(SSF() for _ in range(DEPTH)).to(context.device)

    def owned_modules(self) -> dict[str, nn.Module]:
        return {"ssf": self.ssf}

    def trained_parameters(self) -> list[nn.Parameter]:
        return [*super().trained_parameters(), *self.ssf.parameters()]

    def logits(self, images: Tensor) -> Tensor:
        return self.model(images, {index: ssf.attachments() for index, ssf in enumerate(self.ssf)}).logits


@pytest.mark.parametrize(("method", "section", "fresh"), [(LoRATuning, "lora", "b"), (SSFTuning, "ssf", "qkv_shift")])
def test_test_only_lora_and_ssf_train_through_the_engine_and_their_checkpoints_hold_what_they_own(tmp_path, method,
                                                                                                section, fresh):
    with registered(method):
        engine = run_engine(tiny_config(method.name), tmp_path / "run")
    owned = getattr(engine.method, section)
    assert all(getattr(module, fresh).detach().abs().max() > 0 for module in owned)  # zero at init: it trained
    accuracy = engine.matrices["accuracy"].accuracies()
    assert ((accuracy >= 0) & (accuracy <= 100)).all()
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "task3.pt")["method"]
    assert set(saved) == {"model", section, "optimizer"}
    assert set(saved["model"]) == {"backbone.head.weight", "backbone.head.bias"}  # no frozen backbone weight
    assert saved[section].keys() == owned.state_dict().keys()
    assert all(torch.equal(saved[section][key], value) for key, value in owned.state_dict().items())


def test_ssf_inside_the_blocks_resumes_bit_identically_after_a_kill_and_needs_its_tensors(tmp_path):
    with registered(SSFTuning):
        config = tiny_config(SSFTuning.name, **{"train.epochs": 2})
        straight = run_engine(config, tmp_path / "straight")
        with pytest.raises(Crash):
            run_engine(config, tmp_path / "crashed", after_epoch=crash_at(Position(1, 0, 1)))
        resumed = run_engine(config, tmp_path / "crashed", resume=True)
        for name, matrix in straight.matrices.items():
            assert torch.equal(torch.as_tensor(resumed.matrices[name].correct), torch.as_tensor(matrix.correct))
        assert all(torch.equal(a, b) for a, b in zip(straight.method.ssf.parameters(), resumed.method.ssf.parameters()))

        with pytest.raises(Crash):
            run_engine(config, tmp_path / "cut", after_epoch=crash_at(Position(1, 0, 1)))
        state = load_checkpoint(tmp_path / "cut" / "state.pt")
        del state["method"]["ssf"]["1.fc1_shift"]
        torch.save(state, tmp_path / "cut" / "state.pt")
        with pytest.raises(CheckpointError, match=r"Missing key\(s\) in the checkpoint: ssf\.1\.fc1_shift: "):
            run_engine(config, tmp_path / "cut", resume=True)
