"""What every gradient-trained method shares: masked logits and the one training loop of a phase (optimizer, lr
schedule, steps with gradients summed over processes in a distributed run, the per-epoch divergence check, train/eval
switching, a mid-phase resume), training a classifier on masked logits, and checkpoints that hold exactly what the
method owns and trains."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norga.config import section_path
from norga.runtime.context import RunContext, TrainBatch
from norga.runtime.divergence import DivergenceGuard
from norga.runtime.optim import PhaseOptimization, build_optimizer, schedule_factor, set_epoch_lr
from norga.runtime.projected_adam import ProjectedAdam
from norga.storage import CheckpointError

NEG_INF = float("-inf")
Batch = TypeVar("Batch")


def masked_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    """Logits with every class outside the boolean mask `allowed` set to -inf."""
    return logits.masked_fill(~allowed.to(logits.device), NEG_INF)


class PhaseTraining:
    """Mixin for methods whose phases train with an optimizer; needs ``self.model`` (a `PromptedViT`), ``self.ctx``
    (the `RunContext`), ``self.name`` and ``self.settings`` (where each phase's `OptimConfig` sits).

    `train_phase` is the one training loop: a method (or a component it owns) gives it the phase's settings, its
    parameter groups, its batches and its loss. Data-parallel phases (the default) train on this process's shard of
    each batch with a loss that is its share of the whole batch's (`RunContext.batch_mean`, `replicated_term`); the
    step sums the gradients over processes. Replicated phases (``sharded=False``: every process draws the same
    samples, e.g. TAP on Gaussian features) skip that.

    Its checkpoints hold exactly what the method owns and trains, whatever it is and wherever it is attached:
    the modules it names in `owned_modules` and the host parameters it trains (`PromptedViT.trained_parameters`,
    never the frozen backbone). Nothing is chosen by key name; a checkpoint that lacks any of it is refused,
    and so is checkpointing while the optimizer trains a tensor outside it.
    """

    model: nn.Module
    ctx: RunContext
    name: str
    settings: Any
    optimizer: torch.optim.Optimizer | None = None
    _saved_optimizer: dict | None = None
    _guard: DivergenceGuard | None = None

    def train_phase(
        self,
        cfg: PhaseOptimization,
        groups: Sequence[dict],
        batches: Callable[[int], Iterable[Batch]],
        loss: Callable[[Batch], Tensor],
        start_epoch: int,
        on_epoch_end: Callable[[int, dict], None],
        train: Sequence[nn.Module] = (),
        sharded: bool = True,
        step_lr: Callable[[int, int, float], float] | None = None,
        projections: Mapping[str, tuple[Tensor | None, Tensor | None]] | None = None,
        optimizer: PhaseOptimization | None = None,
    ) -> None:
        """Epochs `start_epoch` .. ``cfg.epochs - 1`` of a phase: minimise ``loss(batch)`` over ``batches(epoch)``
        with the optimizer `cfg` names over the parameter `groups` (dicts with ``params`` and optionally
        ``lr_scale``), its lr schedule and gradient clipping; the modules in `train` are in training mode while the
        phase runs and in evaluation mode after it. `cfg` is a section of ``self.settings``: a diverged epoch names
        its learning rate setting. `step_lr` replaces the per-epoch schedule by a per-iteration one: each group's
        lr before step i of epoch e is ``step_lr(e, i, group's base lr)``. `projections`
        (parameter name -> (left, right)) are set on a ``projected_adam`` optimizer before it is used or its saved
        state is loaded (its groups name their parameters: ``param_names``). `optimizer` (default `cfg`) gives the
        optimizer's kind and knobs instead, where a compat switch fixes them whatever the section says (e.g.
        SD-LoRA's official SGD)."""
        groups = [dict(group, params=list(group["params"])) for group in groups]
        params = [param for group in groups for param in group["params"]]
        self._phase_optimizer(groups, optimizer or cfg, start_epoch, projections or {})
        lr_key = self.setting_key(cfg, "lr")
        for module in train:
            module.train()
        for epoch in range(start_epoch, cfg.epochs):
            if step_lr is None:
                set_epoch_lr(self.optimizer, schedule_factor(cfg.schedule, epoch, cfg.epochs, cfg.lr))
            total = 0.0
            for step, batch in enumerate(batches(epoch)):
                if step_lr is not None:
                    for group in self.optimizer.param_groups:
                        group["lr"] = step_lr(epoch, step, group["base_lr"])
                total += self._step(loss(batch), params, cfg, sharded)
            self._end_epoch(epoch, total, cfg, on_epoch_end, sharded, lr_key)
        for module in train:
            module.eval()

    def fit_classifier(
        self,
        classifier: nn.Module,
        batches: Callable[[int], Iterable[TrainBatch]],
        allowed: Tensor,
        cfg: PhaseOptimization,
        start_epoch: int,
        on_epoch_end: Callable[[int, dict], None],
    ) -> None:
        """Train `classifier` with cross-entropy on logits masked to `allowed` over ``batches(epoch)`` (of inputs)."""

        def loss(batch: TrainBatch) -> Tensor:
            logits = masked_logits(classifier(batch.images), allowed)
            return self.ctx.batch_mean(F.cross_entropy(logits, batch.labels, reduction="none"), batch)

        self.train_phase(cfg, [{"params": list(classifier.parameters())}], batches, loss, start_epoch, on_epoch_end,
                         train=[classifier])

    def setting_key(self, section: Any, field: str) -> str:
        """The dotted config key of `field` of `section`, a part of this method's settings (``norga.wtp.train.lr``)."""
        return f"{self.name}.{section_path(self.settings, section)}.{field}"

    # ------------------------------------------------------------ the loop's parts
    def _phase_optimizer(self, groups: Sequence[dict], cfg: PhaseOptimization, start_epoch: int,
                         projections: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> None:
        """A fresh optimizer for a phase (the official code re-creates it every task), with its step projections;
        when resuming mid-phase, it gets the interrupted phase's saved state back, with the learning rates of the
        current config (a resume may lower them)."""
        self.optimizer = build_optimizer(groups, cfg)
        if projections and not isinstance(self.optimizer, ProjectedAdam):
            raise TypeError(f"step projections need the projected_adam optimizer, not {cfg.optimizer}")
        for name, (left, right) in projections.items():
            self.optimizer.set_projection(name, left=left, right=right)
        self._guard = DivergenceGuard()
        saved, self._saved_optimizer = self._saved_optimizer, None
        if start_epoch > 0:
            if saved is None:
                raise ValueError("resuming mid-phase needs the optimizer state, but the checkpoint has none")
            saved = dict(saved)
            self._guard.load_state_dict(saved.pop("divergence", None))
            base_lrs = [group["base_lr"] for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(saved)
            for group, base_lr in zip(self.optimizer.param_groups, base_lrs):
                group["base_lr"] = base_lr

    def _step(self, loss: Tensor, params: list[Tensor], cfg: PhaseOptimization, sharded: bool) -> Tensor:
        """One optimizer step; returns the detached loss (no host sync: finiteness is checked per epoch)."""
        self._guard.observe(loss, params)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sharded:
            self.ctx.dist.sum_gradients(params)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def _end_epoch(self, epoch: int, total: Tensor | float, cfg: PhaseOptimization,
                   on_epoch_end: Callable[[int, dict], None], sharded: bool, lr_key: str) -> None:
        """Refuse a diverged epoch (`DivergenceGuard`; `lr_key` names the learning rate setting that drives this
        phase) before anything is checkpointed, then report the epoch."""
        total = float(self.ctx.dist.all_sum(total) if sharded else total)
        self._guard.check(total, lr_key, cfg.lr, epoch, self.ctx.dist if sharded else None)
        on_epoch_end(epoch, {"loss": total, **self._epoch_lr()})

    def _epoch_lr(self) -> dict[str, float | list[float]]:
        """The learning rate the epoch ran at (``lr``; one per parameter group where the groups' differ)."""
        if self.optimizer is None:
            return {}
        rates = [float(group["lr"]) for group in self.optimizer.param_groups]
        return {"lr": rates[0] if len(set(rates)) == 1 else rates}

    # ------------------------------------------------------------------- state
    def _optimizer_state(self) -> dict | None:
        """The current phase's optimizer state; before a resumed method has run a phase, the state it loaded
        (so a checkpoint written then, e.g. at a task's commit, equals the one an uninterrupted run writes)."""
        if self.optimizer is None:
            return self._saved_optimizer
        return {**self.optimizer.state_dict(), "divergence": self._guard.state_dict()}

    def owned_modules(self) -> dict[str, nn.Module]:
        """The modules this method owns and trains, by the name of their section in its checkpoints (e.g.
        ``{"prompts": ..., "tii": ...}``), wherever they are attached. With the host parameters it trains
        (`PromptedViT.trained_parameters`, section ``"model"``) they are everything its checkpoints hold:
        `state_dict` saves all of them, `load_state_dict` refuses a checkpoint that lacks any."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self._model_and_optimizer_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_owned_state(self._owned_sections(), state, ("optimizer",))
        self._saved_optimizer = state["optimizer"]

    def _owned_sections(self) -> dict[str, dict[str, Tensor]]:
        """Every tensor the method owns, by section and key: the host's trained parameters, its own modules."""
        return {"model": self.model.trained_parameters(),
                **{name: module.state_dict(keep_vars=True) for name, module in self.owned_modules().items()}}

    def _load_trainable_model_state(self, state: dict[str, Tensor]) -> None:
        """Load the host parameters the method trains; every one must be in `state`, nothing else may be."""
        load_owned_state({"model": self.model.trained_parameters()}, {"model": state})

    def _model_and_optimizer_state(self) -> dict[str, Any]:
        """What the method owns (`owned_modules`, the host's trained parameters) and the optimizer's state.

        Refuses to checkpoint a state the optimizer trains a tensor outside of: it would be lost on resume."""
        sections = self._owned_sections()
        if self.optimizer is not None:
            owned = {id(tensor) for section in sections.values() for tensor in section.values()}
            stray = [param for group in self.optimizer.param_groups for param in group["params"]
                     if id(param) not in owned]
            if stray:
                names = self._parameter_names()
                listed = ", ".join(names.get(id(param), f"a {tuple(param.shape)} tensor") for param in stray)
                raise RuntimeError(f"{type(self).__name__} trains {listed} but does not own it, so its checkpoints "
                                   "would lose it: return its module from owned_modules() (a host parameter: "
                                   "model.unfreeze it)")
        state = {name: {key: tensor.detach() for key, tensor in section.items()} for name, section in sections.items()}
        return {**state, "optimizer": self._optimizer_state()}

    def _parameter_names(self) -> dict[int, str]:
        """Readable names of the parameters the method can reach: its attributes' (``prompts.key.keys``), the host's."""
        names = {id(param): f"model.{name}" for name, param in self.model.named_parameters()}
        for attribute, value in vars(self).items():
            if isinstance(value, nn.Parameter):
                names[id(value)] = attribute
            elif isinstance(value, nn.Module) and value is not self.model:
                names.update({id(param): f"{attribute}.{name}" for name, param in value.named_parameters()})
        return names


class CheckpointMismatch(CheckpointError, RuntimeError):
    """A method checkpoint that does not hold exactly what the method owns (a `CheckpointError`, one line for the
    command line; a RuntimeError like torch's strict ``load_state_dict``)."""


def load_owned_state(owned: dict[str, dict[str, Tensor]], state: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """Copy `state` into the tensors `owned` (section -> key -> tensor), all or nothing: every owned tensor must be
    in `state` with its shape, and `state` may hold nothing else (besides the sections `extra`)."""
    missing = [f"{name}.{key}" for name, section in owned.items() for key in section
               if key not in state.get(name, {})]
    missing += [name for name in extra if name not in state]
    unexpected = [name for name in state if name not in owned and name not in extra]
    unexpected += [f"{name}.{key}" for name, section in owned.items() for key in state.get(name, {})
                   if key not in section]
    if missing:
        raise CheckpointMismatch(
            f"Missing key(s) in the checkpoint: {', '.join(missing)}: the method owns and trains these, so it cannot "
            "resume from a state without them (written by another norga or edited): start the run again in a new "
            "directory")
    if unexpected:
        raise CheckpointMismatch(
            f"the checkpoint has {', '.join(unexpected)}, which this method does not own (another method's or other "
            "settings' state): resume with the settings the run was started with, or start a new run")
    for name, section in owned.items():
        for key, tensor in section.items():
            if state[name][key].shape != tensor.shape:
                raise CheckpointMismatch(
                    f"{name}: size mismatch for {key}: the checkpoint's is {tuple(state[name][key].shape)}, this "
                    f"method's {tuple(tensor.shape)}: resume with the settings the run was started with")
    with torch.no_grad():
        for name, section in owned.items():
            for key, tensor in section.items():
                tensor.copy_(state[name][key])
