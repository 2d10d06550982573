"""What a continual-learning method is to the engine: its settings, its phases per task, prediction, state.

The engine knows no method's phases. A method declares them (`phases`), which of them evaluate into which
of its matrices (`Phase.evaluate`, `extra_matrices`), whether it infers task identity, what it refuses under
data parallelism, and what it adds to the run record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from torch import Tensor

from norga.config import ConfigError
from norga.runtime.training import masked_logits

if TYPE_CHECKING:
    from norga.runtime.context import RunContext


@dataclass
class Phase:
    """One step of learning a task: `epochs` > 0 marks a resumable training phase; `evaluate` names the
    method's matrix that an evaluation phase fills (every seen task's test set, at that point)."""

    name: str
    epochs: int = 0
    evaluate: str | None = None


def unfitting_blocks(key: str, layers: list[int], depth: int) -> ConfigError:
    """The refusal of setting `key`, prompted blocks `layers` that a `depth`-block backbone does not have."""
    return ConfigError(f"{key} = {list(layers)} does not fit this {depth}-block backbone: set --set {key}=[...] "
                       f"to blocks 0..{depth - 1}")


def check_blocks(key: str, layers: Sequence[int], depth: int) -> None:
    """Refuse setting `key` (`unfitting_blocks`) unless `layers` names blocks, all of them in a `depth`-block
    backbone."""
    if not layers or any(not 0 <= layer < depth for layer in layers):
        raise unfitting_blocks(key, layers, depth)


#: Which prompts `ContinualMethod.predict` uses (`slots`): the method's own choice, each image's true task's, or
#: none (the frozen backbone through the same head). A method lists those it has in `slot_modes`.
SLOT_MODES = ("predicted", "true", "none")


@dataclass
class Prediction:
    """Predicted classes over the seen classes, predicted tasks (where the method infers them) and, when the
    true tasks were given, the classes predicted among each image's true task's classes (task-incremental)."""

    classes: Tensor
    tasks: Tensor | None = None
    within_task: Tensor | None = None


class ImageIds(NamedTuple):
    """Which images a batch holds: a dataset key (e.g. ("test", 3)), their rows in it and its size."""

    dataset: Hashable
    rows: Tensor
    size: int


@dataclass(frozen=True)
class PredictRequest:
    """What `ContinualMethod.predict` is asked: classes (and tasks, if inferred) of `images` after `seen_tasks` tasks.

    The engine passes the images' cached frozen-backbone features (`frozen_features`) and their identity
    (`image_ids`, for methods that memoise per-image work). `slots` (one of the method's slot modes) says whose
    prompts the images get; with `true_tasks` (each image's task) the prediction also holds the classes predicted
    with the true task's prompts among that task's classes only (task-incremental).
    """

    images: Tensor
    seen_tasks: int
    frozen_features: Tensor | None = None
    image_ids: ImageIds | None = None
    slots: str = "predicted"
    true_tasks: Tensor | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a method (with its settings) can do, for the engine, the commands and the tests to read instead of names.

    `infers_tasks`: `predict` returns predicted tasks (recorded as the task-identity matrix). `slot_modes`: the
    `SLOT_MODES` `predict` accepts (a method without prompts has only its own, "predicted"). `score_gate`: its prefix
    attention has a score gate, named in the run record (``gate``; "none" for plain prefix tuning).
    `official_checkpoints`: it can load the official code's checkpoints (`norga evaluate --tii-dir --prompt-dir`).
    """

    infers_tasks: bool = False
    slot_modes: tuple[str, ...] = ("predicted",)
    score_gate: bool = False
    official_checkpoints: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"infers_tasks": self.infers_tasks, "slot_modes": list(self.slot_modes), "score_gate": self.score_gate,
                "official_checkpoints": self.official_checkpoints}


class ContinualMethod(ABC):
    """A method is a set of task hooks with its own typed settings; the engine never branches on its name.

    Subclasses set ``name`` (the config name, also its settings section) and ``Settings`` (a dataclass with
    typed fields and the method's defaults) and register with `norga.methods.register_method`.
    `phases(task)` lists what learning `task` takes; the engine runs each with `run_phase` (or evaluates, for
    a phase with `Phase.evaluate`) and, after every epoch of a training phase, checkpoints `state_dict()`.
    """

    name: ClassVar[str]
    Settings: ClassVar[type]
    #: Matrices besides "accuracy" (and "task_identity" when `infers_tasks`) that its phases evaluate into.
    extra_matrices: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: RunContext, settings: Any) -> None:
        self.ctx = context
        self.settings = settings

    @property
    def capabilities(self) -> Capabilities:
        """What this method can do with its settings (default: predicts classes only, no prompts, no gate)."""
        return Capabilities(official_checkpoints=self.official_evaluation_overrides() is not None)

    @property
    def infers_tasks(self) -> bool:
        return self.capabilities.infers_tasks

    @property
    def slot_modes(self) -> tuple[str, ...]:
        return self.capabilities.slot_modes

    @abstractmethod
    def phases(self, task: int) -> list[Phase]: ...

    @abstractmethod
    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        """Run `phase` from `start_epoch`; call ``on_epoch_end(epoch, logs)`` after each finished epoch."""

    @abstractmethod
    def predict(self, request: PredictRequest) -> Prediction:
        """Classes (and tasks, if `capabilities.infers_tasks`) of ``request.images`` (see `PredictRequest`)."""

    # ------------------------------------------------------------ predictions
    def seen_classes(self, logits: Tensor, seen_tasks: int) -> Tensor:
        """The argmax of `logits`, over the seen tasks' classes when ``eval.mask_final_logits`` (official)."""
        if self.ctx.config.eval.mask_final_logits:
            logits = masked_logits(logits, self.ctx.class_mask_until(seen_tasks - 1))
        return logits.argmax(dim=1).cpu()

    def within_task_classes(self, logits: Tensor, true_tasks: Tensor) -> Tensor:
        """The argmax of each row of `logits` over the classes of that image's true task."""
        own = self.ctx.class_to_task.to(logits.device)[None, :] == true_tasks.to(logits.device)[:, None]
        return masked_logits(logits, own).argmax(dim=1).cpu()

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def heavy_state_dict(self) -> dict[str, Any]:
        """Large state that changes only between phases (class statistics); saved only there."""
        return {}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `heavy_state_dict` returned (nothing by default)."""

    def data_parallel_refusal(self) -> str | None:
        """Why these settings cannot run split across processes (one line with the fix), or None."""
        return None

    def compat(self) -> dict[str, Any]:
        """The method's compatibility switches with the official code, as used (for results.json)."""
        return {}

    def run_record(self) -> dict[str, Any]:
        """What the method adds to results.json about the run as it ended (e.g. learned gate scalars)."""
        return {}

    # ------------------------------------------- the official code's checkpoints
    @classmethod
    def official_evaluation_overrides(cls) -> list[str] | None:
        """``--set`` overrides under which the official code's checkpoints are evaluated (`norga evaluate
        --tii-dir --prompt-dir`), applied before the user's; None: this method cannot read them."""
        return None

    def official_tasks(self, directory: Path) -> list[int]:
        """The task numbers (1-based) an official run wrote checkpoints of into its output folder `directory`."""
        raise NotImplementedError(f"{self.name} cannot read official checkpoints")

    def load_official(self, tii_dir: Path, prompt_dir: Path, task: int) -> dict[str, dict[str, Any]]:
        """Load both official stages' checkpoints of `task` (1-based) into this method, every key accounted for;
        returns a report per stage. A file that does not fit is a `CheckpointError` naming the settings to change."""
        raise NotImplementedError(f"{self.name} cannot read official checkpoints")

    @classmethod
    def summary(cls, settings: Any) -> str:
        """One line of the settings that matter to this method (``norga presets``)."""
        return ""
