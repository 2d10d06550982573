"""Load prompt pools, gate scalars and heads from checkpoints written by the official NoRGa / HiDe-Prompt code.

The official code saves ``{"model": state_dict, "optimizer": ..., "epoch": ..., "args": Namespace}``
with the prompt pool at ``e_prompt.prompt`` (L, 2, pool, Lp, H, d), the NoRGa scales at
``e_prompt.act_scale`` (L, 2, 1, 1; [l, 0] = τ inside σ, [l, 1] = α outside) and the ViT's own keys
(timm naming): the trained ``head`` and (MoCo v3) ``fc_norm`` are loaded, the frozen ones checked. Every key
is accounted for: loaded, checked against our backbone, or on an explicit ignore list; anything else is an
error, and so is a key the model needs that the file lacks. Prompts trained by the official code used its
prefix layout: evaluate them with ``prefix_layout="official"`` to reproduce its numbers. The first stage's
files (the task-identity model) load with `norga.methods.hide.official_tii.load_official_tii_checkpoint`; both stages'
files of one task are found by `official_task_checkpoints`.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from norga.nn.gates import NoRGaGate
from norga.nn.prompted_vit import PromptedViT
from norga.nn.task_prompts import TaskPrompts
from norga.storage import sha256_file

PROMPT_KEY = "e_prompt.prompt"
GATE_KEY = "e_prompt.act_scale"
#: Model keys the official code trains with the prompts: loaded, never compared with the pre-trained weights.
TRAINED_PREFIXES = ("head.", "fc_norm.")
#: Official keys with no effect on the model, and why.
IGNORED_KEYS = {"e_prompt.prompt_key": "unused prompt key the 5-datasets config creates (no effect on the model)"}
#: Where the official scripts write the checkpoint of task k (1-based) under their --output_dir, both stages.
OFFICIAL_CHECKPOINT = "checkpoint/task{}_checkpoint.pth"


class OfficialCheckpointError(ValueError):
    """An official checkpoint that does not fit the model it is loaded into."""


@dataclass
class OfficialCheckpointReport:
    """What `load_official_checkpoint` did with every key of the file."""

    path: str
    sha256: str
    stage: str = "prompt"  # or "task_identity" (the official first stage, `load_official_tii_checkpoint`)
    loaded: list[str] = field(default_factory=list)
    backbone_keys_checked: int = 0
    backbone_keys_unchecked: int = 0  # task-identity files loaded without a backbone to check them against
    ignored: list[str] = field(default_factory=list)
    official_gate_activation: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def read_official_payload(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The model state dict and the argument namespace (as a dict; empty if absent) of an official file, safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise OfficialCheckpointError(f"cannot read {path} as a torch checkpoint: {error}") from error
    if not isinstance(payload, dict):
        raise OfficialCheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    state = payload.get("model", payload)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{path} has no model state dict of tensors (key 'model')")
    args = payload.get("args")
    return state, (vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}))


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """`read_official_payload` of a file of the official prompt stage (it holds the prompt pool)."""
    state, args = read_official_payload(path)
    if PROMPT_KEY not in state:
        raise OfficialCheckpointError(
            f"{path} has no '{PROMPT_KEY}': not a checkpoint of the official NoRGa/HiDe-Prompt prompt stage "
            "(the task-identity stage's checkpoints hold no prompts: load them with load_official_tii_checkpoint)"
        )
    return state, args


def load_official_checkpoint(
    model: PromptedViT, prompts: TaskPrompts, path: str | Path, *, check_backbone: bool = True
) -> OfficialCheckpointReport:
    """Copy prompts and gate scalars into `prompts` and the head (and fc_norm) into `model` from an official
    checkpoint, strictly: everything is checked before anything is copied."""
    state, args = read_official_checkpoint(path)
    report = OfficialCheckpointReport(str(path), sha256_file(path), official_gate_activation=args.get("gate_act"))
    copies = [*_prompt_copies(prompts, state[PROMPT_KEY]),
              *_gate_copies(prompts, state.get(GATE_KEY), report.official_gate_activation)]
    report.loaded += [key for key in (PROMPT_KEY, GATE_KEY) if key in state]

    backbone_state = model.backbone.state_dict()
    unknown = []
    for key, value in state.items():
        if key in (PROMPT_KEY, GATE_KEY):
            continue
        if key in IGNORED_KEYS:
            report.ignored.append(key)
        elif key.startswith(TRAINED_PREFIXES) and key in backbone_state:
            copies.append(checked_copy(backbone_state[key], value, key,
                                       "build the model with the checkpoint's number of classes"))
            report.loaded.append(key)
        elif key in backbone_state:
            if check_backbone:
                check_same_backbone(backbone_state[key], value, key)
            report.backbone_keys_checked += 1
        else:
            unknown.append(key)
    trained_missing = [k for k in backbone_state if k.startswith(TRAINED_PREFIXES) and k not in state]
    if any(k.startswith("fc_norm.") for k in trained_missing):
        raise OfficialCheckpointError(
            f"{path} has no trained fc_norm but the model has one ({listed(trained_missing)} missing): build the "
            "model on a backbone without fc_norm, as the checkpoint's")
    if unknown:
        hint = ("the checkpoint has a trained fc_norm (MoCo v3 variant): build the backbone with one, e.g. 'mocov3'"
                if any(k.startswith("fc_norm.") for k in unknown) else
                "was it written for another architecture or method?")
        raise OfficialCheckpointError(f"{path} has keys this model has no place for: {listed(unknown)}; {hint}")
    if trained_missing:
        raise OfficialCheckpointError(f"{path} lacks the trained weights {listed(trained_missing)}: not a complete "
                                      "official checkpoint of the prompt stage")
    frozen_missing = [k for k in backbone_state if check_backbone and k not in state]
    if frozen_missing:
        raise OfficialCheckpointError(
            f"{path} lacks backbone keys {listed(frozen_missing)} to check the model's against: was it written for "
            "another architecture? Pass check_backbone=False to load the prompts anyway")
    apply_copies(copies)
    return report


def apply_copies(copies: list[tuple[Tensor, Tensor]]) -> None:
    """Copy each value into its target in place (after every check passed)."""
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)


def listed(keys: list[str], limit: int = 20) -> str:
    """Sorted keys for an error message, at most `limit` of them."""
    return f"{sorted(keys)[:limit]}{' ...' if len(keys) > limit else ''}"


def official_task_checkpoints(tii_output_dir: str | Path, prompt_output_dir: str | Path, task: int) -> dict[str, Path]:
    """The checkpoint files of task `task` (1-based, as the official names) of both official stages: the
    task-identity run's (``--train_inference_task_only``; the prompt run's ``--trained_original_model``) and the
    prompt run's, both ``<output_dir>/checkpoint/task<task>_checkpoint.pth``. Keys "task_identity", "prompt"."""
    if isinstance(task, bool) or not isinstance(task, int) or task < 1:
        raise ValueError(f"task numbers of official checkpoints start at 1, got {task!r}")
    found = {}
    for stage, directory in (("task_identity", Path(tii_output_dir)), ("prompt", Path(prompt_output_dir))):
        path = directory / OFFICIAL_CHECKPOINT.format(task)
        if not path.is_file():
            present = official_tasks(directory)
            holds = f"it holds tasks {present}" if present else "it holds no official checkpoints"
            raise OfficialCheckpointError(
                f"no {stage.replace('_', '-')} checkpoint of task {task}: {path} does not exist ({holds}); "
                f"pass the --output_dir of the official {stage.replace('_', '-')} run")
        found[stage] = path
    return found


