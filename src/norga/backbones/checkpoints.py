"""Read a checkpoint file in its original layout and name its tensors the timm way.

Supported files: ``.npz`` (Google's original JAX ViT), ``.safetensors`` (timm layout), and torch pickles
``.pth`` / ``.pth.tar`` / ``.pt`` / ``.bin`` (always ``weights_only=True``) in these layouts:

* ``teacher``: iBOT / DINO training checkpoint, ``{"teacher": {"backbone.*", "head.*"}, ...}``
* ``moco_raw``: MoCo v3 repository, ``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*",
  "module.predictor.*"}}``
* ``state_dict``: ``{"state_dict": timm-layout}`` (iBOT ``checkpoint_teacher.pth``)
* ``model``: ``{"model": timm-layout}`` (HiDe-Prompt's MoCo v3 file, timm training checkpoints)
* ``raw``: a plain timm-layout state dict (DINO)

Each layout comes with its explicit list of keys that are knowingly not loaded (projection heads,
momentum encoder...); every other key must match the model (see ``norga.backbones.matching``).
"""

from __future__ import annotations

import argparse
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from norga.backbones.errors import BackboneLoadError
from norga.backbones.registry import Rule

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar", ".bin", ".ckpt")
SUFFIXES = (".npz", ".safetensors") + TORCH_SUFFIXES

# Checkpoint keys (after renaming to timm) that SSL checkpoints carry and a ViT backbone never uses.
_SSL_HEAD = (r"head\.(mlp|mlp2|last_layer|last_layer2|last_norm|last_norm2)\b.*", "iBOT/DINO projection head")
_IBOT_MASK = (r"masked_embed", "iBOT masked-image-modelling mask token (training only)")
_NPZ_PRE_LOGITS = (r"pre_logits/(kernel|bias)", "pre-logits layer of the original ViT (dropped, as in timm)")


