"""Backbone registry and strict checkpoint loading: every original layout round-trips exactly; bad files are refused."""

import argparse
import hashlib
import http.server
import json
import pathlib
import threading

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from norga.backbones import PRETRAININGS, BackboneLoadError, create_backbone
from norga.backbones.hub import hub_reachable, network_state

TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8)
ARCH = "vit_base_patch16_224"


def tiny_vit(num_classes=0, **overrides):
    model = timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **{**TINY, **overrides}).eval()
    with torch.no_grad():  # timm zero-inits some tensors; randomise all so a missed copy shows
        for p in model.parameters():
            p.normal_()
    return model


def assert_same_model(loaded, source, skip=()):
    src = source.state_dict()
    for key, value in loaded.state_dict().items():
        if key.startswith(skip):
            continue
        assert torch.equal(value, src[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), source(x))


# --- writers of the original layouts ------------------------------------------------------------------

def save_jax_npz(model, path, extra=None):
    """Write ``model`` with the key naming and array layouts of Google's original ViT .npz files."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        dim = sd[b + "norm1.weight"].shape[0]
        q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        for n, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = w.T.reshape(dim, heads, -1)
            out[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = bias.reshape(heads, -1)
        out[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, -1, dim)
        out[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, name in ((0, "norm1"), (2, "norm2")):
            out[p + f"LayerNorm_{ln}/scale"] = sd[b + name + ".weight"]
            out[p + f"LayerNorm_{ln}/bias"] = sd[b + name + ".bias"]
        for d in range(2):
            out[p + f"MlpBlock_3/Dense_{d}/kernel"] = sd[b + f"mlp.fc{d + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{d}/bias"] = sd[b + f"mlp.fc{d + 1}.bias"]
    if "head.weight" in sd:
        out["head/kernel"], out["head/bias"] = sd["head.weight"].T, sd["head.bias"]
    np.savez(path, **out, **(extra or {}))
    return path


def ssl_head():
    return {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.randn(16, 1),
            "head.last_layer.weight_v": torch.randn(16, 8)}


def save_ibot_teacher(model, path):
    teacher = {"backbone." + k: v for k, v in model.state_dict().items()}
    teacher.update({"backbone.masked_embed": torch.zeros(1, 64), **ssl_head()})
    torch.save({"student": {"module." + k: v for k, v in teacher.items()}, "teacher": teacher, "epoch": 3,
                "args": argparse.Namespace(arch="vit_base"), "ibot_loss": {"center": torch.zeros(1, 8)}}, path)
    return path


def save_moco_raw(model, path):
    sd = {}
    for k, v in model.state_dict().items():
        sd["module.base_encoder." + k] = v
        sd["module.momentum_encoder." + k] = v + 1
    sd.update({"module.base_encoder.head.0.weight": torch.randn(8, 64), "module.momentum_encoder.head.0.weight":
               torch.randn(8, 64), "module.predictor.0.weight": torch.randn(8, 8)})
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


LAYOUTS = {  # backbone name -> (file name, writer, expected layout, ignored-key prefixes)
    "sup21k": ("ViT-B_16.npz", lambda m, p: save_jax_npz(m, p), "npz", ()),
    "ibot21k": ("checkpoint.pth", save_ibot_teacher, "teacher", ("head.", "masked_embed")),
    "ibot1k": ("checkpoint_teacher.pth", lambda m, p: torch.save({"state_dict": m.state_dict()}, p), "state_dict", ()),
    "dino1k": ("dino_vitbase16_pretrain.pth", lambda m, p: torch.save(m.state_dict(), p), "raw", ()),
    "mocov3_norm": ("vit-b-300ep.pth.tar", save_moco_raw, "moco_raw",
                    ("module.momentum_encoder.", "module.predictor.", "head.0.")),
    "vit_base_patch16_224": ("model.pth", lambda m, p: torch.save({"model": m.state_dict(), "epoch": 1}, p), "model", ()),
    "vit_base_patch16_224.augreg_in21k": ("w.safetensors", lambda m, p: save_file(m.state_dict(), str(p)), "safetensors", ()),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_original_layout_loads_exactly(name, tmp_path):
    file_name, write, layout, ignored_prefixes = LAYOUTS[name]
    source = tiny_vit()
    path = tmp_path / file_name
    write(source, path)
    model, record = create_backbone(name, weights=path, **TINY)
    assert_same_model(model, source)
    assert record.layout == layout
    assert record.sha256 == hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    assert record.loaded_keys == len(source.state_dict())
    assert all(k.startswith(ignored_prefixes) for k in record.ignored_keys) and bool(record.ignored_keys) == bool(ignored_prefixes)
    assert record.fresh_keys == {} and record.resampled_keys == {}
    json.dumps(record.to_dict())  # stored in run directories


def test_npz_matches_timms_own_jax_loader(tmp_path):
    """Our npz conversion agrees with timm's ``load_pretrained`` on the same file, head included."""
    source = tiny_vit(num_classes=7)
    path = save_jax_npz(source, tmp_path / "vit.npz", extra={"pre_logits/kernel": np.ones((64, 64), np.float32),
                                                          "pre_logits/bias": np.ones(64, np.float32)})
    reference = tiny_vit(num_classes=7)
    reference.load_pretrained(str(path))
    model, record = create_backbone("sup21k", weights=path, num_classes=7, **TINY)
    assert_same_model(model, reference)
    assert_same_model(model, source)
    assert set(record.ignored_keys) == {"pre_logits/kernel", "pre_logits/bias"}


