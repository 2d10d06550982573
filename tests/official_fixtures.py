"""Checkpoints as the official code writes them (both stages) and slow, obvious reference forwards of what their
raw tensors define (float64, written out from NORGA_SPEC §1.1-1.7, not from norga's modules)."""

from __future__ import annotations

import argparse
import math

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

ARCH = dict(img_size=32, patch_size=8, depth=3)  # vit_tiny: width 192, 3 heads of 64
WIDTH, HEADS, CLASSES = 192, 3, 5
#: fp32 against the float64 reference: sums of at most `4 * 4 * WIDTH` products (the widest layer), each
#: rounding within 2**-24 relative; bound the error by that many roundings of the largest value.
FP32_TOLERANCE = 16 * WIDTH * 2.0 ** -24


def official_backbone(seed: int = 0, fc_norm: bool = False) -> torch.nn.Module:
    """The pre-trained ViT both stages build on (the same one for a seed); fc_norm: the MoCo v3 variant."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, fc_norm=fc_norm, **ARCH).eval()


def backbone_keys(backbone: torch.nn.Module) -> dict[str, Tensor]:
    """The frozen backbone's keys as the official state dict holds them (no head, no fc_norm: those train)."""
    return {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith(("head.", "fc_norm."))}


def trained_norm(prefix: str, width: int) -> dict[str, Tensor]:
    return {f"{prefix}.weight": 1 + 0.2 * torch.randn(width), f"{prefix}.bias": 0.2 * torch.randn(width)}


def official_mlp_keys(hidden: list[int], fc_norm: bool, num_classes: int = CLASSES) -> dict[str, Tensor]:
    """MlpMapping(dim, hidden) + fc_norm + head of the official original model, by the official layer layout:
    ``net.i`` = Sequential(Linear, GELU, Dropout) except the middle one (i = k//2, 0 < i < k: Linear, Dropout,
    LayerNorm) and the last (Linear, Dropout); ``mlp.norm`` unless fc_norm."""
    widths, k = [WIDTH, *(WIDTH * h for h in hidden), WIDTH], len(hidden)
    state = {}
    for i in range(k + 1):
        state[f"mlp.net.{i}.0.weight"] = torch.randn(widths[i + 1], widths[i]) / math.sqrt(widths[i])
        state[f"mlp.net.{i}.0.bias"] = 0.1 * torch.randn(widths[i + 1])
        if i == k // 2 and i not in (0, k):
            state.update(trained_norm(f"mlp.net.{i}.2", widths[i + 1]))
    state.update(trained_norm("fc_norm" if fc_norm else "mlp.norm", WIDTH))
    state["head.weight"] = torch.randn(num_classes, WIDTH) / math.sqrt(WIDTH)
    state["head.bias"] = 0.1 * torch.randn(num_classes)
    return state


