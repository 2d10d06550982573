"""RanPAC's first-session adaptation ("Phase 1") as a component an analytic head owns: on the first task a
parameter-efficient module attached to the host (an AdaptFormer adapter, SSF or VPT-deep prompts) and a cosine
head are trained by SGD on the task's augmented images; then they are frozen, and every feature the head's
statistics and predictions use is the adapted backbone's (McDonnell et al. 2023, RanPAC.py `_train`, petl/)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.config import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt
from norga.methods.base import Phase, PredictRequest
from norga.methods.hide.prompted_memo import PromptedFeatureMemo
from norga.nn.attachments import BACKBONE, Adapter, Attachment, PromptTokens, ScaleShift
from norga.runtime.context import TrainBatch
from norga.runtime.features import FeatureSet
from norga.runtime.seeding import derive_seed
from norga.runtime.training import PhaseTraining

#: What adapts the backbone on the first task: nothing (the official "No Phase 1" rows), or the official PETL kinds.
FirstSessionKind = Literal["none", "adapter", "ssf", "vpt_deep"]
#: SSF's sites (RanPAC's petl/vision_transformer_ssf.py): in every block, after both norms, qkv, the attention's
#: projection and both MLP layers; outside the blocks, after the patch embedding and the final norm.
SSF_BLOCK_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
SSF_BACKBONE_SITES = ("patch_embed", "norm")


@dataclass
class FirstSessionTraining:
    """Phase 1's SGD as officially: momentum, weight decay, torch's cosine annealing to 0 over the epochs, stepped
    per epoch, no clipping (fixed, below)."""

    epochs: PositiveInt = 20
    lr: PositiveFloat = 0.01
    batch_size: PositiveInt = 48
    weight_decay: NonNegativeFloat = 0.0005
    momentum: Fraction = 0.9

    optimizer: ClassVar[str] = "sgd"
    schedule: ClassVar[str] = "cosine_annealing"
    clip_grad: ClassVar[float | None] = None
    betas: ClassVar[list[float] | None] = None
    eps: ClassVar[float | None] = None


@dataclass
class AdaptationSettings:
    """The first-session module's shape (official values) and its training."""

    train: FirstSessionTraining = field(default_factory=FirstSessionTraining)
    adapter_width: PositiveInt = 64  # adapter: bottleneck width (official ffn_num)
    adapter_scale: PositiveFloat = 0.1  # adapter: its output's factor (official ffn_adapter_scalar)
    adapter_dropout: Fraction = 0.1  # adapter: dropout after its ReLU
    prompt_length: PositiveInt = 5  # vpt_deep: tokens per block


class CosineHead(nn.Module):
    """σ·cos(x, w_c) over the first task's classes, σ learnable from 1, w uniform in ±1/√dim (RanPAC's CosineLinear)."""

    def __init__(self, dim: int, classes: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(classes, dim).uniform_(-bound, bound, generator=generator))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, features: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))


class BottleneckAdapter(nn.Module):
    """AdaptFormer's adapter: down-projection, ReLU, dropout, up-projection, times `scale`; "lora" initialisation
    (down Kaiming-uniform, up and both biases 0), so it starts as a no-op."""

    def __init__(self, dim: int, width: int, scale: float, dropout: float, generator: torch.Generator) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, width), nn.Linear(width, dim)
        self.scale, self.dropout = scale, dropout
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            for tensor in (self.down.bias, self.up.weight, self.up.bias):
                tensor.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.dropout(F.relu(self.down(x)), self.dropout, self.training)) * self.scale


class ScaleShiftParameters(nn.Module):
    """One SSF site's scale ~ N(1, 0.02) and shift ~ N(0, 0.02)."""

    def __init__(self, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(width).normal_(1.0, 0.02, generator=generator))
        self.shift = nn.Parameter(torch.empty(width).normal_(0.0, 0.02, generator=generator))

    def attachment(self, site: str) -> ScaleShift:
        return ScaleShift(site, self.scale, self.shift)


