"""RanPAC's first-session adaptation (Phase 1): each kind equals the official PETL forward written out, trains on task
0 only and is frozen after, the statistics come from the adapted backbone, a run killed mid-adaptation (or after)
resumes to the same bits, and ``first_session none`` is the frozen-feature run."""

from __future__ import annotations

import math
import re

import pytest
import torch
from engine_fixtures import (
    Crash,
    crash_at,
    make_engine,
    make_tasks,
    run_fixture,
    tiny_config,
)
from test_attachments import DIM, assert_same, host_of, slow_features, tiny_vit
from torch import nn

from norga.config import ConfigError
from norga.config_io import load_config
from norga.engine.loop import Position
from norga.engine.run_dir import RunDirectory
from norga.methods.ranpac.analytic import RandomFeatureMap, unpack_upper
from norga.methods.ranpac.first_session import FirstSessionModules
from norga.methods.ranpac.methods import AdaptationSettings
from norga.runtime.seeding import derive_seed

KINDS = ("adapter", "ssf", "vpt_deep")
EPS = torch.finfo(torch.float64).eps


def adapted_config(method: str = "ranpac", kind: str = "adapter", epochs: int = 2, **changes):
    return tiny_config(method, first_session=kind, **{"adaptation.train.epochs": epochs,
                                                      "adaptation.train.batch_size": 4}, **changes)