def test_pretraining_head_of_other_size_is_ignored_and_recorded(tmp_path):
    source = tiny_vit(num_classes=11)
    path = save_jax_npz(source, tmp_path / "vit.npz")
    model, record = create_backbone("sup21k", weights=path, num_classes=5, **TINY)
    assert set(record.ignored_keys) == {"head.weight", "head.bias"}
    assert "(11, 64)" in record.ignored_keys["head.weight"]
    assert set(record.fresh_keys) == {"head.weight", "head.bias"}
    assert_same_model(model.reset_classifier(0) or model, source.reset_classifier(0) or source)


def test_mocov3_official_variant_drops_final_norm_for_fresh_fc_norm(tmp_path):
    source = tiny_vit()
    fresh = timm.create_model(ARCH, num_classes=3, fc_norm=True, **TINY)
    model, record = create_backbone("mocov3", weights=save_moco_raw(source, tmp_path / "m.pth.tar"), num_classes=3, **TINY)
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert {"norm.weight", "norm.bias"} <= set(record.ignored_keys)
    assert set(record.fresh_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert torch.equal(model.fc_norm.weight, fresh.fc_norm.weight)  # LayerNorm init: ones
    src = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith(("fc_norm", "head")):
            assert torch.equal(value, src[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # pre_logits = un-normalised CLS output of the source blocks (spec §3.4)
        cls = source.blocks(source._pos_embed(source.patch_embed(x)))[:, 0]
        assert torch.equal(model.eval().forward_head(model.forward_features(x), pre_logits=True), model.fc_norm(cls))


def test_timm_layout_with_matching_head_loads_head(tmp_path):
    source = tiny_vit(num_classes=10)
    torch.save({"model": source.state_dict()}, tmp_path / "m.pth")
    model, record = create_backbone(ARCH, weights=tmp_path / "m.pth", num_classes=10, **TINY)
    assert_same_model(model, source)
    assert record.fresh_keys == {} and record.ignored_keys == {}


def test_pos_embed_at_other_resolution_is_resampled_and_recorded(tmp_path):
    source = tiny_vit()
    torch.save(source.state_dict(), tmp_path / "dino.pth")
    model, record = create_backbone("dino1k", weights=tmp_path / "dino.pth", **{**TINY, "img_size": 48})
    assert record.resampled_keys == {"pos_embed": "(1, 17, 64) -> (1, 37, 64)"}
    assert record.input_size == (3, 48, 48)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)


# --- refusals ------------------------------------------------------------------------------------------

def _write_file(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".npz", ".safetensors"])
def test_random_bytes_refused(suffix, tmp_path):
    path = _write_file(tmp_path / f"junk{suffix}", np.random.default_rng(0).bytes(4096))
    with pytest.raises(BackboneLoadError, match="junk") as err:
        create_backbone(ARCH, weights=path, **TINY)
    assert "is not a readable" in str(err.value).split(path.name)[1]


@pytest.mark.parametrize("writer", [
    lambda m, p: (torch.save(m.state_dict(), p / "t.pth"), p / "t.pth")[1],
    lambda m, p: save_jax_npz(m, p / "t.npz"),
    lambda m, p: (save_file(m.state_dict(), str(p / "t.safetensors")), p / "t.safetensors")[1],
])
def test_truncated_file_refused(writer, tmp_path):
    path = writer(tiny_vit(), tmp_path)
    data = pathlib.Path(path).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BackboneLoadError, match=str(path.name)) as err:
        create_backbone(ARCH, weights=path, **TINY)
    assert "(truncated or corrupt?)" in str(err.value).split(path.name)[1]


