"""Strict matching of checkpoint tensors (timm names) to a model's state dict.

Every model key must come from the checkpoint unless an explicit rule leaves it fresh (a new classifier,
MoCo's fc_norm); every checkpoint key must be loaded or dropped by an explicit rule with a reason.
Anything else is a `BackboneLoadError` listing the keys, never a silent partial load (NORGA_SPEC P12).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from norga.backbones.errors import BackboneLoadError
from norga.backbones.registry import Rule

#: The classifier is always allowed to start fresh: continual learning builds its own head.
FRESH_HEAD: Rule = (r"head\.(weight|bias)", "new classifier (not taken from the checkpoint)")
_LIST = 12


@dataclass
class MatchResult:
    """What happened to every key: loaded, ignored (with reason), left fresh (with reason), resampled."""

    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)
    resampled: dict[str, str] = field(default_factory=dict)


def _rule(key: str, rules: list[Rule]) -> str | None:
    return next((reason for pattern, reason in rules if re.fullmatch(pattern, key)), None)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _LIST else "")


def load_strict(
    model: nn.Module,
    tensors: dict[str, Tensor],
    *,
    source: str,
    ignore: list[Rule],
    fresh: list[Rule],
) -> MatchResult:
    """Load ``tensors`` into ``model`` exactly, or raise naming every offending key and the fix."""
    target = model.state_dict()
    result = MatchResult()
    to_load: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in tensors.items():
        if key in target and value.shape == target[key].shape:
            to_load[key] = value
        elif key in target and key == "pos_embed" and value.ndim == 3 and value.shape[-1] == target[key].shape[-1]:
            to_load[key] = _resample_pos_embed(model, value)
            result.resampled[key] = f"{tuple(value.shape)} -> {tuple(target[key].shape)}"
        elif re.fullmatch(FRESH_HEAD[0], key):
            have = tuple(target[key].shape) if key in target else "none (num_classes=0)"
            result.ignored[key] = f"classifier of the pre-training {tuple(value.shape)}; model head: {have}"
        elif (reason := _rule(key, ignore)) is not None:
            result.ignored[key] = reason
        elif key in target:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            unexpected.append(key)
    nonfinite = [k for k, v in to_load.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    missing = []
    for key in target:
        if key in to_load:
            continue
        reason = _rule(key, [FRESH_HEAD, *fresh])
        if reason is None:
            missing.append(key)
        else:
            result.fresh[key] = reason
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {len(mismatched)} key(s): {_listing(mismatched)}")
    if nonfinite:
        problems.append(f"NaN/Inf values (corrupt file?) in: {_listing(nonfinite)}")
    if missing:
        problems.append(f"{len(missing)} model key(s) missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint key(s) not used by the model: {_listing(unexpected)}")
    if problems:
        raise BackboneLoadError(
            f"backbone file {source} does not fit {type(model).__name__} "
            f"({len(to_load)} of {len(target)} model keys found): " + "; ".join(problems)
            + ". Check that the backbone name/architecture (depth, width, patch size) matches the file and that "
            "the file is one of the supported layouts; nothing was loaded."
        )
    with torch.no_grad():
        model.load_state_dict({**{k: target[k] for k in result.fresh}, **to_load}, strict=True)
    result.loaded = sorted(to_load)
    return result


def _resample_pos_embed(model: nn.Module, pos_embed: Tensor) -> Tensor:
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    grid = model.patch_embed.grid_size
    try:
        return resample_abs_pos_embed(pos_embed, new_size=list(grid), num_prefix_tokens=prefix)
    except Exception as err:  # noqa: BLE001 - a non-square or inconsistent table
        raise BackboneLoadError(f"cannot resample pos_embed {tuple(pos_embed.shape)} to grid {grid}: {err}") from err