# ---------------------------------------------------------------------------------------- the official forward
def official_edits(modules: FirstSessionModules) -> tuple[dict, dict]:
    """RanPAC's petl/ forward of each kind, as edits of the slow model (tests/test_attachments.py)."""
    if modules.kind == "adapter":  # vision_transformer_adapter.py Block.forward, ffn_option "parallel"
        residual, edits = {}, {}
        for index, adapter in enumerate(modules.adapters):
            def remember(x, y, index=index):
                residual[index] = x
                return y

            def official(x, y, adapter=adapter, index=index):  # down -> ReLU -> (dropout, off in eval) -> up, x 0.1
                return y + torch.relu(residual[index] @ adapter.down.weight.T + adapter.down.bias) \
                    @ adapter.up.weight.T * 0.1 + adapter.up.bias * 0.1

            edits[(index, "norm2")], edits[(index, "mlp")] = remember, official
        return edits, {}
    if modules.kind == "ssf":  # vision_transformer_ssf.py: ssf_ada after each of these outputs
        def ssf_ada(parameters):
            return lambda x, y: y * parameters.scale + parameters.shift

        edits = {(index, site): ssf_ada(sites[site.replace(".", "_")]) for index, sites in enumerate(modules.blocks_ssf)
                 for site in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")}
        for site in ("patch_embed", "norm"):
            edits[("backbone", site)] = ssf_ada(modules.backbone_ssf[site])
        return edits, {}
    return {}, {index: modules.prompts[index][None] for index in range(len(modules.prompts))}  # vpt.py, "Deep"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_the_official_petl_forward_and_starts_as_documented(kind):
    model = tiny_vit()
    host = host_of(model)
    modules = FirstSessionModules(kind, host.backbone, AdaptationSettings(), 3, torch.Generator().manual_seed(0))
    images = torch.randn(3, 3, 16, 16)
    plain = host.forward_features(images)
    with torch.no_grad():
        start = host.forward_features(images, modules.attachments())
    if kind == "ssf":  # scale ~ N(1, 0.02), shift ~ N(0, 0.02): near the identity, not it
        values = torch.cat([p.scale.detach() for p in modules.modules() if hasattr(p, "scale")])
        assert abs(float(values.mean()) - 1) < 0.01 and 0.01 < float(values.std()) < 0.03
        assert (start - plain).abs().max() > 0
    elif kind == "adapter":  # the up-projection starts at 0: the backbone's own features
        assert_same(start, plain)
    else:  # prompts start at 0, yet zero tokens are attended to (their keys are norm1's bias through qkv)
        assert not modules.prompts.any() and (start - plain).abs().max() > 1e-3
    with torch.no_grad():  # move every parameter off its start so that each one matters below
        for param in modules.adapted_parameters():
            param.add_(0.2 * torch.randn_like(param))
    modules.eval()
    got = host.forward_features(images, modules.attachments())
    edits, tokens = official_edits(modules)
    want = slow_features(model, images, edits, block_tokens=tokens)
    assert_same(got, want)
    params = modules.adapted_parameters()
    for got_grad, want_grad in zip(torch.autograd.grad(got.square().sum(), params),
                                   torch.autograd.grad(want.square().sum(), params)):
        assert_same(got_grad, want_grad)


def test_the_cosine_head_is_sigma_times_cosine_from_one():
    modules = FirstSessionModules("vpt_deep", tiny_vit(), AdaptationSettings(), 4, torch.Generator().manual_seed(1))
    head = modules.head
    assert float(head.sigma.detach()) == 1.0 and float(head.weight.detach().abs().max()) <= 1 / math.sqrt(DIM)
    x = torch.randn(5, DIM)
    with torch.no_grad():
        head.sigma.fill_(2.5)
        expected = 2.5 * torch.stack([torch.stack([torch.dot(a, w) / (a.norm() * w.norm()) for w in head.weight])
                                      for a in x])
        torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- through a run
def adapted_snapshot(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.method.first_session.modules.adapted_parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_the_module_moves_on_task_0_only_and_the_statistics_are_the_adapted_backbones(tmp_path, kind):
    config = adapted_config(kind=kind)
    directory = RunDirectory(tmp_path / "run")
    directory.write_config(config)
    snapshots = {}
    engine = make_engine(config, directory, after_epoch=lambda position: snapshots.setdefault(
        (position.task, position.phase, position.epoch), adapted_snapshot(engine)))
    initial = adapted_snapshot(engine)
    assert [p.name for p in engine.method.phases(0)] == ["first_session", "statistics"]
    assert [p.name for p in engine.method.phases(1)] == ["statistics"]
    engine.run()
    after_task_0 = snapshots[(1, 0, 0)]
    assert all(not torch.equal(a, b) for a, b in zip(initial, after_task_0))  # every tensor trained
    final = adapted_snapshot(engine)
    assert all(torch.equal(a, b) for a, b in zip(after_task_0, final))  # and never again
    assert not any(p.requires_grad for p in engine.method.first_session.modules.parameters())
    # G is the sum over every task's training images (test transform) through the *adapted* backbone
    method, context = engine.method, engine.context
    saved = torch.load(tmp_path / "run" / "checkpoints" / "task3.pt", weights_only=True)
    gram = unpack_upper(saved["ranpac_statistics"]["gram_upper"], 64)
    feature_map = RandomFeatureMap(32, 64, derive_seed(config.seed, "ranpac-projection"))
    with torch.no_grad():
        adapted = torch.cat([method.first_session.encode(torch.stack([image for image, _ in task.train_eval]))
                             for task in context.tasks]).cpu()
        frozen = torch.cat([context.frozen_train_features(task).features for task in range(3)])
    scale = float(gram.abs().max())
    h_adapted, h_frozen = feature_map(adapted), feature_map(frozen)
    adapted_error = float((gram - h_adapted.T @ h_adapted).abs().max())
    assert adapted_error <= 1e-4 * scale  # features encoded in batches of 3 or all at once: float32 rounding
    assert float((gram - h_frozen.T @ h_frozen).abs().max()) > 100 * max(adapted_error, 1e-9 * scale)
    assert saved["method"]["adaptation"]["first_session"].keys() == method.first_session.modules.state_dict().keys()


def test_simplecil_with_a_first_session_is_ncm_on_adapted_features(tmp_path):
    """RanPAC's "NCM with Phase 1" row: prototypes are the raw means of the adapted features."""
    config = adapted_config("simplecil", kind="ssf")
    engine = make_engine(config, tmp_path / "run")
    engine.run()
    method = engine.method
    with torch.no_grad():
        for task in range(3):
            data = engine.context.tasks[task].train_eval
            features = method.first_session.encode(torch.stack([image for image, _ in data])).double().cpu()
            labels = torch.tensor([label for _, label in data])
            for label in engine.context.classes(task):
                torch.testing.assert_close(method.prototypes()[label], features[labels == label].mean(0),
                                           rtol=1e-4, atol=1e-5)


RESUMED = adapted_config(kind="adapter", epochs=3)  # the adapter has dropout: its masks must replay too


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight")
    return directory, run_fixture(RESUMED, directory)


@pytest.mark.parametrize("position", [Position(0, 0, 1), Position(1, 0, 0)], ids=["mid-adaptation", "between-tasks"])
def test_a_kill_during_or_after_the_adaptation_resumes_bit_identically(tmp_path, uninterrupted, position):
    straight_dir, straight = uninterrupted
    with pytest.raises(Crash):
        run_fixture(RESUMED, tmp_path / "crashed", after_epoch=crash_at(position))
    resumed = run_fixture(RESUMED, tmp_path / "crashed", resume=True)
    for name in straight:
        assert torch.equal(torch.as_tensor(straight[name].correct), torch.as_tensor(resumed[name].correct)), name
    first, second = (torch.load(directory / "checkpoints" / "task3.pt", weights_only=True)
                     for directory in (straight_dir, tmp_path / "crashed"))
    for key, value in first["method"]["adaptation"]["first_session"].items():
        assert torch.equal(value, second["method"]["adaptation"]["first_session"][key]), key
    assert torch.equal(first["method"]["readout"], second["method"]["readout"])
    for key in ("gram_upper", "targets"):
        assert torch.equal(first["ranpac_statistics"][key], second["ranpac_statistics"][key]), key


def test_without_a_first_session_the_run_is_the_frozen_feature_run(tmp_path):
    """``first_session none``: no training phase, nothing owned, the state as before, and every image through the
    backbone once (statistics and predictions from the cached frozen features)."""
    config = tiny_config("ranpac")
    assert config.settings.first_session == "none"
    engine = make_engine(config, tmp_path / "run")
    assert engine.method.first_session is None and engine.method.owned_modules() == {}
    assert [[p.name for p in engine.method.phases(task)] for task in range(3)] == [["statistics"]] * 3
    engine.run()
    assert set(engine.method.state_dict()) == {"readout", "projection_seed", "tasks"}
    tasks = make_tasks()
    assert engine.context.frozen_images_encoded == sum(len(t.train_eval) + len(t.test) for t in tasks)


def test_adapted_test_features_are_computed_once_per_image(tmp_path):
    engine = make_engine(adapted_config(kind="vpt_deep"), tmp_path / "run")
    engine.run()
    tests = sum(len(task.test) for task in make_tasks())
    assert engine.method.first_session.memo.images_encoded == tests  # 3 evaluations, each test image encoded once


@pytest.mark.parametrize("override, message", [
    ("ranpac.first_session=adaptor", "did you mean 'adapter'"),
    ("ranpac.adaptation.train.momentum=2", "ranpac.adaptation.train.momentum must be"),
    ("ranpac.adaptation.prompt_length=0", "ranpac.adaptation.prompt_length must be an integer >= 1"),
    ("simplecil.first_session=lora", "simplecil.first_session must be one of"),
])
def test_bad_first_session_settings_are_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"method={override.split('.')[0]}", override])


def test_a_checkpoint_of_another_first_session_setting_is_refused(tmp_path):
    engine = make_engine(tiny_config("ranpac"), tmp_path / "plain")
    state = engine.method.state_dict()
    adapted = make_engine(adapted_config(kind="ssf"), tmp_path / "adapted")
    with pytest.raises(ValueError, match="resume with the run's own ranpac.first_session"):
        adapted.method.load_state_dict(state)
    assert isinstance(adapted.method.owned_modules()["first_session"], nn.Module)