def output_width(module: nn.Module) -> int:
    """The feature width of a ViT sub-module's output (a Linear, a LayerNorm or timm's PatchEmbed)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if hasattr(module, "proj") and isinstance(module.proj, nn.Conv2d):
        return module.proj.out_channels
    raise TypeError(f"SSF cannot size the output of a {type(module).__name__}")


def _key(site: str) -> str:
    return site.replace(".", "_")


class FirstSessionModules(nn.Module):
    """The trained parts of Phase 1: one kind's module on the host (`attachments`) and the cosine head."""

    def __init__(self, kind: str, backbone: nn.Module, settings: AdaptationSettings, classes: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.kind = kind
        dim, blocks = backbone.num_features, list(backbone.blocks)
        if kind == "adapter":
            self.adapters = nn.ModuleList(BottleneckAdapter(dim, settings.adapter_width, settings.adapter_scale,
                                                            settings.adapter_dropout, generator) for _ in blocks)
        elif kind == "ssf":
            self.blocks_ssf = nn.ModuleList(
                nn.ModuleDict({_key(site): ScaleShiftParameters(output_width(block.get_submodule(site)), generator)
                               for site in SSF_BLOCK_SITES}) for block in blocks)
            self.backbone_ssf = nn.ModuleDict({_key(site): ScaleShiftParameters(
                output_width(backbone.get_submodule(site)), generator) for site in SSF_BACKBONE_SITES})
        elif kind == "vpt_deep":
            self.prompts = nn.Parameter(torch.zeros(len(blocks), settings.prompt_length, dim))
        else:
            raise ValueError(f"unknown first-session kind {kind!r}")
        self.head = CosineHead(dim, classes, generator)

    def attachments(self) -> dict[int | str, Attachment | list[Attachment]]:
        """What the host binds for an adapted forward pass."""
        if self.kind == "adapter":
            return {index: Adapter("mlp", adapter, parallel=True, input_site="norm2")
                    for index, adapter in enumerate(self.adapters)}
        if self.kind == "ssf":
            attached: dict[int | str, Attachment | list[Attachment]] = {
                index: [sites[_key(site)].attachment(site) for site in SSF_BLOCK_SITES]
                for index, sites in enumerate(self.blocks_ssf)}
            attached[BACKBONE] = [self.backbone_ssf[_key(site)].attachment(site) for site in SSF_BACKBONE_SITES]
            return attached
        return {index: PromptTokens(self.prompts[index][None], per_block=True) for index in range(len(self.prompts))}

    def adapted_parameters(self) -> list[nn.Parameter]:
        """The parameters on the host (not the head's)."""
        head = {id(param) for param in self.head.parameters()}
        return [param for param in self.parameters() if id(param) not in head]


class FirstSession:
    """Phase 1 of an analytic head: `phases` adds the training phase to the first task, `run` trains the module and
    the head and then freezes them, `train_features` and `features` are the adapted backbone's.

    `owner` (the method) runs the phase in its training loop and checkpoints `modules` as one of its own; the
    adapted features are cached per task (on disk too, with ``cache_features_on_disk``) under a key holding a hash
    of the adapted parameters, so no features of other parameters are ever reused.
    """

    PHASE = "first_session"

    def __init__(self, owner: PhaseTraining, settings: AdaptationSettings, kind: str) -> None:
        ctx = self.ctx = owner.ctx
        self.owner, self.settings = owner, settings
        self.modules = FirstSessionModules(kind, ctx.model.backbone, settings, len(ctx.classes(0)),
                                           ctx.init_generator).to(ctx.device).eval().requires_grad_(False)
        self.memo = PromptedFeatureMemo(lambda _slot: self._versions())
        self._fingerprint: tuple[tuple[int, int], ...] | None = None
        self._digest = ""

    def phases(self, task: int) -> list[Phase]:
        return [Phase(self.PHASE, self.settings.train.epochs)] if task == 0 else []

    def run(self, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        """Train the module and the cosine head on the first task's augmented images (cross-entropy over its classes),
        then freeze them. Each step's dropout draws from a generator seeded by (seed, epoch, step)."""
        ctx, cfg = self.ctx, self.settings.train
        column = torch.full((ctx.num_classes,), -1, dtype=torch.long, device=ctx.device)
        column[ctx.classes(0)] = torch.arange(len(ctx.classes(0)), device=ctx.device)
        devices = [ctx.device] if ctx.device.type == "cuda" else []

        def batches(epoch: int) -> Iterator[tuple[TrainBatch, int]]:
            for step, batch in enumerate(ctx.train_loader(0, epoch, cfg.batch_size)):
                yield batch, derive_seed(ctx.config.seed, "first-session-dropout", epoch, step)

        def loss(item: tuple[TrainBatch, int]) -> Tensor:
            batch, seed = item
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                features = self.encode(batch.images)
            logits = self.modules.head(features)
            return ctx.batch_mean(F.cross_entropy(logits, column[batch.labels], reduction="none"), batch)

        self.modules.requires_grad_(True)
        self.owner.train_phase(cfg, [{"params": list(self.modules.parameters())}], batches, loss, start_epoch,
                               on_epoch_end, train=[self.modules])
        self.modules.requires_grad_(False)

    def encode(self, images: Tensor) -> Tensor:
        """Features of `images` through the adapted backbone (the CLS token after the final norm), in float32."""
        with self.ctx.autocast():
            return self.ctx.model.forward_features(images.to(self.ctx.device),
                                                   attachments=self.modules.attachments()).float()

    def train_features(self, task: int) -> FeatureSet:
        """The adapted features of `task`'s training images under the test transform, computed once."""
        return self.ctx.cache.features(("first_session", self.digest(), "train", task),
                                       lambda: self.ctx.encode_dataset(self.ctx.tasks[task].train_eval, self.encode))

    @torch.inference_mode()
    def features(self, request: PredictRequest) -> Tensor:
        """The adapted features of a request's images, memoised per image (`image_ids`) while the module is as it
        was when they were computed."""
        ids = request.image_ids
        if ids is None:
            return self.encode(request.images).cpu()
        slots = torch.zeros(len(ids.rows), dtype=torch.long)
        return self.memo.features(ids.dataset, ids.rows, slots, ids.size,
                                  lambda mask: self.encode(request.images[mask.to(request.images.device)]))

    def _versions(self) -> tuple[tuple[int, int], ...]:
        return tuple((id(param), param._version) for param in self.modules.parameters())

    def digest(self) -> str:
        """A hash of the adapted parameters' values (recomputed when any of them changed in place)."""
        versions = self._versions()
        if versions != self._fingerprint:
            sha = hashlib.sha256()
            for param in self.modules.adapted_parameters():
                sha.update(param.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint, self._digest = versions, sha.hexdigest()[:16]
        return self._digest
