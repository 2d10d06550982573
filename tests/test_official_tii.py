"""The official first stage's checkpoints (the task-identity "original model") into norga's TaskIdentityModel, and
both stages' files of a task found by the official output layout."""

import pytest
import torch
from official_fixtures import (
    CLASSES,
    WIDTH,
    assert_matches_reference,
    backbone_keys,
    official_backbone,
    official_mlp_keys,
    reference_tii_logits,
    save_prompt_stage,
    save_tii_stage,
)

from norga.methods.hide.official_checkpoints import OfficialCheckpointError, official_task_checkpoints
from norga.methods.hide.official_tii import load_official_task, load_official_tii_checkpoint
from norga.methods.hide.task_identity import TaskIdentityModel
from norga.nn import PromptedViT, TaskPrompts

#: CIFAR / ImageNet-R / CUB ([2]), 5-datasets ([4, 4]: a middle LayerNorm), MoCo v3 (fc_norm instead of mlp.norm)
VARIANTS = [([2], False), ([4, 4], False), ([2], True)]


def write_tii(path, hidden=(2,), fc_norm=False, backbone_seed=0, extra=None, drop=()):
    state = {**backbone_keys(official_backbone(backbone_seed, fc_norm)), **official_mlp_keys(list(hidden), fc_norm)}
    state.update(extra or {})
    for key in drop:
        state.pop(key)
    save_tii_stage(path, state, list(hidden))
    return state


@pytest.mark.parametrize(("hidden", "fc_norm"), VARIANTS)
def test_loaded_model_computes_what_the_official_weights_define(tmp_path, hidden, fc_norm):
    path = tmp_path / "checkpoint" / "task3_checkpoint.pth"
    state = write_tii(path, hidden, fc_norm)
    assert all(v.dtype == torch.float32 for v in state.values())
    tii = TaskIdentityModel(WIDTH, CLASSES, hidden, fc_norm=fc_norm).eval()
    backbone = official_backbone(0, fc_norm)
    report = load_official_tii_checkpoint(tii, path, backbone=backbone)
    mine = {k for k in state if k.startswith(("mlp.", "fc_norm.", "head."))}
    assert set(report.loaded) == mine and report.stage == "task_identity"
    assert report.backbone_keys_checked == len(state) - len(mine) and not report.ignored
    features = 3 * torch.randn(16, WIDTH)  # fresh frozen features (un-normalised class tokens with fc_norm)
    with torch.no_grad():
        assert_matches_reference(tii(features), reference_tii_logits(state, features, hidden))


def test_without_a_backbone_its_keys_are_counted_unchecked(tmp_path):
    path = tmp_path / "tii.pth"
    state = write_tii(path)
    report = load_official_tii_checkpoint(TaskIdentityModel(WIDTH, CLASSES, [2]), path)
    assert report.backbone_keys_unchecked == len(backbone_keys(official_backbone())) and report.backbone_keys_checked == 0
    assert len(report.loaded) + report.backbone_keys_unchecked == len(state)


def load_fails(path, match, tii=None, **kwargs):
    tii = tii or TaskIdentityModel(WIDTH, CLASSES, [2])
    before = {k: v.clone() for k, v in tii.state_dict().items()}
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official_tii_checkpoint(tii, path, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in tii.state_dict().items())  # nothing half-loaded


def test_unknown_missing_and_misshaped_keys_are_refused_by_name(tmp_path):
    unknown = tmp_path / "unknown.pth"
    write_tii(unknown, extra={"mlp.net.2.0.weight": torch.randn(WIDTH, WIDTH)})
    load_fails(unknown, r"no place for: \['mlp.net.2.0.weight'\]")

    missing = tmp_path / "missing.pth"
    write_tii(missing, drop=("head.bias",))
    load_fails(missing, r"file lacks: \['head.bias'\]")

    shaped = tmp_path / "shaped.pth"
    write_tii(shaped, hidden=[4, 4])
    load_fails(shaped, r"'mlp.net.0.0.weight' is shaped \(768, 192\) but the model's is \(384, 192\): build the "
                       r"task-identity model with mlp_hidden=\[4, 4\]")
    load_fails(tmp_path / "unknown.pth", r"'head.weight' is shaped \(5, 192\) but the model's is \(7, 192\)",
               TaskIdentityModel(WIDTH, 7, [2]))