def official_tasks(directory: str | Path) -> list[int]:
    """The task numbers (1-based) the official run in `directory` (its ``--output_dir``) wrote checkpoints of."""
    pattern = OFFICIAL_CHECKPOINT.split("/")[-1].replace("{}", r"(\d+)").replace(".", r"\.")
    return sorted(int(m.group(1)) for f in (Path(directory) / "checkpoint").glob("task*_checkpoint.pth")
                  if (m := re.fullmatch(pattern, f.name)))


def _prompt_copies(prompts: TaskPrompts, official: Tensor) -> list[tuple[Tensor, Tensor]]:
    target = prompts.pool.prompts
    if official.shape != target.shape:
        raise OfficialCheckpointError(
            f"'{PROMPT_KEY}' is shaped {tuple(official.shape)} (layers, 2, slots, length, heads, head_dim) but the "
            f"task prompts' pool is {tuple(target.shape)}: build them with num_slots={official.shape[2]}, "
            f"length={official.shape[3]} and {official.shape[0]} prompt layers"
        )
    # the pool keeps one parameter per slot (shaped layers, 2, length, heads, head_dim)
    return [(slot, official[:, :, index]) for index, slot in enumerate(prompts.pool.slots)]


def _gate_copies(prompts: TaskPrompts, act_scale: Tensor | None,
                 official_activation: str | None) -> list[tuple[Tensor, Tensor]]:
    norga_gates = [gate for gate in prompts.gates if isinstance(gate, NoRGaGate)]
    if act_scale is None:
        if norga_gates:
            raise OfficialCheckpointError(
                f"the checkpoint has no '{GATE_KEY}' (a HiDe-Prompt checkpoint): build the task prompts with gate='none'"
            )
        return []
    if not norga_gates:
        hint = official_activation or "the activation it was trained with"
        raise OfficialCheckpointError(
            f"the checkpoint has NoRGa gate scalars '{GATE_KEY}' but the model has no NoRGa gate: build it with gate={hint!r}"
        )
    if act_scale.shape != (len(norga_gates), 2, 1, 1):
        raise OfficialCheckpointError(
            f"'{GATE_KEY}' is shaped {tuple(act_scale.shape)}, expected ({len(norga_gates)}, 2, 1, 1)"
        )
    activation = norga_gates[0].activation
    if official_activation is not None and official_activation.lower() != activation:
        raise OfficialCheckpointError(
            f"the checkpoint was trained with gate activation {official_activation!r} but the model uses "
            f"{activation!r}: build it with gate={official_activation.lower()!r}"
        )
    scales = act_scale.reshape(-1, 2)
    return [pair for gate, (tau, alpha) in zip(norga_gates, scales)
            for pair in ((gate.tau, tau.reshape(gate.tau.shape)), (gate.alpha, alpha.reshape(gate.alpha.shape)))]


def checked_copy(target: Tensor, value: Tensor, key: str, fix: str) -> tuple[Tensor, Tensor]:
    """(`target`, `value`) for `apply_copies`, refusing another shape (`fix` says how to build a model that fits)."""
    if target.shape != value.shape:
        raise OfficialCheckpointError(
            f"'{key}' is shaped {tuple(value.shape)} but the model's is {tuple(target.shape)}: {fix}")
    if not value.is_floating_point():
        raise OfficialCheckpointError(f"'{key}' holds {value.dtype} values, not floating point weights")
    return target, value


def check_same_backbone(ours: Tensor, theirs: Tensor, key: str,
                        fix: str = "or pass check_backbone=False to load the prompts anyway") -> None:
    """Refuse a frozen backbone weight of the file that differs from the model's (`fix`: the way out)."""
    if ours.shape != theirs.shape or not torch.equal(ours.to(theirs.dtype), theirs):
        diff = (ours.float() - theirs.float()).abs().max().item() if ours.shape == theirs.shape else "shape"
        raise OfficialCheckpointError(
            f"backbone weight '{key}' differs between the checkpoint and the model (max abs diff {diff}): "
            f"build the model on the pre-trained weights the checkpoint was trained on, {fix}"
        )
