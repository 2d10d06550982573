"""The task loop: run a method's phases task after task, evaluate, checkpoint after every epoch, resume."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from norga.config import ConfigError
from norga.engine.evaluation import evaluate_seen_tasks
from norga.engine.joint import training_schedule
from norga.engine.progress import Progress, evaluation_line, warnings_logged
from norga.engine.resume_changes import check_resume_changes, describe_changes, identity_hash
from norga.engine.run_dir import RunDirectory
from norga.kill_points import kill_point
from norga.methods import method_class
from norga.methods.base import ContinualMethod
from norga.metrics import AccuracyMatrix
from norga.runtime.allocator import keep_freed_memory
from norga.runtime.context import BuiltRun, RunContext
from norga.runtime.distributed import SINGLE_PROCESS, Distributed
from norga.runtime.divergence import TrainingDiverged
from norga.runtime.seeding import seed_everything
from norga.storage import CheckpointError

log = logging.getLogger("norga")

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
        built: BuiltRun,
        run_dir: RunDirectory,
        progress: Progress | None = None,
        after_epoch: Callable[[Position], None] | None = None,
        dist: Distributed = SINGLE_PROCESS,
    ) -> None:
        config = self.config = built.config
        self.run_dir = run_dir
        seed_everything(config.seed)  # before any module the method creates is initialised
        feature_dir = run_dir.path / "feature_cache" if config.cache_features_on_disk else None
        self.joint = config.data.joint  # one training step on the union of all tasks (engine/joint.py)
        self.context = RunContext(built, train_tasks=training_schedule(built.tasks, self.joint),
                                  feature_dir=feature_dir, dist=dist)
        self.method: ContinualMethod = method_class(config.method)(self.context, config.settings)
        if dist.enabled and (refusal := self.method.data_parallel_refusal()) is not None:
            raise ValueError(refusal)
        run_dir.config_hash = identity_hash(config)
        self.num_tasks = len(self.context.tasks)  # training steps
        self.matrices = {name: AccuracyMatrix(len(built.tasks), joint=self.joint) for name in self.matrix_names()}
        self.position = Position()
        self.progress = progress or Progress("off")
        self.context.batch_progress = self.progress.batches
        self.after_epoch = after_epoch  # test hook: called after each checkpointed epoch

    def matrix_names(self) -> list[str]:
        """The accuracy matrix, the task-identity one if the method infers tasks, the task-incremental one (each
        image's true task given; neither in a joint run, where one task is trivial), and the method's own."""
        identity = ["task_identity"] if self.method.infers_tasks and not self.joint else []
        within_task = [] if self.joint else ["task_incremental"]
        return ["accuracy", *identity, *within_task, *self.method.extra_matrices]

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        phases = self.method.phases(self.position.task) if self.position.task < self.num_tasks else []
        return {
            "position": self.position.to_dict(),
            "phases": [phase.name for phase in phases],  # of the task under way: a resume must see the same
            "method": self.method.state_dict(),
            "matrices": {name: matrix.to_dict() for name, matrix in self.matrices.items()},
        }

    def resume(self) -> None:
        """Continue from the run directory's last checkpoint (from the start if the run stopped before its first).

        The state must belong to this run and config (`_check_identity`); settings a resume may change
        (`resume_changes.RESUME_SAFE`) are recorded; files a crash left stale are rewritten (`_repair`).
        """
        stored = self.run_dir.read_config()
        changes = check_resume_changes(stored, self.config) if stored is not None else {}
        if not self.run_dir.has_state():
            log.info("no checkpoint yet: starting from the beginning")
            self._record_resume_changes(changes, None)
            return
        state, heavy = self.run_dir.load_state()
        self._check_identity(state["run"])
        self.position = Position(**state["position"])
        self.method.load_state_dict(state["method"])
        self.method.load_heavy_state_dict(heavy)
        self.matrices = {name: AccuracyMatrix.from_dict(data) for name, data in state["matrices"].items()}
        log.info("resuming at task %d, phase %d, epoch %d", self.position.task, self.position.phase, self.position.epoch)
        self._record_resume_changes(changes, state.get("phases"))
        self._repair()

    def _checkpoint(self, task: int, phase: int, epoch: int) -> None:
        """Save the state; class statistics only change between phases, so they are saved only there."""
        if epoch == 0:
            kill_point("phase", f"task {task + 1}, after phase {phase}")
        self.position = Position(task, phase, epoch)
        self.run_dir.save_state(self.state(), self.method.heavy_state_dict() if epoch == 0 else None)
        if self.after_epoch is not None:
            self.after_epoch(self.position)

    def _commit_task(self, task: int) -> None:
        """A task's end as one commit: its checkpoint, results.json, the CSVs and plots are written, and only
        then does state.pt move to the next task. A crash before that resumes into this task's evaluation,
        which rewrites them all."""
        kill_point("phase", f"task {task + 1} evaluated, before its commit")
        self.position = Position(task + 1, 0, 0)
        state, heavy = self.state(), self.method.heavy_state_dict()
        self.run_dir.save_task_checkpoint(task, state, heavy)
        self.run_dir.write_results(self.config, self.matrices, upto=task, method=self.method)
        self.run_dir.save_state(state, heavy)
        if self.after_epoch is not None:
            self.after_epoch(self.position)

    def _repair(self) -> None:
        """After a crash: rewrite the results of the tasks committed so far (results.json, CSVs, plots) and the
        last task checkpoint if it is missing or cut short (state.pt still holds exactly its content)."""
        committed = self.position.task
        if committed == 0:
            return
        for task in range(committed):
            if self.run_dir.task_checkpoint_intact(task):
                continue
            if task == committed - 1 and self.position == Position(committed, 0, 0):
                self.run_dir.save_task_checkpoint(task, self.state(), self.method.heavy_state_dict())
                log.info("rewrote %s, which a crash had left incomplete", self.run_dir.task_checkpoint(task))
            else:
                log.warning("%s is missing or incomplete and cannot be rebuilt (later tasks have run since); the "
                            "results do not depend on it", self.run_dir.task_checkpoint(task))
        self.run_dir.write_results(self.config, self.matrices, upto=committed - 1, method=self.method)

    def _check_identity(self, record: dict) -> None:
        """The state must come from a run of this config (apart from what a resume may change)."""
        if self.run_dir.config_hash != record.get("config_hash"):
            raise CheckpointError(
                f"{self.run_dir.path / 'state.pt'} was written under another config than {self.run_dir.path / 'config.yaml'}"
                " (their identity hashes differ): restore the run's own config.yaml and state.pt, or start a new run")

    def _record_resume_changes(self, changes: dict, stored_phases: list[str] | None) -> None:
        """Settings changed on resume (all safe ones, `check_resume_changes`): refused if they change the phases
        of the task under way or leave its current phase fewer epochs than it has run; else recorded in the
        log, config.yaml and environment.json."""
        if not changes:
            return
        at = self.position
        if at.task < self.num_tasks:
            phases = self.method.phases(at.task)
            if stored_phases is not None and [phase.name for phase in phases] != stored_phases:
                raise ConfigError(f"--set {describe_changes(changes)} changes the phases of task {at.task + 1}, which "
                                  "is under way: resume without it")
            if at.phase < len(phases) and phases[at.phase].epochs < at.epoch:
                raise ConfigError(f"--set {describe_changes(changes)} leaves phase {phases[at.phase].name} of task "
                                  f"{at.task + 1} {phases[at.phase].epochs} epochs, but {at.epoch} have already run: "
                                  f"give at least {at.epoch}")
        log.info("resume at task %d, phase %d, epoch %d changes %s", at.task, at.phase, at.epoch,
                 describe_changes(changes))
        self.run_dir.record_resume_changes(self.config, changes, at.to_dict())

    # ------------------------------------------------------------------- loop
    def run(self) -> dict[str, AccuracyMatrix]:
        """Run (the rest of) every task; the run directory is released at the end, however it ends."""
        started = time.perf_counter()
        try:
            with warnings_logged(log):
                matrices = self._run_tasks()
            self.progress.note(f"run finished in {time.perf_counter() - started:.1f} s")
            return matrices
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error}; {self._after_divergence(error)}", error.setting) from error
        finally:
            self.run_dir.close()

    def _after_divergence(self, error: TrainingDiverged) -> str:
        """What is on disk after a divergence and how to go on (no checkpoint is claimed that does not exist)."""
        directory = self.run_dir.path
        if not self.run_dir.has_state():
            return f"nothing was checkpointed yet: start again with a lower {error.setting}"
        return (f"the last checkpoint ({self._describe_position()}) is intact: continue from it with a lower rate, "
                f"e.g. `norga run --resume {directory} --set {error.setting}=...`")

    def _describe_position(self) -> str:
        at = self.position
        phases = self.method.phases(at.task) if at.task < self.num_tasks else []
        if at.phase >= len(phases):
            return f"task {at.task} finished" if at.phase == 0 else f"task {at.task + 1} trained, before its evaluation"
        name = phases[at.phase].name
        if at.epoch:
            return f"task {at.task + 1}, phase {name}, after epoch {at.epoch}"
        return f"task {at.task + 1}, before phase {name}"

    def _run_tasks(self) -> dict[str, AccuracyMatrix]:
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
                self.evaluate(task, self.matrices["accuracy"], self.matrices.get("task_identity"),
                              self.matrices.get("task_incremental"))
            self._commit_task(task)
            self.progress.result(evaluation_line(task, self.num_tasks, "", self.matrices["accuracy"],
                                                 self.matrices.get("task_identity")))
            for name in ("task_incremental", "task_identity"):  # per seen task, for log.txt
                if name in self.matrices:
                    self.progress.note(evaluation_line(task, self.num_tasks, name.replace("_", "-"),
                                                       self.matrices[name], summary=False))
            self.progress.task_committed(task)
        return self.matrices

    # ------------------------------------------------------------- evaluation
    def evaluate(self, task: int, matrix: AccuracyMatrix, identity: AccuracyMatrix | None = None,
                 within_task: AccuracyMatrix | None = None) -> None:
        """Accuracy on the test set of every task seen so far (all tasks in a joint run), after learning `task`
        (`evaluation.evaluate_seen_tasks`)."""
        evaluate_seen_tasks(self.context, self.method, task, self.config.eval.batch_size, matrix, identity,
                            within_task)


def open_run(
    built: BuiltRun,
    run_dir: Path | str,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    after_epoch: Callable[[Position], None] | None = None,
    dist: Distributed = SINGLE_PROCESS,
) -> Engine:
    """The engine of `built` (`build_run`) in a new run directory (written: its resolved config, environment) or
    in one to resume (state loaded and checked: it must belong to this run, config and data).

    ``built.records`` (backbone and benchmark provenance) go into environment.json with the software versions;
    ``built.init_generator`` initialises the method's parameters. In a distributed run (`dist`) every process calls
    this; only rank 0 writes the run directory. The directory is locked until the engine's `run` ends.
    """
    keep_freed_memory()  # every step's activations come back from the heap instead of as fresh pages
    failure = None
    if dist.is_main:
        try:
            directory = RunDirectory(Path(run_dir), create=not resume)
        except Exception as error:
            failure = error
    # the directory exists (or the main process failed, and every process stops) before the others look at it
    failed = dist.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if failed is not None:
        raise RuntimeError(f"the main process could not open {run_dir}: {failed}")
    if not dist.is_main:
        directory = RunDirectory(Path(run_dir), create=False, write=False)
    try:
        environment = {"device": str(built.device), "processes": dist.world_size, **built.records}
        if resume:
            directory.check_benchmark(built.records)
        engine = Engine(built, directory, progress, after_epoch, dist)
        if resume:
            engine.resume()
            if not directory.read_environment():  # killed before it was written
                directory.run_id = directory.run_id or uuid.uuid4().hex
                directory.write_environment(environment)
        else:  # once the method is built: a folder with a config.yaml is a run that `--resume` can continue
            directory.write_config(built.config)
            directory.write_environment(environment)
    except BaseException:
        if resume:
            directory.close()
        else:  # e.g. a setting the backbone cannot take: no run directory is left behind
            directory.discard()
        raise
    engine.progress.start({
        "run_dir": str(directory.path.resolve()), "method": built.config.method, "joint": engine.joint,
        "threads": torch.get_num_threads(), "processes": dist.world_size, "steps": engine.num_tasks,
        **built.records, "device": str(built.device),
        **({"resumed_at": engine.position.to_dict()} if resume else {}),
    })
    return engine


def run_experiment(*args, **kwargs) -> dict[str, AccuracyMatrix]:
    """Library entry point: run (or resume) one built experiment (the arguments are those of `open_run`), e.g.
    ``run_experiment(build_run(resolve_config(config)), run_dir)``; returns the run's matrices by name ("accuracy",
    "task_identity" where the method infers tasks, and the method's own, e.g. HiDe-Prompt's "before_tap")."""
    return open_run(*args, **kwargs).run()