def adam_state(state: dict[str, Tensor]) -> dict:
    """An optimizer state dict as torch.optim.Adam saves it, over the trainable tensors of `state`."""
    trained = [v for k, v in state.items() if k.startswith(("mlp.", "fc_norm.", "head.", "e_prompt."))]
    return {"state": {i: {"step": torch.tensor(40.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
                      for i, v in enumerate(trained)},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                              "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                              "fused": None, "params": list(range(len(trained)))}]}


def save_tii_stage(path, state: dict[str, Tensor], hidden: list[int]) -> None:
    """engines/norga_tii_engine.py: model, optimizer, epoch (the last one) and args (an argparse.Namespace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(train_inference_task_only=True, original_model="vit_base_patch16_224",
                              original_model_mlp_structure=list(hidden), lr=0.0005, epochs=20, seed=42,
                              ca_storage_efficient_method="covariance", sched="constant", output_dir=str(path.parents[1]))
    torch.save({"model": state, "optimizer": adam_state(state), "epoch": 19, "args": args}, path)


def save_prompt_stage(path, state: dict[str, Tensor], gate_act: str | None) -> None:
    """engines/norga_prompt_engine.py: model, optimizer, args, and the scheduler's state (no epoch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(gate_act=gate_act, model="vit_base_patch16_224", size=3, length=4, seed=42,
                              prompt_momentum=0.01, sched="step", output_dir=str(path.parents[1]))
    torch.save({"model": state, "optimizer": adam_state(state), "args": args,
                "lr_scheduler": {"decay_t": 1.0, "decay_rate": 0.1, "t_in_epochs": True, "base_values": [0.03, 0.003]}},
               path)


# ------------------------------------------------------------------ reference forwards
def layer_norm(x: Tensor, state: dict[str, Tensor], prefix: str, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[f"{prefix}.weight"] + state[f"{prefix}.bias"]


def linear(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": gelu}


def reference_tii_logits(state: dict[str, Tensor], features: Tensor, hidden: list[int]) -> Tensor:
    """Official original model on frozen features: out = net(x) + x, mlp.norm (eps 1e-5) or fc_norm (1e-6), head."""
    state = {k: v.double() for k, v in state.items()}
    x = features.double()
    h, k = x, len(hidden)
    for i in range(k + 1):
        h = linear(h, state, f"mlp.net.{i}.0")
        if i == k:
            break
        h = layer_norm(h, state, f"mlp.net.{i}.2", 1e-5) if (i == k // 2 and i != 0) else gelu(h)
    h = h + x
    h = layer_norm(h, state, "fc_norm", 1e-6) if "fc_norm.weight" in state else layer_norm(h, state, "mlp.norm", 1e-5)
    return linear(h, state, "head")


def reference_class_token(state: dict[str, Tensor], images: Tensor, depth: int, prompt: dict | None = None) -> Tensor:
    """The official ViT's "pre_logits": class token after the final norm (Identity with fc_norm) and, with
    `prompt` = {"layers", "slots", "gate_act"}, each prompted block's prefix keys/values of the sample's slot
    (e_prompt.prompt[l, 0 / 1, slot]) with gated scores s + α·σ(τ·s) (act_scale[l] = τ, α)."""
    state = {k: v.double() for k, v in state.items()}
    batch = len(images)
    h = F.conv2d(images.double(), state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=ARCH["patch_size"]).flatten(2).transpose(1, 2)
    h = torch.cat([state["cls_token"].expand(batch, -1, -1), h], dim=1) + state["pos_embed"]
    tokens, head_dim = h.shape[1], WIDTH // HEADS
    for i in range(depth):
        p = f"blocks.{i}"
        qkv = linear(layer_norm(h, state, f"{p}.norm1", 1e-6), state, f"{p}.attn.qkv")
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if prompt is not None and i in prompt["layers"]:
            layer = prompt["layers"].index(i)
            chosen = state["e_prompt.prompt"][layer][:, prompt["slots"]]  # (2, B, Lp, H, d)
            keys, values = chosen[0].transpose(1, 2), chosen[1].transpose(1, 2)  # (B, H, Lp, d)
            prefix = q @ keys.transpose(-1, -2) / math.sqrt(head_dim)
            if "e_prompt.act_scale" in state:
                tau, alpha = state["e_prompt.act_scale"][layer].flatten()
                prefix = prefix + alpha * ACTIVATIONS[prompt["gate_act"]](tau * prefix)
            scores, v = torch.cat([prefix, scores], dim=-1), torch.cat([values, v], dim=2)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, WIDTH)
        h = h + linear(attended, state, f"{p}.attn.proj")
        m = gelu(linear(layer_norm(h, state, f"{p}.norm2", 1e-6), state, f"{p}.mlp.fc1"))
        h = h + linear(m, state, f"{p}.mlp.fc2")
    if "norm.weight" in state:
        h = layer_norm(h, state, "norm", 1e-6)
    return h[:, 0]


def reference_logits(state: dict[str, Tensor], features: Tensor) -> Tensor:
    """fc_norm (MoCo v3, eps 1e-6) then head, from the class token."""
    state = {k: v.double() for k, v in state.items()}
    if "fc_norm.weight" in state:
        features = layer_norm(features, state, "fc_norm", 1e-6)
    return linear(features, state, "head")


def assert_matches_reference(ours: Tensor, reference: Tensor) -> None:
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=FP32_TOLERANCE * max(scale, 1.0))
