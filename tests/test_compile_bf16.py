"""Regional torch.compile and bf16 autocast of the prompted ViT against eager fp32; amp=auto resolution."""

import copy
import logging

import pytest
import timm
import torch
from prompted_fixture import Prompted
from torch._dynamo.utils import counters

from norga.config import ConfigError
from norga.config_io import load_config
from norga.engine.resolve import resolve_config
from norga.nn import PrefixAttention, PromptedViT, TaskPrompts
from norga.nn.regional_compile import RECOMPILE_LIMIT, is_compiled
from norga.runtime import precision

SIZE, PATCH, CLASSES = 16, 4, 5


def tiny_model(seed: int = 0) -> Prompted:
    """Depth 3 with prompts in blocks 0-1: both a prefix block (compiled around its attention) and a plain one."""
    torch.manual_seed(seed)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=3,
                                 embed_dim=32, num_heads=2)
    host = PromptedViT(backbone, num_classes=CLASSES)
    model = Prompted(host, TaskPrompts(host, 3, 4, [0, 1], gate="tanh")).train()
    model.prompts.train_slot(1, "all")
    with torch.no_grad():  # gates away from their init so their gradients are generic
        for gate in model.prompts.gates:
            for param in gate.parameters():
                param.uniform_(0.5, 1.5)
    return model