@dataclass
class Checkpoint:
    """Tensors of a checkpoint, named as timm names them where the layout allows."""

    tensors: dict[str, Tensor]
    layout: str
    ignore: list[Rule] = field(default_factory=list)  # layout-specific keys knowingly not loaded
    ignored: dict[str, str] = field(default_factory=dict)  # keys already dropped while unwrapping -> reason


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``path`` by its extension; any unreadable or unrecognised file raises `BackboneLoadError`."""
    path = Path(path)
    if not path.is_file():
        raise BackboneLoadError(f"backbone file {path} does not exist")
    name = path.name.lower()
    if name.endswith(".npz"):
        return _read_npz(path)
    if name.endswith(".safetensors"):
        return Checkpoint(_read_safetensors(path), "safetensors")
    if name.endswith(TORCH_SUFFIXES):
        return unwrap_torch_object(_torch_load(path), path)
    raise BackboneLoadError(f"backbone file {path}: unsupported extension; expected one of {', '.join(SUFFIXES)}")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BackboneLoadError(f"backbone file {path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        message = str(err)
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if blocked:
            raise BackboneLoadError(
                f"backbone file {path} pickles {blocked.group(1)}, not only tensors and argparse.Namespace; "
                "norga only loads with weights_only=True: re-save its state dict (torch.save(sd, ...)) "
                "or convert it to .safetensors on a machine where you trust the file"
            ) from err
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", message)
        text = detail.group(1).strip() if detail else (message.splitlines()[0] if message else type(err).__name__)
        raise BackboneLoadError(
            f"backbone file {path} is not a readable PyTorch checkpoint (truncated or corrupt?): {text}"
        ) from err


def _only_tensors(obj: object) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip_common(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def unwrap_torch_object(obj: object, path: Path | str) -> Checkpoint:
    """Find the backbone state dict in a loaded torch checkpoint and detect its layout."""
    if not isinstance(obj, dict):
        raise BackboneLoadError(f"backbone file {path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if isinstance(obj.get("teacher"), dict):
        sd = _strip_common(obj["teacher"], "module.")
        tensors = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        ignored = {k: "projection head of the self-supervised teacher" for k in sd if k.startswith("head.")}
        rest = {k: v for k, v in sd.items() if not k.startswith(("backbone.", "head."))}
        if not tensors:
            raise BackboneLoadError(f"backbone file {path}: 'teacher' has no 'backbone.*' keys (found {_some(sd)})")
        return Checkpoint({**tensors, **rest}, "teacher", [_IBOT_MASK], ignored)
    for container in ("state_dict", "model"):
        if isinstance(obj.get(container), dict):
            sd = obj[container]
            if any(k.startswith("module.base_encoder.") for k in sd):
                return _unwrap_moco(sd)
            for prefix in ("module.", "backbone."):
                sd = _strip_common(sd, prefix)
            return Checkpoint(dict(sd), container, [_IBOT_MASK, _SSL_HEAD])
    if _only_tensors(obj):
        if any(k.startswith("module.base_encoder.") for k in obj):
            return _unwrap_moco(obj)
        sd = obj
        for prefix in ("module.", "backbone."):
            sd = _strip_common(sd, prefix)
        return Checkpoint(dict(sd), "raw", [_IBOT_MASK, _SSL_HEAD])
    raise BackboneLoadError(
        f"backbone file {path}: no state dict found (top-level keys: {_some(obj)}); expected a dict with "
        "'teacher' (iBOT/DINO), 'state_dict' (iBOT, MoCo v3) or 'model' (timm layout), or a plain state dict"
    )


def _unwrap_moco(sd: dict[str, Tensor]) -> Checkpoint:
    base = "module.base_encoder."
    tensors, ignored = {}, {}
    for key, value in sd.items():
        if key.startswith(base):
            tensors[key[len(base):]] = value
        elif key.startswith("module.momentum_encoder."):
            ignored[key] = "MoCo v3 momentum encoder"
        elif key.startswith("module.predictor."):
            ignored[key] = "MoCo v3 predictor"
        else:
            tensors[key] = value  # left under its own name: reported as unexpected
    return Checkpoint(tensors, "moco_raw", [(r"head\.\d+\..*", "MoCo v3 projection MLP of the base encoder")], ignored)


def _some(keys: object, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(map(str, keys[:n])) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# --- original Google JAX ViT .npz -------------------------------------------------------------------

_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)")
_BLOCK_DIRECT = {
    "LayerNorm_0/scale": "norm1.weight",
    "LayerNorm_0/bias": "norm1.bias",
    "LayerNorm_2/scale": "norm2.weight",
    "LayerNorm_2/bias": "norm2.bias",
    "MultiHeadDotProductAttention_1/out/bias": "attn.proj.bias",
    "MlpBlock_3/Dense_0/bias": "mlp.fc1.bias",
    "MlpBlock_3/Dense_1/bias": "mlp.fc2.bias",
}
_TOP_DIRECT = {
    "embedding/bias": "patch_embed.proj.bias",
    "cls": "cls_token",
    "Transformer/posembed_input/pos_embedding": "pos_embed",
    "Transformer/encoder_norm/scale": "norm.weight",
    "Transformer/encoder_norm/bias": "norm.bias",
    "head/bias": "head.bias",
}


def _read_npz(path: Path) -> Checkpoint:
    from timm.models._helpers import _load_npz_checkpoint

    try:
        archive = _load_npz_checkpoint(
            str(path), required_any=("embedding/kernel", "opt/target/embedding/kernel", "params/embedding/kernel"),
            context="norga backbone",
        )
    except Exception as err:  # noqa: BLE001 - numpy/zipfile raise many types for corrupt archives
        if "did not find a supported" in str(err):
            raise BackboneLoadError(
                f"backbone file {path} is a .npz without 'embedding/kernel': not an original Google ViT checkpoint"
            ) from err
        raise BackboneLoadError(
            f"backbone file {path} is not a readable .npz archive (truncated or corrupt?): {err}"
        ) from err
    try:
        with archive:
            arrays = {k: np.asarray(archive[k]) for k in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise BackboneLoadError(f"backbone file {path}: corrupt .npz member ({err}); download it again") from err
    if any(k.startswith("params/") for k in arrays):
        raise BackboneLoadError(
            f"backbone file {path} is a big_vision checkpoint; only the original ViT .npz layout is supported"
        )
    arrays = {k.removeprefix("opt/target/"): v for k, v in arrays.items()}
    return Checkpoint(jax_vit_to_timm(arrays, path), "npz", [_NPZ_PRE_LOGITS])


def jax_vit_to_timm(arrays: dict[str, np.ndarray], path: Path | str = "<npz>") -> dict[str, Tensor]:
    """Rename and transpose original JAX ViT arrays to timm keys (same maths as timm's ``_load_weights``).

    Keys that are not part of the original ViT layout keep their npz name, so strict matching reports them.
    """
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, a in arrays.items():
        block = _BLOCK.fullmatch(key)
        if block:
            i, sub = block.groups()
            pre = f"blocks.{i}."
            if sub in _BLOCK_DIRECT:
                out[pre + _BLOCK_DIRECT[sub]] = t(a)
            elif sub.startswith("MultiHeadDotProductAttention_1/") and sub.split("/")[1] in ("query", "key", "value"):
                qkv.setdefault(i, {})["/".join(sub.split("/")[1:])] = a
            elif sub == "MultiHeadDotProductAttention_1/out/kernel":  # (H, d, D) -> (D, H*d)
                out[pre + "attn.proj.weight"] = t(a.transpose(2, 0, 1).reshape(a.shape[2], -1))
            elif sub in ("MlpBlock_3/Dense_0/kernel", "MlpBlock_3/Dense_1/kernel"):
                dense = int(sub.split("/")[1].removeprefix("Dense_"))
                out[pre + f"mlp.fc{dense + 1}.weight"] = t(a.T)
            else:
                out[key] = t(a)
        elif key in _TOP_DIRECT:
            out[_TOP_DIRECT[key]] = t(a)
        elif key == "embedding/kernel":  # (p, p, C, D) -> (D, C, p, p)
            out["patch_embed.proj.weight"] = t(a.transpose(3, 2, 0, 1))
        elif key == "head/kernel":
            out["head.weight"] = t(a.T)
        else:
            out[key] = t(a)
    for i, parts in qkv.items():
        need = [f"{n}/{p}" for p in ("kernel", "bias") for n in ("query", "key", "value")]
        missing = [n for n in need if n not in parts]
        if missing:
            raise BackboneLoadError(f"backbone file {path}: encoderblock_{i} attention lacks {missing}")
        # query/key/value kernels (D, H, d) -> rows of qkv.weight (3*H*d, D); biases (H, d) -> flat.
        kernels = [parts[f"{n}/kernel"] for n in ("query", "key", "value")]
        biases = [parts[f"{n}/bias"] for n in ("query", "key", "value")]
        out[f"blocks.{i}.attn.qkv.weight"] = t(np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels]))
        out[f"blocks.{i}.attn.qkv.bias"] = t(np.concatenate([b.reshape(-1) for b in biases]))
    return out
