"""The task loop: run a method's phases task after task, evaluate, checkpoint after every epoch, resume."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from norga.config import RunConfig
from norga.engine.context import RunContext, TaskDatasets
from norga.engine.distributed import SINGLE_PROCESS, Distributed
from norga.engine.features import FeatureSet
from norga.engine.joint import training_schedule
from norga.engine.progress import Progress, evaluation_line
from norga.engine.run_dir import RunDirectory
from norga.engine.seeding import seed_everything
from norga.methods import method_class
from norga.methods.base import ContinualMethod, ImageIds
from norga.metrics import AccuracyMatrix
from norga.nn import PromptedViT

log = logging.getLogger("norga")

NO_TASK = -1  # a method that infers no task


@dataclass
class Position:
    """Where a run stands: the next task, phase index within it and epoch within that phase."""

    task: int = 0
    phase: int = 0
    epoch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"task": self.task, "phase": self.phase, "epoch": self.epoch}


class Engine:
    """Runs one continual-learning experiment into a run directory."""

    def __init__(
        self,
        config: RunConfig,
        model: PromptedViT,
        tasks: Sequence[TaskDatasets],
        num_classes: int,
        run_dir: RunDirectory,
        device: torch.device,
        progress: Progress | None = None,
        after_epoch: Callable[[Position], None] | None = None,
        dist: Distributed = SINGLE_PROCESS,
        init_generator: torch.Generator | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        seed_everything(config.seed)  # before any module the method creates is initialised
        feature_dir = run_dir.path / "feature_cache" if config.cache_features_on_disk else None
        self.joint = config.data.joint  # one training step on the union of all tasks (engine/joint.py)
        self.context = RunContext(config, model.to(device), training_schedule(tasks, self.joint), num_classes, device,
                                  workers=config.data.workers, feature_dir=feature_dir, test_tasks=tasks, dist=dist,
                                  init_generator=init_generator)
        self.method: ContinualMethod = method_class(config.method)(self.context, config.settings)
        if dist.enabled and (refusal := self.method.data_parallel_refusal()) is not None:
            raise ValueError(refusal)
        self.num_tasks = len(self.context.tasks)  # training steps
        self.matrices = {name: AccuracyMatrix(len(tasks), joint=self.joint) for name in self.matrix_names()}
        self.position = Position()
        self.progress = progress or Progress("off")
        self.context.batch_progress = self.progress.batches
        self.after_epoch = after_epoch  # test hook: called after each checkpointed epoch

    def matrix_names(self) -> list[str]:
        """The accuracy matrix, the task-identity one if the method infers tasks (not in a joint run: one task
        is trivial), and the method's own extra matrices."""
        identity = ["task_identity"] if self.method.infers_tasks and not self.joint else []
        return ["accuracy", *identity, *self.method.extra_matrices]

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "position": self.position.to_dict(),
            "method": self.method.state_dict(),
            "matrices": {name: matrix.to_dict() for name, matrix in self.matrices.items()},
        }

    def resume(self) -> None:
        """Continue from the run directory's last checkpoint."""
        state, heavy = self.run_dir.load_state()
        self.position = Position(**state["position"])
        self.method.load_state_dict(state["method"])
        self.method.load_heavy_state_dict(heavy)
        self.matrices = {name: AccuracyMatrix.from_dict(data) for name, data in state["matrices"].items()}
        log.info("resuming at task %d, phase %d, epoch %d", self.position.task, self.position.phase, self.position.epoch)

    def _checkpoint(self, task: int, phase: int, epoch: int) -> None:
        """Save the state; class statistics only change between phases, so they are saved only there."""
        self.position = Position(task, phase, epoch)
        self.run_dir.save_state(self.state(), self.method.heavy_state_dict() if epoch == 0 else None)
        if self.after_epoch is not None:
            self.after_epoch(self.position)

    # ------------------------------------------------------------------- loop
    def run(self) -> dict[str, AccuracyMatrix]:
        start = self.position
        for task in range(start.task, self.num_tasks):
            phases = self.method.phases(task)
            first_phase = start.phase if task == start.task else 0
            for index in range(first_phase, len(phases)):
                phase = phases[index]
                first_epoch = start.epoch if (task, index) == (start.task, start.phase) else 0
                if phase.evaluate is not None:
                    with self.progress.phase(task, self.num_tasks, phase.name, summary=False):
                        self.evaluate(task, self.matrices[phase.evaluate])
                    self.progress.result(evaluation_line(task, self.num_tasks, phase.evaluate.replace("_", " "),
                                                         self.matrices[phase.evaluate], summary=False))
                else:
                    with self.progress.phase(task, self.num_tasks, phase.name, phase.epochs, first_epoch) as tracker:

                        def on_epoch_end(epoch: int, logs: dict, task=task, index=index, tracker=tracker) -> None:
                            tracker.epoch_done(epoch, logs)
                            self._checkpoint(task, index, epoch + 1)

                        self.method.run_phase(task, phase, first_epoch, on_epoch_end)
                self._checkpoint(task, index + 1, 0)
            with self.progress.phase(task, self.num_tasks, "evaluate", summary=False):
                self.evaluate(task, self.matrices["accuracy"], self.matrices.get("task_identity"))
            self._checkpoint(task + 1, 0, 0)
            self.run_dir.save_task_checkpoint(task, self.state(), self.method.heavy_state_dict())
            self.run_dir.write_results(self.config, self.matrices, upto=task, method=self.method)
            self.progress.result(evaluation_line(task, self.num_tasks, "", self.matrices["accuracy"],
                                                 self.matrices.get("task_identity")))
        return self.matrices

    # ------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(self, task: int, matrix: AccuracyMatrix, identity: AccuracyMatrix | None = None) -> None:
        """Accuracy on the test set of every task seen so far (all tasks in a joint run), after learning `task`.

        `identity` (the task-identity matrix) is given for methods that infer tasks, outside joint runs.
        """
        self.context.model.eval()
        for seen in range(matrix.tested(task)):
            frozen = self.context.frozen_test_features(seen)

            def predict(images: torch.Tensor, labels: torch.Tensor, rows: slice,
                        seen: int = seen, frozen: FeatureSet = frozen) -> tuple[torch.Tensor, ...]:
                ids = ImageIds(("test", seen), torch.arange(rows.start, rows.stop), len(frozen.labels))
                prediction = self.method.predict(images, task + 1, frozen.features[rows], ids)
                if prediction.tasks is None and identity is not None:
                    raise RuntimeError(f"method {self.config.method!r} infers tasks but its predict returned none")
                tasks = prediction.tasks if prediction.tasks is not None else torch.full_like(labels, NO_TASK)
                return prediction.classes, tasks, labels

            classes, tasks, labels = self.context.map_batches(
                self.context.test_tasks[seen].test, self.config.eval.batch_size, predict)
            matrix.update(seen, task, int((classes == labels).sum()), len(labels))
            if identity is not None:
                identity.update(seen, task, int((tasks == seen).sum()), len(labels))


