"""MoCo v3's fc_norm as the official code uses it: features read before it, trained with the head (prompt
training and TAP), its own copy in the task-identity model, kept in the state; no change without fc_norm."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from engine_fixtures import make_engine, tiny_config
from torch import nn

from norga.engine.run_dir import RunDirectory
from norga.methods.base import ImageIds, PredictRequest
from norga.methods.hide import HiDePrompt
from norga.methods.hide.task_identity import TaskIdentityModel
from norga.nn import PromptedViT

ARCH = dict(img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny_host(fc_norm: bool) -> PromptedViT:
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, fc_norm=fc_norm, **ARCH)
    host = PromptedViT(backbone, train_fc_norm=fc_norm).eval()
    if fc_norm:  # a trained fc_norm, not the identity-like init
        with torch.no_grad():
            host.backbone.fc_norm.weight.uniform_(0.5, 1.5)
            host.backbone.fc_norm.bias.normal_()
    return host


def assert_timms(got: torch.Tensor, want: torch.Tensor) -> None:
    """The host's last block computes only the class token (`norga.nn.pooled_block`): timm's fp32 sums of at most
    4·dim terms reordered, a few ulps × sqrt(4·dim) of the values' scale."""
    tolerance = 4 * torch.finfo(torch.float32).eps * math.sqrt(4 * ARCH["embed_dim"])
    assert (got - want).abs().max() <= tolerance * max(1.0, want.abs().max().item())


def test_features_are_the_class_token_before_fc_norm_and_logits_apply_it():
    host, x = tiny_host(fc_norm=True), torch.randn(4, 3, 16, 16)
    backbone = host.backbone
    with torch.no_grad():
        cls = backbone.forward_features(x)[:, 0]  # final norm is Identity with fc_norm (timm)
        out = host(x)
        assert_timms(out.features, cls)
        assert torch.equal(out.logits, backbone.head(backbone.fc_norm(out.features)))
        backbone.fc_norm.weight.mul_(2.0)  # training fc_norm leaves the (cached) frozen features as they are
        assert torch.equal(host.forward_features(x), out.features)
    assert host.has_fc_norm and not tiny_host(fc_norm=False).has_fc_norm


def test_without_fc_norm_features_logits_and_trained_parameters_are_timms():
    host, x = tiny_host(fc_norm=False), torch.randn(4, 3, 16, 16)
    backbone = host.backbone
    with torch.no_grad():
        tokens = backbone.forward_features(x)
        assert_timms(host.forward_features(x), backbone.forward_head(tokens, pre_logits=True))
        assert_timms(host(x).logits, backbone.forward_head(tokens))
    assert [id(p) for p in host.head_parameters()] == [id(p) for p in backbone.head.parameters()]


def weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()] or [torch.zeros(0)]).clone()


@pytest.fixture(scope="module")
def fc_norm_run(tmp_path_factory):
    """A tiny NoRGa run on a backbone with fc_norm; records which phases changed the prompted fc_norm and the TII
    model's."""
    config = tiny_config(**{"backbone.timm_kwargs": {**ARCH, "fc_norm": True}})
    engine = make_engine(config, RunDirectory(tmp_path_factory.mktemp("fc_norm") / "run"))
    changed: dict[tuple[int, str], dict[str, bool]] = {}
    original = HiDePrompt.run_phase

    def recording(self, task, phase, start_epoch, on_epoch_end):
        before = {"prompted": weights(self.model.backbone.fc_norm), "tii": weights(self.tii)}
        original(self, task, phase, start_epoch, on_epoch_end)
        after = {"prompted": weights(self.model.backbone.fc_norm), "tii": weights(self.tii)}
        changed[task, phase.name] = {k: not torch.equal(before[k], after[k]) for k in before}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HiDePrompt, "run_phase", recording)
        engine.run()
    return engine, changed


def test_prompted_fc_norm_trains_with_the_head_in_prompt_training_and_tap(fc_norm_run):
    _, changed = fc_norm_run
    for task in (1, 2):
        assert changed[task, "wtp_train"]["prompted"] and changed[task, "tap"]["prompted"]
        assert changed[task, "tii_train"] == {"prompted": False, "tii": True}
        assert changed[task, "tii_tap"] == {"prompted": False, "tii": True}


def test_frozen_class_statistics_stay_those_of_the_frozen_class_token(fc_norm_run):
    """Computed before fc_norm: after the run trained fc_norm, a fresh frozen pass gives the same class means."""
    engine, _ = fc_norm_run
    method, ctx = engine.method, engine.method.ctx
    for task in range(len(ctx.tasks)):
        with torch.no_grad():
            fresh = ctx.encode_dataset(ctx.tasks[task].train_eval)
        for label in ctx.classes(task):
            mean = method.tii_gaussians.means([label])[0]
            torch.testing.assert_close(mean.float(), fresh.features[fresh.labels == label].mean(0), rtol=1e-5,
                                       atol=1e-5 * float(fresh.features.abs().max()))


def test_task_identity_model_has_its_own_fc_norm_in_the_state(fc_norm_run):
    method = fc_norm_run[0].method
    # official MlpMapping(fc_with_norm=True): no outer LayerNorm, the model's fc_norm before the head
    assert isinstance(method.tii.fc_norm, nn.LayerNorm) and isinstance(method.tii.mapping.norm, nn.Identity)
    state = method.state_dict()  # what every checkpoint holds
    assert torch.equal(state["model"]["backbone.fc_norm.weight"], method.model.backbone.fc_norm.weight)
    assert torch.equal(state["tii"]["fc_norm.weight"], method.tii.fc_norm.weight)


def test_memoised_prompted_features_stay_valid_when_fc_norm_trains(fc_norm_run):
    """fc_norm is applied after the memo: changing it changes the predictions, not the memoised features."""
    method = fc_norm_run[0].method
    ctx = method.ctx
    images = torch.stack([ctx.test_tasks[0].test[i][0] for i in range(4)])
    ids = ImageIds(("probe", 0), torch.arange(4), 4)
    frozen = ctx.frozen_encode(images)
    memo = method.prompted_memo
    method.predict(PredictRequest(images, 3, frozen, ids))
    encoded = memo.images_encoded
    saved = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    try:
        with torch.no_grad():
            method.model.backbone.fc_norm.bias.normal_(0, 5.0)
        memoised = method.predict(PredictRequest(images, 3, frozen, ids)).classes
        assert memo.images_encoded == encoded  # nothing re-encoded
        method.prompted_memo = None
        assert torch.equal(memoised, method.predict(PredictRequest(images, 3, frozen)).classes)
    finally:
        method.prompted_memo = memo
        method.model.backbone.load_state_dict(saved)


def test_task_identity_fc_norm_is_the_vits_norm_layer():
    assert TaskIdentityModel(8, 3, fc_norm=True).fc_norm.eps == 1e-6  # official: partial(LayerNorm, eps=1e-6)
