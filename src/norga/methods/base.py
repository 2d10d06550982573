"""What a continual-learning method is to the engine: named phases per task, prediction, state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

#: A phase name that asks the engine to evaluate all seen tasks into the "before_tap" matrices.
EVALUATE_BEFORE_TAP = "evaluate_before_tap"


@dataclass
class Phase:
    """One step of learning a task; `epochs` > 0 marks a resumable training phase."""

    name: str
    epochs: int = 0


@dataclass
class Prediction:
    """Predicted classes and, where the method infers it, predicted tasks, for a batch of images."""

    classes: Tensor
    tasks: Tensor | None = None


class ImageIds(NamedTuple):
    """Which images a batch holds: a dataset key (e.g. ("test", 3)), their rows in it and its size."""

    dataset: Hashable
    rows: Tensor
    size: int


class ContinualMethod(ABC):
    """A method is a set of task hooks; the engine never branches on its name.

    `phases(task)` lists what learning `task` takes; the engine runs each with `run_phase` and, after every
    epoch of a training phase, checkpoints `state_dict()` so a run can resume from the last finished epoch.
    """

    name: ClassVar[str]
    #: Whether the method uses the model's per-task prefix slots (`PromptedViT.pool`); if not, the model is
    #: built without them.
    uses_prompt_slots: ClassVar[bool] = True

    @abstractmethod
    def phases(self, task: int) -> list[Phase]: ...

    @abstractmethod
    def run_phase(self, task: int, phase: Phase, start_epoch: int, on_epoch_end: Callable[[int, dict], None]) -> None:
        """Run `phase` from `start_epoch`; call ``on_epoch_end(epoch, logs)`` after each finished epoch."""

    @abstractmethod
    def predict(self, images: Tensor, seen_tasks: int, frozen_features: Tensor | None = None,
                image_ids: ImageIds | None = None) -> Prediction:
        """Classes (and tasks, if inferred) of `images` after `seen_tasks` tasks; the engine passes the images'
        cached frozen-backbone features as `frozen_features` and their identity as `image_ids` (for methods
        that memoise per-image work)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def heavy_state_dict(self) -> dict[str, Any]:
        """Large state that changes only between phases (class statistics); saved only there."""
        return {}

    def load_heavy_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `heavy_state_dict` returned (nothing by default)."""


METHODS: dict[str, type[ContinualMethod]] = {}

#: Config values a method name stands for (``hide`` is the HiDe-Prompt class with no gate); commands that
#: run a method by name on any preset (``norga compare``) apply them. Dotted key -> value.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {}


def register_method(
    *names: str, implies: dict[str, Any] | None = None
) -> Callable[[type[ContinualMethod]], type[ContinualMethod]]:
    """Class decorator: make a method available to configs under `names`, which imply the settings `implies`."""

    def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
        for name in names:
            METHODS[name] = cls
            METHOD_SETTINGS[name] = dict(implies or {})
        return cls

    return register
