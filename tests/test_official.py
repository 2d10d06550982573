"""Loading prompt pools, gate scalars and heads from checkpoints in the official code's format."""

import argparse
import hashlib

import pytest
import timm
import torch
from official_fixtures import (
    assert_matches_reference,
    backbone_keys,
    official_backbone,
    reference_class_token,
    reference_logits,
    save_prompt_stage,
    trained_norm,
)
from prompted_fixture import Prompted

from norga.methods.hide.official_checkpoints import (
    OfficialCheckpointError,
    load_official_checkpoint,
    read_official_checkpoint,
)
from norga.nn import PromptedViT, TaskPrompts

LAYERS, SLOTS, LP, CLASSES = 2, 3, 4, 5
ARCH = dict(img_size=32, patch_size=8, depth=3)


def make_model(gate="sigmoid", seed=0, num_slots=SLOTS, num_classes=CLASSES):
    with torch.random.fork_rng():  # same backbone for a seed; everything else stays freshly random
        torch.manual_seed(seed)
        backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
    host = PromptedViT(backbone, num_classes=num_classes).eval()
    model = Prompted(host, TaskPrompts(host, num_slots, LP, range(LAYERS), gate=gate or "none"))
    model.backbone, model.pool, model.gates = host.backbone, model.prompts.pool, model.prompts.gates
    return model


def load(model, path, **kwargs):
    return load_official_checkpoint(model.host, model.prompts, path, **kwargs)


def write_official(path, *, gate_act="sigmoid", with_gate=True, extra=None, drop=(), backbone_seed=0, prompts_shape=None):
    """What the official engine saves: the whole model's state dict in timm naming, plus optimizer, epoch, args."""
    source = make_model(gate="sigmoid", seed=backbone_seed)
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    state["head.weight"] = torch.randn(CLASSES, 192)
    state["head.bias"] = torch.randn(CLASSES)
    state["e_prompt.prompt"] = torch.empty(prompts_shape or (LAYERS, 2, SLOTS, LP, 3, 64)).uniform_(-1, 1)
    if with_gate:
        state["e_prompt.act_scale"] = torch.rand(LAYERS, 2, 1, 1) + 0.5
    state.update(extra or {})
    for key in drop:
        state.pop(key)
    payload = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 4,
               "args": argparse.Namespace(gate_act=gate_act, seed=42, size=LP)}
    torch.save(payload, path)
    return state


def test_loads_prompts_gates_and_head(tmp_path):
    path = tmp_path / "task2_checkpoint.pth"
    state = write_official(path, extra={"e_prompt.prompt_key": torch.randn(SLOTS, 192)})
    model = make_model()
    report = load(model, path)
    assert torch.equal(model.pool.prompts, state["e_prompt.prompt"])
    for layer, gate in enumerate(model.gates):
        assert gate.tau.item() == state["e_prompt.act_scale"][layer, 0].item()
        assert gate.alpha.item() == state["e_prompt.act_scale"][layer, 1].item()
    assert torch.equal(model.backbone.head.weight, state["head.weight"])
    assert torch.equal(model.backbone.head.bias, state["head.bias"])
    assert report.ignored == ["e_prompt.prompt_key"]
    assert report.backbone_keys_checked == len(state) - 5
    assert report.official_gate_activation == "sigmoid"
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # the loaded prompts are used: the prompted forward changes with them
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x, torch.tensor([0, 2])).logits
        model.pool.load_prompts(torch.zeros_like(state["e_prompt.prompt"]))
        assert (model(x, torch.tensor([0, 2])).logits - before).abs().max() > 1e-4


def test_hide_prompt_checkpoint(tmp_path):
    path = tmp_path / "hide.pth"
    state = write_official(path, with_gate=False, gate_act=None)
    model = make_model(gate=None)
    load(model, path)
    assert torch.equal(model.pool.prompts, state["e_prompt.prompt"])
    with pytest.raises(OfficialCheckpointError, match="HiDe-Prompt checkpoint.*gate='none'"):
        load(make_model(gate="sigmoid"), path)


def test_norga_checkpoint_into_models_that_do_not_fit(tmp_path):
    path = tmp_path / "norga.pth"
    write_official(path, gate_act="sigmoid")
    with pytest.raises(OfficialCheckpointError, match="no NoRGa gate: build it with gate='sigmoid'"):
        load(make_model(gate=None), path)
    with pytest.raises(OfficialCheckpointError, match="trained with gate activation 'sigmoid' but the model uses 'tanh'"):
        load(make_model(gate="tanh"), path)
    with pytest.raises(OfficialCheckpointError, match="build them with num_slots=3, length=4"):
        load(make_model(num_slots=5), path)
    with pytest.raises(OfficialCheckpointError, match="'head.weight' is shaped \\(5, 192\\).*number of classes"):
        load(make_model(num_classes=7), path)


def test_different_backbone_is_refused_unless_asked(tmp_path):
    path = tmp_path / "other_backbone.pth"
    state = write_official(path, backbone_seed=1)
    model = make_model(seed=0)
    with pytest.raises(OfficialCheckpointError, match="backbone weight '.*' differs.*check_backbone=False"):
        load(model, path)
    load(model, path, check_backbone=False)
    assert torch.equal(model.pool.prompts, state["e_prompt.prompt"])


