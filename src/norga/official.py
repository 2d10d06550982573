"""Load prompt pools, gate scalars and heads from checkpoints written by the official NoRGa / HiDe-Prompt code.

The official code saves ``{"model": state_dict, "optimizer": ..., "epoch": ..., "args": Namespace}``
with the prompt pool at ``e_prompt.prompt`` (L, 2, pool, Lp, H, d), the NoRGa scales at
``e_prompt.act_scale`` (L, 2, 1, 1; [l, 0] = τ inside σ, [l, 1] = α outside) and the ViT's own keys
(timm naming). Every key is accounted for: loaded, checked against our backbone, or on an explicit
ignore list; anything else is an error. Prompts trained by the official code used its prefix layout:
evaluate them with ``prefix_layout="official"`` to reproduce its numbers.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from norga.io_utils import sha256_file
from norga.nn.gates import NoRGaGate
from norga.nn.prompted_vit import PromptedViT
from norga.nn.task_prompts import TaskPrompts

PROMPT_KEY = "e_prompt.prompt"
GATE_KEY = "e_prompt.act_scale"
HEAD_PREFIX = "head."
#: Official keys with no effect on the model (the 5-datasets config creates an unused prompt key).
IGNORED_KEYS = ("e_prompt.prompt_key",)


class OfficialCheckpointError(ValueError):
    """An official checkpoint that does not fit the model it is loaded into."""


@dataclass
class OfficialCheckpointReport:
    """What `load_official_checkpoint` did with every key of the file."""

    path: str
    sha256: str
    loaded: list[str] = field(default_factory=list)
    backbone_keys_checked: int = 0
    ignored: list[str] = field(default_factory=list)
    official_gate_activation: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The model state dict and the argument namespace (as a dict; empty if absent) of an official file."""
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
    if not isinstance(state, dict) or PROMPT_KEY not in state:
        raise OfficialCheckpointError(
            f"{path} has no '{PROMPT_KEY}': not a checkpoint of the official NoRGa/HiDe-Prompt prompt stage "
            "(the task-identity stage's checkpoints hold no prompts)"
        )
    args = payload.get("args")
    return state, (vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}))


def load_official_checkpoint(
    model: PromptedViT, prompts: TaskPrompts, path: str | Path, *, check_backbone: bool = True
) -> OfficialCheckpointReport:
    """Copy prompts and gate scalars into `prompts` and the head into `model` from an official checkpoint, strictly."""
    state, args = read_official_checkpoint(path)
    report = OfficialCheckpointReport(str(path), sha256_file(path), official_gate_activation=args.get("gate_act"))
    _load_prompts(prompts, state[PROMPT_KEY])
    report.loaded.append(PROMPT_KEY)
    _load_gates(prompts, state.get(GATE_KEY), report.official_gate_activation)
    if GATE_KEY in state:
        report.loaded.append(GATE_KEY)

    backbone_state = model.backbone.state_dict()
    unknown = []
    for key, value in state.items():
        if key in (PROMPT_KEY, GATE_KEY):
            continue
        if key in IGNORED_KEYS:
            report.ignored.append(key)
        elif key.startswith(HEAD_PREFIX) and key in backbone_state:
            _copy_checked(backbone_state[key], value, key)
            report.loaded.append(key)
        elif key in backbone_state:
            if check_backbone:
                _check_same_backbone(backbone_state[key], value, key)
            report.backbone_keys_checked += 1
        else:
            unknown.append(key)
    if unknown:
        raise OfficialCheckpointError(
            f"{path} has keys this model has no place for: {sorted(unknown)[:20]}"
            f"{' ...' if len(unknown) > 20 else ''}; was it written for another architecture or method?"
        )
    return report


def _load_prompts(prompts: TaskPrompts, official: Tensor) -> None:
    target = prompts.pool.prompts
    if official.shape != target.shape:
        raise OfficialCheckpointError(
            f"'{PROMPT_KEY}' is shaped {tuple(official.shape)} (layers, 2, slots, length, heads, head_dim) but the "
            f"task prompts' pool is {tuple(target.shape)}: build them with num_slots={official.shape[2]}, "
            f"length={official.shape[3]} and {official.shape[0]} prompt layers"
        )
    prompts.pool.load_prompts(official)


def _load_gates(prompts: TaskPrompts, act_scale: Tensor | None, official_activation: str | None) -> None:
    norga_gates = [gate for gate in prompts.gates if isinstance(gate, NoRGaGate)]
    if act_scale is None:
        if norga_gates:
            raise OfficialCheckpointError(
                f"the checkpoint has no '{GATE_KEY}' (a HiDe-Prompt checkpoint): build the task prompts with gate='none'"
            )
        return
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
    with torch.no_grad():
        for gate, scales in zip(norga_gates, act_scale.reshape(-1, 2)):
            gate.tau.copy_(scales[0])
            gate.alpha.copy_(scales[1])


def _copy_checked(target: Tensor, value: Tensor, key: str) -> None:
    if target.shape != value.shape:
        raise OfficialCheckpointError(
            f"'{key}' is shaped {tuple(value.shape)} but the model's is {tuple(target.shape)}: "
            "build the model with the checkpoint's number of classes"
        )
    with torch.no_grad():
        target.copy_(value)


def _check_same_backbone(ours: Tensor, theirs: Tensor, key: str) -> None:
    if ours.shape != theirs.shape or not torch.equal(ours.to(theirs.dtype), theirs):
        diff = (ours.float() - theirs.float()).abs().max().item() if ours.shape == theirs.shape else "shape"
        raise OfficialCheckpointError(
            f"backbone weight '{key}' differs between the checkpoint and the model (max abs diff {diff}): "
            "build the model on the pre-trained weights the checkpoint was trained on, "
            "or pass check_backbone=False to load the prompts anyway"
        )
