"""Load the task-identity model from checkpoints of the official code's first stage (``--train_inference_task_only``).

The official "original model" is a whole ViT whose head sees ``MlpMapping`` of the class token: its state dict
holds the frozen backbone (timm naming), the residual MLP as ``mlp.net.<layer>.<module>.*`` (each layer a
Sequential starting with its Linear: ``mlp.net.0.0`` is the first Linear, the middle layer's LayerNorm is
``mlp.net.<k//2>.2``), the MLP's outer LayerNorm ``mlp.norm.*`` (absent with MoCo v3's fc_norm, which is
``fc_norm.*`` then) and the ``head.*`` over all classes (NORGA_SPEC §1.7). Every key is accounted for: loaded into
the `TaskIdentityModel`, checked against the backbone, or on an explicit ignore list; anything else is an
error, and so is a key of the model that the file lacks. `load_official_task` loads both stages of a task.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor, nn

from norga.methods.hide.official_checkpoints import (
    PROMPT_KEY,
    OfficialCheckpointError,
    OfficialCheckpointReport,
    apply_copies,
    check_same_backbone,
    checked_copy,
    listed,
    load_official_checkpoint,
    official_task_checkpoints,
    read_official_payload,
)
from norga.methods.hide.task_identity import TaskIdentityModel
from norga.nn.prompted_vit import PromptedViT
from norga.nn.task_prompts import TaskPrompts
from norga.storage import sha256_file

#: Official first-stage keys with no effect on the task-identity model, and why (none known so far).
IGNORED_TII_KEYS: dict[str, str] = {}
#: The task-identity model's own keys in the official file (not the backbone's).
TII_PREFIXES = ("mlp.", "fc_norm.", "head.")
#: timm ViT backbone keys, accepted unchecked when no backbone is given.
VIT_KEY = re.compile(r"(cls_token|reg_token|pos_embed|patch_embed\.|blocks\.\d+\.|norm\.)")


def official_tii_names(tii: TaskIdentityModel) -> dict[str, Tensor]:
    """The official state-dict name of every tensor of `tii`."""
    names: dict[str, Tensor] = {}
    layer, position = -1, 0
    for module in tii.mapping.mlp:  # official: one Sequential per layer, each starting with its Linear
        if isinstance(module, nn.Linear):
            layer, position = layer + 1, 0
        for name, tensor in module.named_parameters(recurse=False):
            names[f"mlp.net.{layer}.{position}.{name}"] = tensor
        position += 1
    for prefix, module in (("mlp.norm", tii.mapping.norm), ("fc_norm", tii.fc_norm), ("head", tii.head)):
        names.update({f"{prefix}.{name}": tensor for name, tensor in module.named_parameters()})
    return names


def read_official_tii_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """`read_official_payload` of a file of the official task-identity stage (it holds the MLP, no prompts)."""
    state, args = read_official_payload(path)
    if PROMPT_KEY in state:
        raise OfficialCheckpointError(
            f"{path} holds '{PROMPT_KEY}': a checkpoint of the official prompt stage, not of the task-identity "
            "stage (load it with load_official_checkpoint)")
    if not any(key.startswith("mlp.") for key in state):
        raise OfficialCheckpointError(
            f"{path} has no residual MLP ('mlp.net.*'): not a checkpoint of the official task-identity stage")
    return state, args


def load_official_tii_checkpoint(
    tii: TaskIdentityModel, path: str | Path, backbone: nn.Module | None = None
) -> OfficialCheckpointReport:
    """Copy the residual MLP, fc_norm (MoCo v3) and head of an official first-stage checkpoint into `tii`, strictly.

    With `backbone` (the frozen ViT the task-identity model reads; its own head and fc_norm are not
    compared), every backbone key of the file must equal the backbone's and none may be missing; without,
    backbone-named keys are counted as unchecked. Everything is checked before anything is copied.
    """
    state, args = read_official_tii_checkpoint(path)
    targets = official_tii_names(tii)
    reference = None if backbone is None else {
        k: v for k, v in backbone.state_dict().items() if not k.startswith(TII_PREFIXES)}
    report = OfficialCheckpointReport(str(path), sha256_file(path), stage="task_identity")
    hidden = args.get("original_model_mlp_structure")
    fix = (f"build the task-identity model with mlp_hidden={list(hidden)} (the checkpoint's "
           "--original_model_mlp_structure) and the checkpoint's number of classes" if hidden is not None else
           "build the task-identity model with the checkpoint's mlp_hidden and number of classes")
    copies, unknown = [], []
    for key, value in state.items():
        if key in targets:
            copies.append(checked_copy(targets[key], value, key, fix))
            report.loaded.append(key)
        elif key in IGNORED_TII_KEYS:
            report.ignored.append(key)
        elif reference is not None and key in reference:
            check_same_backbone(reference[key], value, key, "or pass no backbone to load it unchecked")
            report.backbone_keys_checked += 1
        elif reference is None and VIT_KEY.match(key):
            report.backbone_keys_unchecked += 1
        else:
            unknown.append(key)
    missing = [key for key in targets if key not in state]
    if unknown or missing:
        raise OfficialCheckpointError(f"{path} does not fit this task-identity model: "
                                      f"{_mismatch(unknown, missing, isinstance(tii.fc_norm, nn.LayerNorm), fix)}")
    if reference is not None and (absent := [k for k in reference if k not in state]):
        raise OfficialCheckpointError(
            f"{path} lacks backbone keys {listed(absent)}: it was written for another backbone (or pass no backbone "
            "to load the task-identity model unchecked)")
    apply_copies(copies)
    return report


def _mismatch(unknown: list[str], missing: list[str], has_fc_norm: bool, fix: str) -> str:
    """What is wrong, and the fix: most often a MoCo v3 (fc_norm) file and a model without fc_norm, or back."""
    parts = [f"keys it has no place for: {listed(unknown)}"] if unknown else []
    parts += [f"keys it needs that the file lacks: {listed(missing)}"] if missing else []
    if not has_fc_norm and any(k.startswith("fc_norm.") for k in unknown):
        return "; ".join(parts) + "; the checkpoint has an fc_norm (MoCo v3 variant): build it with fc_norm=True"
    if has_fc_norm and any(k.startswith("mlp.norm.") for k in unknown):
        return "; ".join(parts) + "; the checkpoint has no fc_norm: build it with fc_norm=False"
    return "; ".join(parts) + f"; {fix}"


def load_official_task(model: PromptedViT, prompts: TaskPrompts, tii: TaskIdentityModel, tii_output_dir: str | Path,
                       prompt_output_dir: str | Path, task: int, *, check_backbone: bool = True
                       ) -> dict[str, OfficialCheckpointReport]:
    """Both official stages of task `task` (1-based) into a HiDe-Prompt / NoRGa model: the task-identity model
    from the first run's ``--output_dir``, prompts, gates, head (and fc_norm) from the second's; all or nothing."""
    files = official_task_checkpoints(tii_output_dir, prompt_output_dir, task)
    saved = {k: v.clone() for k, v in tii.state_dict().items()}
    reports = {"task_identity": load_official_tii_checkpoint(tii, files["task_identity"],
                                                             model.backbone if check_backbone else None)}
    try:
        reports["prompt"] = load_official_checkpoint(model, prompts, files["prompt"], check_backbone=check_backbone)
    except Exception:
        tii.load_state_dict(saved)
        raise
    return reports