def open_run(
    config: RunConfig,
    model: PromptedViT,
    tasks: Sequence[TaskDatasets],
    num_classes: int,
    run_dir: Path | str,
    *,
    resume: bool = False,
    device: torch.device | None = None,
    progress: Progress | None = None,
    after_epoch: Callable[[Position], None] | None = None,
    records: dict | None = None,
    dist: Distributed = SINGLE_PROCESS,
    init_generator: torch.Generator | None = None,
) -> Engine:
    """The engine of a new run directory (written: config, environment) or of one to resume (state loaded).

    `records` (backbone and benchmark provenance) go into environment.json with the software versions;
    `init_generator` (`BuiltRun.init_generator`) initialises the method's parameters. In a
    distributed run (`dist`) every process calls this; only rank 0 writes the run directory.
    """
    if dist.is_main:
        directory = RunDirectory(Path(run_dir), create=not resume)
    dist.barrier()  # the directory exists (or the main process failed) before the others look at it
    if not dist.is_main:
        directory = RunDirectory(Path(run_dir), create=False, write=False)
    if not resume:
        directory.write_config(config)
        directory.write_environment({"device": str(device or "cpu"), "processes": dist.world_size, **(records or {})})
    engine = Engine(config, model, tasks, num_classes, directory, device or torch.device("cpu"), progress, after_epoch,
                    dist, init_generator)
    if resume:
        engine.resume()
    engine.progress.start({
        "run_dir": str(directory.path.resolve()), "method": config.method, "joint": engine.joint,
        "threads": torch.get_num_threads(), "processes": dist.world_size, "steps": engine.num_tasks,
        **(records or {}), "device": str(device or "cpu"),
        **({"resumed_at": engine.position.to_dict()} if resume else {}),
    })
    return engine


def run_experiment(*args, **kwargs) -> dict[str, AccuracyMatrix]:
    """Library entry point: run (or resume) one experiment on already-built model and task data (the arguments
    are those of `open_run`); returns the run's matrices by name ("accuracy", "task_identity" where the method
    infers tasks, and the method's own, e.g. HiDe-Prompt's "before_tap")."""
    return open_run(*args, **kwargs).run()