def test_unknown_keys_and_bad_files(tmp_path):
    path = tmp_path / "extra.pth"
    write_official(path, extra={"g_prompt.prompt": torch.randn(2, 5)})
    with pytest.raises(OfficialCheckpointError, match="no place for: \\['g_prompt.prompt'\\]"):
        load(make_model(), path)

    tii = tmp_path / "tii.pth"
    torch.save({"model": {"head.weight": torch.randn(2, 2)}}, tii)
    with pytest.raises(OfficialCheckpointError, match="task-identity stage"):
        read_official_checkpoint(tii)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(OfficialCheckpointError, match="cannot read .*garbage.pth"):
        read_official_checkpoint(garbage)

    truncated = tmp_path / "truncated.pth"
    write_official(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(OfficialCheckpointError, match="cannot read"):
        read_official_checkpoint(truncated)

    with pytest.raises(FileNotFoundError, match="official checkpoint not found"):
        read_official_checkpoint(tmp_path / "missing.pth")


class NotAllowed:
    pass


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    write_official(path)
    payload = torch.load(path, weights_only=False)
    payload["args"] = NotAllowed()
    torch.save(payload, path)
    with pytest.raises(OfficialCheckpointError, match="cannot read"):
        read_official_checkpoint(path)


# ------------------------------------------------------- MoCo v3 (fc_norm) and strictness
def fc_norm_model(gate="gelu", seed=0):
    host = PromptedViT(official_backbone(seed, fc_norm=True), num_classes=CLASSES, train_fc_norm=True).eval()
    model = Prompted(host, TaskPrompts(host, SLOTS, LP, range(LAYERS), gate=gate or "none"))
    model.backbone, model.pool, model.gates = host.backbone, model.prompts.pool, model.prompts.gates
    return model


def write_moco_prompt_stage(path, drop=()):
    """The prompt stage on MoCo v3 as the official code saves it: no final norm, a trained fc_norm and head."""
    state = backbone_keys(official_backbone(0, fc_norm=True))
    assert not any(key.startswith("norm.") for key in state)  # the official fc_norm variant drops the final norm
    state.update(trained_norm("fc_norm", 192))
    state["head.weight"], state["head.bias"] = torch.randn(CLASSES, 192) / 14, 0.1 * torch.randn(CLASSES)
    state["e_prompt.prompt"] = torch.empty(LAYERS, 2, SLOTS, LP, 3, 64).uniform_(-1, 1)
    state["e_prompt.act_scale"] = torch.rand(LAYERS, 2, 1, 1) + 0.5
    for key in drop:
        state.pop(key)
    save_prompt_stage(path, state, gate_act="gelu")
    return state


def test_moco_prompt_stage_loads_the_trained_fc_norm_and_computes_what_its_weights_define(tmp_path):
    path = tmp_path / "checkpoint" / "task3_checkpoint.pth"
    state = write_moco_prompt_stage(path)
    model = fc_norm_model()
    report = load(model, path)
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} <= set(report.loaded)
    assert torch.equal(model.backbone.fc_norm.weight, state["fc_norm.weight"])
    unchecked = fc_norm_model()
    load(unchecked, path, check_backbone=False)  # the trained fc_norm is loaded, not dropped with the checks
    assert torch.equal(unchecked.backbone.fc_norm.bias, state["fc_norm.bias"])
    x, slots = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(x, slots)
        cls = reference_class_token(state, x, depth=3, prompt={"layers": [0, 1], "slots": slots, "gate_act": "gelu"})
        assert_matches_reference(out.features, cls)  # the official "pre_logits": before fc_norm
        assert_matches_reference(out.logits, reference_logits(state, cls))


def test_fc_norm_mismatches_missing_keys_and_shapes_are_refused_before_anything_loads(tmp_path):
    moco = tmp_path / "moco.pth"
    write_moco_prompt_stage(moco)
    plain = tmp_path / "plain.pth"
    write_official(plain, gate_act="gelu")
    missing = tmp_path / "missing.pth"
    write_moco_prompt_stage(missing, drop=("head.bias",))
    partial = tmp_path / "partial.pth"
    write_moco_prompt_stage(partial, drop=("blocks.1.attn.qkv.bias",))
    cases = [
        (make_model(gate="gelu"), moco, "no place for: \\['fc_norm.bias', 'fc_norm.weight'\\].*build the backbone with one"),
        (fc_norm_model(), plain, "no trained fc_norm but the model has one"),
        (fc_norm_model(), missing, "lacks the trained weights \\['head.bias'\\]"),
        (fc_norm_model(), partial, "lacks backbone keys \\['blocks.1.attn.qkv.bias'\\].*check_backbone=False"),
    ]
    for model, path, match in cases:
        before = {k: v.clone() for k, v in [*model.host.state_dict().items(), *model.prompts.state_dict().items()]}
        with pytest.raises(OfficialCheckpointError, match=match):
            load(model, path)
        after = {**model.host.state_dict(), **model.prompts.state_dict()}
        assert all(torch.equal(before[k], after[k]) for k in before), path  # nothing half-loaded
    load(fc_norm_model(), partial, check_backbone=False)
