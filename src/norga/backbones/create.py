"""`create_backbone`: a timm ViT plus weights from the hub, a local file in its original layout, or none."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from norga.assets import SHIPPED_SHA256, shipped_weights
from norga.backbones.checkpoints import read_checkpoint
from norga.backbones.errors import BackboneLoadError
from norga.backbones.hub import cache_only, hub_endpoint, network_state
from norga.backbones.matching import load_strict
from norga.backbones.registry import Pretraining, resolve_pretraining
from norga.storage import sha256_file


@dataclass
class BackboneRecord:
    """Where a backbone's weights came from and what the loader did with every key (stored with each run)."""

    name: str
    arch: str
    weights: str  # "none", "hub:<arch.tag>" or the file path
    sha256: str | None
    layout: str | None
    loaded_keys: int
    ignored_keys: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not loaded
    fresh_keys: dict[str, str] = field(default_factory=dict)  # model key -> why it keeps its initialisation
    resampled_keys: dict[str, str] = field(default_factory=dict)  # key -> "old shape -> new shape"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    input_size: tuple[int, int, int] = (3, 224, 224)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_ignored(self) -> int:
        return len(self.ignored_keys)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key in ("mean", "std", "input_size"):
            out[key] = list(out[key])
        out["num_ignored"] = self.num_ignored
        return out


def create_backbone(
    name: str,
    *,
    weights: str | Path = "hub",
    num_classes: int = 0,
    expected_sha256: str | None = None,
    **timm_kwargs: Any,
) -> tuple[nn.Module, BackboneRecord]:
    """Build backbone ``name`` (a registry entry such as ``sup21k`` or any timm model name) with its weights.

    ``weights``: ``"hub"`` (timm's pretrained weights; needs network or a filled cache), ``"none"`` (random
    init), ``"package"`` (weights shipped with norga, e.g. ``norga-vit-tiny-c10``) or the path of a checkpoint
    file in one of its original layouts, loaded with strict key matching.
    ``expected_sha256``: refuse a file whose checksum differs (corruption that still parses is otherwise
    undetectable; the checksum is always recorded).
    ``timm_kwargs`` are passed to ``timm.create_model`` on top of the entry's own (e.g. ``img_size``).
    """
    spec = resolve_pretraining(name)
    kwargs = {**spec.timm_kwargs, **timm_kwargs}
    if weights == "hub":
        model = _create_from_hub(spec, num_classes, kwargs)
        record = _record(spec, model, kwargs, weights=f"hub:{_hub_name(model, spec)}", loaded=len(model.state_dict()))
        return model, record
    if weights == "package":
        expected_sha256 = expected_sha256 or SHIPPED_SHA256.get(spec.name)
        weights = shipped_weights(spec.name)
        if weights is None:
            raise BackboneLoadError(f"the norga package ships no weights for '{name}'; use weights='hub', 'none' or a file")
    model = timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, **kwargs)
    if weights == "none":
        return model, _record(spec, model, kwargs, weights="none", loaded=0)
    path = Path(weights)
    checkpoint = read_checkpoint(path)
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise BackboneLoadError(
            f"backbone file {path} has SHA-256 {digest}, expected {expected_sha256}: corrupt or a different file; download it again"
        )
    result = load_strict(
        model, checkpoint.tensors, source=str(path), ignore=[*checkpoint.ignore, *spec.ignore], fresh=list(spec.fresh)
    )
    return model, _record(
        spec,
        model,
        kwargs,
        weights=str(path),
        sha256=digest,
        layout=checkpoint.layout,
        loaded=len(result.loaded),
        ignored={**checkpoint.ignored, **result.ignored},
        fresh=result.fresh,
        resampled=result.resampled,
    )


def _hub_name(model: nn.Module, spec: Pretraining) -> str:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return cfg.get("hf_hub_id") or cfg.get("url") or spec.arch


#: How a user gives norga a local weights file (CLI and Python).
PASS_FILE = "pass it with --set backbone.weights=FILE (weights=FILE in Python)"


def _create_from_hub(spec: Pretraining, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """timm's model with its hub weights; without network, from the local hub cache only (fails in seconds)."""
    where = (
        f"download {spec.source_url} ({spec.file_name}) on a machine with internet"
        if spec.source_url
        else f"save the weights of timm '{spec.arch}' on a machine with internet (e.g. as .safetensors)"
    )
    if not spec.hub:
        raise BackboneLoadError(f"backbone '{spec.name}' has no weights on the timm hub: {where} and {PASS_FILE}")
    state = network_state()
    try:
        with cache_only() if state == "unreachable" else nullcontext():
            return timm.create_model(spec.arch, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub/network/cache errors come in many types
        why = {
            "offline": "HF_HUB_OFFLINE is set and they are not in the local hub cache",
            "unreachable": f"the hub {hub_endpoint()} is unreachable (no network?) and they are not in the local hub "
                           "cache",
        }.get(state, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise BackboneLoadError(
            f"could not fetch pretrained weights of '{spec.name}' (timm '{spec.arch}') from the hub: {why}. "
            f"{where[0].upper()}{where[1:]} and {PASS_FILE}, or use --set backbone.weights=none (random weights)"
            + ("; once the weights are in the hub cache, HF_HUB_OFFLINE=1 skips the network check"
               if state == "unreachable" else "")
        ) from err


def _record(spec: Pretraining, model: nn.Module, kwargs: dict[str, Any], *, weights: str, loaded: int,
            sha256: str | None = None, layout: str | None = None, ignored: dict | None = None,
            fresh: dict | None = None, resampled: dict | None = None) -> BackboneRecord:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    img_size = tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else tuple(cfg.get("input_size", (3, 224, 224))[1:])
    return BackboneRecord(
        name=spec.name,
        arch=spec.arch,
        weights=weights,
        sha256=sha256,
        layout=layout,
        loaded_keys=loaded,
        ignored_keys=dict(ignored or {}),
        fresh_keys=dict(fresh or {}),
        resampled_keys=dict(resampled or {}),
        mean=tuple(spec.mean or cfg.get("mean", ())),
        std=tuple(spec.std or cfg.get("std", ())),
        input_size=(3, *img_size),
        timm_kwargs=dict(kwargs),
    )