def step(model: Prompted, images: torch.Tensor, labels: torch.Tensor, autocast: bool = False):
    """Features, logits and the gradients of the trainable parameters (by name) of one cross-entropy step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images, 1, momentum=0.1)
    torch.nn.functional.cross_entropy(out.logits.float(), labels).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert {"prompts.pool.slots.1", "prompts.gates.0.alpha", "host.backbone.head.weight"} <= set(grads)
    return out.features.detach().float(), out.logits.detach().float(), grads


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm().clamp_min(1e-12))


def batch(seed: int, n: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def test_compiled_model_matches_eager_in_outputs_and_gradients_without_recompiling():
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    regions = compiled.host.compile_blocks()
    assert regions == {0: ["norm1", "norm2", "mlp"], 1: ["norm1", "norm2", "mlp"], 2: ["norm1", "attn", "norm2", "mlp"]}
    assert list(compiled.state_dict()) == keys  # no `_orig_mod.`: checkpoints load both ways
    blocks = compiled.host.backbone.blocks
    assert is_compiled(blocks[2].attn) and is_compiled(blocks[0].mlp) and not is_compiled(blocks[0].attn)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT  # train/eval/autocast variants stay compiled
    counters.clear()
    for seed in (1, 2, 3):
        images, labels = batch(seed)
        # Inductor reorders fp32 reductions (layer norm, fused MLP): measured agreement is <= 2e-6 relative;
        # 1e-4 leaves room for other CPUs while any real change (a lost prompt, gate or residual) is O(1).
        for got, want in zip(step(compiled, images, labels), step(eager, images, labels)):
            if isinstance(want, dict):
                for name in want:
                    assert relative_error(got[name], want[name]) < 1e-4, name
            else:
                assert relative_error(got, want) < 1e-4
        if seed == 1:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0  # something was compiled
    assert counters["stats"]["unique_graphs"] == graphs  # fresh inputs of the same shape: no recompilation
    assert not counters["graph_break"]
    compiled.load_state_dict(eager.state_dict())  # strict: same keys


def test_a_block_given_prefix_attention_after_compiling_keeps_its_regions_and_an_eager_attention():
    model = tiny_model()
    model.host.compile_blocks()
    model.host.install_prefix_layers([2])
    block = model.host.backbone.blocks[2]
    assert not is_compiled(block.attn) and is_compiled(block.mlp) and is_compiled(block.norm1)


def test_bf16_autocast_is_close_to_fp32():
    model = tiny_model()
    images, labels = batch(4, n=16)
    features, logits, grads = step(model, images, labels)
    bf_features, bf_logits, bf_grads = step(model, images, labels, autocast=True)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%) per matmul input; three blocks of matmuls
    # accumulate that (measured: 0.4-0.5% of the feature / logit norm, <= 1.2% for gradients, which pass
    # through the blocks twice). 2% / 4% leave room for that and are far below the O(1) error of a broken
    # autocast path (a dropped prompt or gate, features in the wrong scale).
    assert 0 < relative_error(bf_features, features) < 0.02  # > 0: the forward did run in bf16
    assert relative_error(bf_logits, logits) < 0.02
    for name in grads:
        assert relative_error(bf_grads[name], grads[name]) < 0.04, name
    assert bf_features.dtype == torch.float32 and bf_grads["prompts.pool.slots.1"].dtype == torch.float32  # fp32 master copies


def _frozen_matmul_weights(model: Prompted) -> dict[str, torch.Tensor]:
    return {name: param for module_name, module in model.named_modules() if isinstance(module, (torch.nn.Linear,
            torch.nn.Conv2d)) for name, param in module.named_parameters(module_name, recurse=False) if not param.requires_grad}


def _casts(model: Prompted, images: torch.Tensor, labels: torch.Tensor) -> int:
    """How many dtype conversions (``aten::_to_copy``) one autocast training step makes."""
    from torch.profiler import profile

    with profile() as prof:
        step(model, images, labels, autocast=True)
    return sum(event.count for event in prof.key_averages() if event.key == "aten::_to_copy")


def test_frozen_weights_held_in_bf16_compute_exactly_what_autocast_computes_without_recasting_them():
    recast = tiny_model()
    held = copy.deepcopy(recast)
    frozen = _frozen_matmul_weights(held)
    fp32_bytes = sum(param.nbytes for param in frozen.values())
    assert held.host.hold_frozen_weights_in(torch.bfloat16) == len(frozen) > 0
    assert {param.dtype for param in frozen.values()} == {torch.bfloat16}
    assert sum(param.nbytes for param in frozen.values()) * 2 == fp32_bytes  # their memory halves
    kept = {name: param.dtype for name, param in held.named_parameters() if name not in frozen}
    assert kept and set(kept.values()) == {torch.float32}  # norms, embeddings, prompts, gates, head
    assert "host.backbone.pos_embed" in kept and "host.backbone.head.weight" in kept
    assert held.host.hold_frozen_weights_in(torch.bfloat16) == 0  # idempotent
    for seed in (5, 6):
        images, labels = batch(seed)
        # autocast rounds each fp32 weight to bf16 at every call; held in bf16 they are that rounding, done once,
        # so a step is bit-identical: any difference means the held copy is not what autocast would use.
        for got, want in zip(step(held, images, labels, autocast=True), step(recast, images, labels, autocast=True)):
            if isinstance(want, dict):
                assert all(torch.equal(got[name], want[name]) for name in want)
            else:
                assert torch.equal(got, want)
    images, labels = batch(7)
    assert _casts(recast, images, labels) - _casts(held, images, labels) >= len(frozen)  # no weight re-cast
    with pytest.raises(RuntimeError):  # documented: outside autocast an fp32 input meets bf16 weights
        held.host.forward_features(images)


def _ops(model: Prompted, images: torch.Tensor, labels: torch.Tensor) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        step(model, images, labels, autocast=True)
    return {event.key for event in prof.key_averages()}


def test_prepare_for_bf16_holds_the_weights_and_routes_every_block_past_the_cpu_flash_kernel():
    """`prepare_for_bf16` (what a bf16 run does): weights held as before, and every block's attention, prompted
    or not, through norga's kernels, which in bf16 on CPU are explicit (no flash attention: its bf16 backward is
    ~2x slower there). The step stays within the bf16 bounds of `test_bf16_autocast_is_close_to_fp32`."""
    model = tiny_model()
    keys = list(model.state_dict())
    held, prepared = copy.deepcopy(model), copy.deepcopy(model)
    held.host.hold_frozen_weights_in(torch.bfloat16)
    precision.prepare_for_bf16(prepared.host)
    assert list(prepared.state_dict()) == keys  # the same weights under the same names
    assert {param.dtype for param in prepared.host.frozen_matmul_parameters()} == {torch.bfloat16}
    assert all(isinstance(block.attn, PrefixAttention) for block in prepared.host.backbone.blocks)
    images, labels = batch(8, n=16)
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash in _ops(held, images, labels)  # block 2 has no prompts: timm's SDPA
    assert flash not in _ops(prepared, images, labels)
    features, logits, grads = step(model, images, labels)
    bf_features, bf_logits, bf_grads = step(prepared, images, labels, autocast=True)
    assert 0 < relative_error(bf_features, features) < 0.02 and relative_error(bf_logits, logits) < 0.02
    for name in grads:
        assert relative_error(bf_grads[name], grads[name]) < 0.04, name


# ---------------------------------------------------------------------------------- amp resolution
@pytest.mark.parametrize(("native", "requested", "expected"),
                         [(True, "auto", "bf16"), (False, "auto", "none"), (True, "bf16", "bf16"),
                          (False, "bf16", "bf16"), (True, "none", "none"), (False, "none", "none")])
def test_amp_resolution(monkeypatch, native, requested, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert precision.resolve_amp(requested, "cpu") == expected


def test_bf16_without_native_support_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    precision._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        precision.resolve_amp("bf16", "cpu")
        precision.resolve_amp("bf16", "cpu")
        precision.resolve_amp("auto", "cpu")
    assert len(caplog.records) == 1 and "emulated" in caplog.text and "amp=auto" in caplog.text
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    caplog.clear()
    precision._warn_emulated.cache_clear()
    precision.resolve_amp("bf16", "cpu")
    assert not caplog.records


def test_resolve_config_resolves_auto_in_a_new_config_and_records_it(monkeypatch):
    import norga.engine.resolve as resolve

    for native, resolved in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        monkeypatch.setattr(resolve, "native_bf16", lambda device, native=native: native)
        config = load_config(None, ["amp=auto", "compile=true", "device=cpu"])
        result = resolve_config(config, locate_data=False)
        assert config.amp == "auto" and result.config.amp == resolved  # the caller's config is left as it was
        assert result.config.to_dict() == {**config.to_dict(), "amp": resolved}
        assert result.precision == {"amp_requested": "auto", "native_bf16": native, "compile": True, "amp": resolved}


@pytest.mark.parametrize(("line", "native"), [("flags\t\t: fpu avx2 avx512f", False),
                                              ("flags\t\t: fpu avx512f avx512_bf16", True),
                                              ("flags\t\t: fpu amx_tile amx_bf16", True),
                                              ("Features\t: fp asimd bf16", True), ("Features\t: fp asimd", False)])
def test_cpu_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path, line, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch._C._cpu, probe, lambda: False, raising=False)
    read = precision.cpu_flags
    monkeypatch.setattr(precision, "cpu_flags", lambda: read(cpuinfo))
    assert precision.native_bf16("cpu") is native
    assert precision.native_bf16("mps") is False


def test_a_torch_probe_of_native_bf16_is_trusted(monkeypatch):
    monkeypatch.setattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())
    assert precision.native_bf16("cpu") is True


def test_amp_and_compile_config_values_are_checked():
    assert load_config(None, ["amp=auto"]).amp == "auto"
    assert load_config(None, ["compile=true"]).compile is True
    with pytest.raises(ConfigError, match="amp must be one of"):
        load_config(None, ["amp=fp16"])
    with pytest.raises(ConfigError, match="compile must be"):
        load_config(None, ["compile=maybe"])