def test_checksum_mismatch_and_nonfinite_weights_refused(tmp_path):
    source = tiny_vit()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    digest = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    create_backbone("dino1k", weights=tmp_path / "w.pth", expected_sha256=digest.upper(), **TINY)
    with pytest.raises(BackboneLoadError, match=f"has SHA-256 {digest}, expected 00ff"):
        create_backbone("dino1k", weights=tmp_path / "w.pth", expected_sha256="00ff", **TINY)
    sd = source.state_dict()
    sd["blocks.1.mlp.fc1.weight"][3, 5] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(BackboneLoadError, match=r"NaN/Inf values .*: blocks\.1\.mlp\.fc1\.weight"):
        create_backbone("dino1k", weights=tmp_path / "nan.pth", **TINY)


def test_checkpoint_of_other_width_refused_naming_shapes(tmp_path):
    torch.save(tiny_vit(embed_dim=96, num_heads=2).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(BackboneLoadError, match=r"shape mismatch .*cls_token: checkpoint \(1, 1, 96\) vs model \(1, 1, 64\)"):
        create_backbone("dino1k", weights=tmp_path / "wide.pth", **TINY)


def test_checkpoint_of_other_depth_refused(tmp_path):
    torch.save(tiny_vit(depth=3).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(BackboneLoadError, match=r"not used by the model: blocks\.2\.norm1\.weight"):
        create_backbone("dino1k", weights=tmp_path / "deep.pth", **TINY)


def test_unknown_extra_key_refused_and_model_untouched(tmp_path):
    sd = tiny_vit().state_dict()
    sd["blocks.0.attn.extra_scale"] = torch.ones(1)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(BackboneLoadError, match=r"1 checkpoint key\(s\) not used by the model: blocks\.0\.attn\.extra_scale"):
        create_backbone("dino1k", weights=tmp_path / "x.pth", **TINY)


@pytest.mark.parametrize("layout", ["raw", "npz"])
def test_missing_key_refused(layout, tmp_path):
    source = tiny_vit()
    if layout == "npz":
        path = save_jax_npz(source, tmp_path / "x.npz")
        arrays = dict(np.load(path))
        del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
        np.savez(path, **arrays)
    else:
        sd = source.state_dict()
        del sd["blocks.1.norm2.weight"]
        torch.save(sd, path := tmp_path / "x.pth")
    with pytest.raises(BackboneLoadError, match=r"1 model key\(s\) missing from the checkpoint: blocks\.1\.norm2\.weight"):
        create_backbone("sup21k", weights=path, **TINY)


def test_npz_of_other_model_refused(tmp_path):
    np.savez(tmp_path / "resnet.npz", **{"conv_root/kernel": np.ones((7, 7, 3, 8), np.float32)})
    with pytest.raises(BackboneLoadError, match=r"resnet\.npz is a \.npz without 'embedding/kernel'"):
        create_backbone("sup21k", weights=tmp_path / "resnet.npz", **TINY)


def test_unknown_npz_key_refused(tmp_path):
    path = save_jax_npz(tiny_vit(), tmp_path / "x.npz", extra={"Transformer/encoderblock_0/Adapter/kernel": np.ones(3)})
    with pytest.raises(BackboneLoadError, match="Transformer/encoderblock_0/Adapter/kernel"):
        create_backbone("sup21k", weights=path, **TINY)


def test_teacher_without_backbone_and_dict_without_state_refused(tmp_path):
    torch.save({"teacher": {"head.mlp.0.weight": torch.ones(2)}}, tmp_path / "t.pth")
    with pytest.raises(BackboneLoadError, match="no 'backbone"):
        create_backbone("ibot21k", weights=tmp_path / "t.pth", **TINY)
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "e.pth")
    with pytest.raises(BackboneLoadError, match="no state dict found.*epoch"):
        create_backbone("ibot21k", weights=tmp_path / "e.pth", **TINY)


def test_pickled_objects_beyond_weights_refused(tmp_path):
    torch.save({"model": tiny_vit().state_dict(), "path": pathlib.PurePosixPath("/x")}, tmp_path / "p.pth")
    with pytest.raises(BackboneLoadError, match="pickles pathlib.PurePosixPath.*weights_only=True"):
        create_backbone(ARCH, weights=tmp_path / "p.pth", **TINY)


def test_missing_file_and_bad_extension_refused(tmp_path):
    with pytest.raises(BackboneLoadError, match="does not exist"):
        create_backbone(ARCH, weights=tmp_path / "nope.pth", **TINY)
    with pytest.raises(BackboneLoadError, match="unsupported extension"):
        create_backbone(ARCH, weights=_write_file(tmp_path / "w.onnx", b"x"), **TINY)


# --- registry and hub ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRETRAININGS) + ["vit_tiny_patch16_224", "vit_small_patch16_224.augreg_in21k"])
def test_registry_entry_builds_tiny(name):
    model, record = create_backbone(name, weights="none", num_classes=4, **TINY)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert record.weights == "none" and record.sha256 is None and record.input_size == (3, 32, 32)
    assert len(record.mean) == 3 and len(record.std) == 3
    if name in PRETRAININGS:
        spec = PRETRAININGS[name]
        assert model.pretrained_cfg["architecture"] == spec.arch.split(".")[0]
        assert (record.mean, record.std) == (spec.mean, spec.std)
    assert isinstance(model.norm, torch.nn.Identity) == (name == "mocov3")


def test_registry_normalisation_and_sup21k_is_original_jax_in21k():
    assert PRETRAININGS["sup21k"].arch == "vit_base_patch16_224.orig_in21k"
    cfg = timm.models.get_pretrained_cfg("vit_base_patch16_224.orig_in21k")
    assert cfg.num_classes == 0 and tuple(cfg.mean) == (0.5, 0.5, 0.5)  # headless, inception normalisation
    for name in ("ibot21k", "ibot1k", "dino1k", "mocov3"):
        assert PRETRAININGS[name].mean == (0.485, 0.456, 0.406)


def test_unknown_name_refused():
    with pytest.raises(BackboneLoadError, match="unknown backbone 'vit_nonsense'.*sup21k"):
        create_backbone("vit_nonsense", weights="none")


def test_hub_offline_error_says_where_to_get_the_file():
    with pytest.raises(BackboneLoadError,
                       match=r"ibot21k.*no weights on the timm hub.*vitb_16_pt22k.*--set backbone\.weights=FILE"):
        create_backbone("ibot21k", **TINY)
    with pytest.raises(BackboneLoadError, match=r"from the hub: HF_HUB_OFFLINE is set and they are not in the local "
                                                r"hub cache.*dino_vitbase16_pretrain\.pth.*--set backbone\.weights=FILE"):
        create_backbone("dino1k", weights="hub", **TINY)


def test_fp16_safetensors_loads_into_fp32_model(tmp_path):
    """The shipped tiny backbone is fp16 safetensors: values are the fp16 ones, model stays fp32."""
    source = tiny_vit()
    save_file({k: v.half() for k, v in source.state_dict().items()}, str(tmp_path / "w16.safetensors"))
    model, _ = create_backbone(ARCH, weights=tmp_path / "w16.safetensors", **TINY)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, source.state_dict()[key].half().float()), key


def test_the_hub_probe_tells_a_listening_endpoint_from_none(monkeypatch):
    """Any HTTP answer (here 501 to HEAD) means network; a refused connection means none, at once."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    assert hub_reachable()
    server.server_close()  # nothing listens on the port any more
    assert not hub_reachable()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    assert network_state() == "unreachable"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert network_state() == "offline"