def test_fc_norm_variants_and_other_files_are_refused_with_the_fix(tmp_path):
    moco = tmp_path / "moco.pth"
    write_tii(moco, fc_norm=True)
    load_fails(moco, "has an fc_norm .MoCo v3 variant.: build it with fc_norm=True")
    plain = tmp_path / "plain.pth"
    write_tii(plain)
    load_fails(plain, "has no fc_norm: build it with fc_norm=False", TaskIdentityModel(WIDTH, CLASSES, [2], fc_norm=True))

    load_fails(plain, "backbone weight 'cls_token' differs.*pass no backbone", backbone=official_backbone(seed=1))
    partial = tmp_path / "partial.pth"
    write_tii(partial, drop=("blocks.2.mlp.fc2.bias",))
    load_fails(partial, r"lacks backbone keys \['blocks.2.mlp.fc2.bias'\]", backbone=official_backbone())

    prompts = tmp_path / "prompt_stage.pth"
    save_prompt_stage(prompts, {**backbone_keys(official_backbone()), "e_prompt.prompt": torch.zeros(2, 2, 3, 4, 3, 64)},
                      gate_act="tanh")
    load_fails(prompts, "official prompt stage, not of the task-identity stage")


def official_run(root, stage, tasks):
    for task in tasks:
        path = root / "checkpoint" / f"task{task}_checkpoint.pth"
        if stage == "tii":
            write_tii(path)
        else:
            save_prompt_stage(path, {"e_prompt.prompt": torch.zeros(1)}, gate_act="tanh")


def test_both_stages_files_of_a_task_by_the_official_layout(tmp_path):
    tii_dir, prompt_dir = tmp_path / "NoRGa_cifar100_covariance_mlp_2_seed42", tmp_path / "NoRGa_cifar100_pe_seed42"
    official_run(tii_dir, "tii", [1, 2, 3])
    official_run(prompt_dir, "prompt", [1, 2])
    files = official_task_checkpoints(tii_dir, prompt_dir, 2)
    assert files == {"task_identity": tii_dir / "checkpoint" / "task2_checkpoint.pth",
                     "prompt": prompt_dir / "checkpoint" / "task2_checkpoint.pth"}
    load_official_tii_checkpoint(TaskIdentityModel(WIDTH, CLASSES, [2]), files["task_identity"])
    with pytest.raises(OfficialCheckpointError, match=r"no prompt checkpoint of task 3: .*task3_checkpoint.pth does "
                                                      r"not exist \(it holds tasks \[1, 2\]\)"):
        official_task_checkpoints(tii_dir, prompt_dir, 3)
    with pytest.raises(OfficialCheckpointError, match=r"no task-identity checkpoint of task 4: .*\(it holds tasks "
                                                      r"\[1, 2, 3\]\); pass the --output_dir of the official "
                                                      r"task-identity run"):
        official_task_checkpoints(tii_dir, prompt_dir, 4)
    with pytest.raises(OfficialCheckpointError, match="holds no official checkpoints"):
        official_task_checkpoints(tmp_path / "elsewhere", prompt_dir, 1)
    with pytest.raises(ValueError, match="start at 1"):
        official_task_checkpoints(tii_dir, prompt_dir, 0)


def test_both_stages_of_a_task_load_into_a_norga_model_all_or_nothing(tmp_path):
    tii_dir, prompt_dir = tmp_path / "tii_run", tmp_path / "prompt_run"
    tii_state = write_tii(tii_dir / "checkpoint" / "task2_checkpoint.pth")
    prompt_state = {**backbone_keys(official_backbone()), "head.weight": torch.randn(CLASSES, WIDTH),
                    "head.bias": torch.randn(CLASSES), "e_prompt.prompt": torch.randn(2, 2, 3, 4, 3, 64),
                    "e_prompt.act_scale": torch.rand(2, 2, 1, 1)}
    save_prompt_stage(prompt_dir / "checkpoint" / "task2_checkpoint.pth", prompt_state, gate_act="tanh")
    host = PromptedViT(official_backbone(), num_classes=CLASSES).eval()
    prompts = TaskPrompts(host, 3, 4, [0, 1], gate="tanh")
    tii = TaskIdentityModel(WIDTH, CLASSES, [2])
    reports = load_official_task(host, prompts, tii, tii_dir, prompt_dir, 2)
    assert reports["task_identity"].stage == "task_identity" and reports["prompt"].stage == "prompt"
    assert torch.equal(tii.head.weight, tii_state["head.weight"])
    assert torch.equal(prompts.pool.prompts, prompt_state["e_prompt.prompt"])

    save_prompt_stage(prompt_dir / "checkpoint" / "task2_checkpoint.pth", {**prompt_state, "g_prompt": torch.zeros(1)},
                      gate_act="tanh")
    fresh = TaskIdentityModel(WIDTH, CLASSES, [2])
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(OfficialCheckpointError, match=r"no place for: \['g_prompt'\]"):
        load_official_task(host, prompts, fresh, tii_dir, prompt_dir, 2)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
