"""Supervised pretraining of a small timm ViT, so the offline quickstart has a really pretrained backbone.

Writes ``<out>.safetensors`` (fp16 weights in timm layout, no classifier head) and ``<out>.json`` (a card:
architecture, dataset, epochs, test accuracy, wall time, the exact command). Images are held in memory
as uint8 (N, 3, H, W); augmentation (random crop after 4 px zero padding, horizontal flip) runs
batch-wise on tensors, so the two CPU cores spend their time in the model.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from norga.runtime.seeding import seed_everything
from norga.storage import atomic_write, write_json


@dataclass
class PretrainConfig:
    """The recipe; its values go into the card."""

    arch: str = "vit_tiny_patch16_224"
    timm_kwargs: dict = field(default_factory=lambda: {"img_size": 32, "patch_size": 4, "depth": 6})
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    bf16: bool = True
    seed: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Per-sample random crop (after zero padding) and horizontal flip of a batch (B, C, H, W)."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    cropped = padded[torch.arange(batch)[:, None, None, None], torch.arange(channels)[None, :, None, None], rows, cols]
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


def normalise(images: Tensor, config: PretrainConfig) -> Tensor:
    """uint8 -> float in the backbone's normalisation."""
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def lr_at(step: int, steps: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: Tensor, labels: Tensor, config: PretrainConfig, batch: int = 500) -> float:
    """Top-1 accuracy (%)."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            logits = model(normalise(images[start : start + batch], config))
        correct += int((logits.argmax(1) == labels[start : start + batch]).sum())
    return 100.0 * correct / len(labels)


def pretrain(
    config: PretrainConfig, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], out: Path,
    dataset_name: str, log=print,
) -> dict:
    """Train `config.arch` on uint8 (images, labels), evaluate, write weights + card; returns the card."""
    seed_everything(config.seed)
    num_classes = int(train[1].max()) + 1
    model = timm.create_model(config.arch, pretrained=False, num_classes=num_classes, **config.timm_kwargs)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    images, labels = train
    steps_per_epoch = len(labels) // config.batch_size
    steps, warmup = steps_per_epoch * config.epochs, int(steps_per_epoch * config.warmup_epochs)
    generator = torch.Generator().manual_seed(config.seed)
    start_time, step = time.perf_counter(), 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        running = 0.0
        for batch_start in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            index = order[batch_start : batch_start + config.batch_size]
            x = normalise(random_crop_flip(images[index], generator), config)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, warmup, config.lr)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = F.cross_entropy(model(x), labels[index], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += float(loss.detach())
            step += 1
        accuracy = evaluate(model, *test, config)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {running / steps_per_epoch:.3f}, test accuracy {accuracy:.2f}%, "
            f"{time.perf_counter() - start_time:.0f} s")
    card = {
        "name": out.name,
        "arch": config.arch,
        "timm_kwargs": config.timm_kwargs,
        "dataset": dataset_name,
        "train_images": len(labels),
        "test_images": len(test[1]),
        "test_accuracy": round(evaluate(model, *test, config), 2),
        "wall_seconds": round(time.perf_counter() - start_time, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "recipe": asdict(config),
        "command": " ".join(sys.argv),
    }
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    atomic_write(out.with_suffix(".safetensors"), lambda tmp: save_file(state, str(tmp)))
    write_json(card, out.with_suffix(".json"))
    return card
