"""Several methods on one benchmark: each into its own run directory, then one table, one plot, one record.

A comparison directory holds ``compare.json`` (the request and a row per method), ``compare.csv``,
``compare.png`` (average accuracy after each task, a line per method) and one run directory per method.
It is resumable: a method whose run finished is skipped, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from norga.config import ConfigError, RunConfig
from norga.config_io import load_config
from norga.engine.run_lock import LOCK_FILE
from norga.metrics import AccuracyMatrix, MethodResult
from norga.storage import atomic_write, load_json, write_json

COMPARE_JSON, COMPARE_CSV, COMPARE_PLOT = "compare.json", "compare.csv", "compare.png"
#: What a run directory holds before its first checkpoint; such a directory can safely be started again.
NO_PROGRESS_FILES = {"config.yaml", "environment.json", "log.txt", LOCK_FILE}


def method_config(source: str | Path, method: str, overrides: Sequence[str] = (), method_overrides: Sequence[str] = (),
                  joint: bool = False) -> RunConfig:
    """The config of `method` on a preset or YAML file: shared `overrides`, then the method, then ``data.joint``,
    then `method_overrides` (which win). The method reads its own section of the file (its defaults where the
    file has none); shared overrides into other methods' sections do not apply to it."""
    from norga.methods import method_names

    if method not in method_names():
        from norga.config_io import _suggest

        raise ConfigError(f"unknown method {method!r}{_suggest(method, method_names())}; registered: "
                          f"{', '.join(sorted(method_names()))}")
    if any(o.partition("=")[0].strip() == "method" for o in overrides):
        raise ConfigError("--set method=... conflicts with --methods: list the methods in --methods")
    joint_setting = ["data.joint=true"] if joint else []
    return load_config(source, [*overrides, f"method={method}", *joint_setting, *method_overrides], other_sections=True)


@dataclass
class MethodRun:
    """One entry of a comparison: a label, its resolved config and its run directory."""

    label: str
    config: RunConfig
    run_dir: Path


def read_result(run: MethodRun, status: str, wall_seconds: float | None) -> MethodResult:
    """The row of a finished run, from the metrics its run directory stores."""
    results = load_json(run.run_dir / "results.json")
    if not results.get("complete"):
        raise RuntimeError(f"{run.run_dir / 'results.json'} is not complete after the run finished")
    return MethodResult(run.label, results["method"], results.get("joint", False), results["metrics"],
                        results["task_identity_accuracy"], results.get("task_incremental_accuracy"),
                        AccuracyMatrix.from_dict(results["matrices"]["accuracy"]),
                        run.run_dir, status, wall_seconds, results.get("gates", []))


def run_method(run: MethodRun, progress=None, previous_seconds: float | None = None) -> MethodResult:
    """Run `run` into its directory, resume it if interrupted, or skip it if it finished (same config only).

    Its config is resolved once (`resolve_config`); that resolved config is compared with the one the directory
    records, and is the one built and run.
    """
    from norga.engine.build import build_run
    from norga.engine.loop import run_experiment
    from norga.engine.resolve import resolve_config

    directory = run.run_dir
    stored = _stored_config(directory)
    resolved = resolve_config(_with_recorded_root(run.config, stored))
    resume = _check_existing(directory, stored, resolved.config)
    if resume and _finished(directory):
        return read_result(run, "finished earlier", previous_seconds)
    start = time.perf_counter()
    run_experiment(build_run(resolved), directory, resume=resume, progress=progress)
    return read_result(run, "resumed" if resume else "ran", time.perf_counter() - start)


def run_methods(runs: Sequence[MethodRun], jobs: int = 1, quiet: bool = False,
                previous_seconds: Callable[[str], float | None] = lambda label: None,
                on_result: Callable[[list[MethodResult]], None] = lambda finished: None) -> list[MethodResult]:
    """`run_method` for each of `runs`, `jobs` at a time; their results in the order of `runs`.

    One job runs them here, one after another, with bars unless `quiet`. More run each in its own process
    (nothing of this process's state is inherited: `_worker_context`) with this machine's CPUs shared between them
    (`threads_per_job`) and timestamped lines, since bars of several processes would overwrite each other. Small
    models use a thread poorly (the quickstart's batches of 16), so parallel runs finish sooner than the same runs
    in turn; the results are those of the same runs in turn. `on_result` gets the results finished so far, in
    the order of `runs`, after each run.
    """
    from norga.engine.progress import Progress

    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1 or len(runs) == 1:
        results = []
        for run in runs:
            results.append(run_method(run, Progress.for_command(quiet, run.label), previous_seconds(run.label)))
            on_result(results)
        return results
    return _run_in_processes(runs, min(jobs, len(runs)), previous_seconds, on_result)


def threads_per_job(jobs: int) -> int:
    """torch threads for each of `jobs` runs sharing this machine: its CPUs divided among them, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // jobs)


def _run_in_processes(runs: Sequence[MethodRun], jobs: int, previous_seconds: Callable[[str], float | None],
                      on_result: Callable[[list[MethodResult]], None]) -> list[MethodResult]:
    """`run_methods` with `jobs` worker processes. The first failure cancels the runs not yet started and is raised
    here once the runs under way have finished (each is in its run directory, resumable like any run)."""
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    from norga.engine.resolve import resolve_config

    for run in runs:  # every config checked, and data found (or downloaded, once) before any process starts
        resolve_config(_with_recorded_root(run.config, _stored_config(run.run_dir)))
    threads = threads_per_job(jobs)
    print(f"{len(runs)} runs, {jobs} at a time with {threads} thread{'s' * (threads != 1)} each (--jobs 1: one after "
          "another)", file=sys.stderr, flush=True)
    results: dict[int, MethodResult] = {}
    with ProcessPoolExecutor(jobs, mp_context=_worker_context()) as pool:
        pending = {pool.submit(_run_method_in_process, run, threads, previous_seconds(run.label)): index
                   for index, run in enumerate(runs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                index = pending.pop(future)
                if future.exception() is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise future.exception()
                results[index] = future.result()
            on_result([results[index] for index in sorted(results)])
    return [results[index] for index in range(len(runs))]


#: what every worker needs, imported once by the fork server instead of once per worker (about 4 s of CPU each)
WORKER_PRELOAD = ["norga.comparison", "norga.engine.build", "norga.engine.loop", "norga.methods"]


def _worker_context():
    """Fresh worker processes that inherit nothing of this one: forked from a fork server that has imported
    `WORKER_PRELOAD` (Linux, macOS), else spawned."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def _run_method_in_process(run: MethodRun, threads: int, previous_seconds: float | None) -> MethodResult:
    """Inside a worker process of `run_methods`: `run` at `threads` torch threads, with timestamped lines."""
    import torch

    from norga.engine.progress import Progress

    torch.set_num_threads(threads)
    return run_method(run, Progress.for_command(True, run.label), previous_seconds)


def _stored_config(directory: Path) -> RunConfig | None:
    """The config.yaml of the run in `directory`, if it has one."""
    return load_config(directory / "config.yaml") if (directory / "config.yaml").is_file() else None


def _with_recorded_root(config: RunConfig, stored: RunConfig | None) -> RunConfig:
    """`config`, reading its data where the stored run found it when `config` names no data root: resuming needs
    no NORGA_DATA. A copy; `config` is left as it is."""
    if stored is None or config.data.root is not None:
        return config
    return replace(config, data=replace(config.data, root=stored.data.root))


def _finished(directory: Path) -> bool:
    """Whether the run's state says every task is committed and results.json holds exactly its matrices.

    Anything less (a crash between a task's files and its commit, a stale or missing results.json) resumes
    the run, which completes or rewrites what is missing.
    """
    from norga.storage import load_checkpoint

    results_path, state_path = directory / "results.json", directory / "state.pt"
    if not results_path.is_file() or not state_path.is_file():
        return False
    state = load_checkpoint(state_path)
    steps = len(state["matrices"]["accuracy"]["correct"][0])  # training steps: the matrix's columns (1 when joint)
    results = load_json(results_path)
    return (state["position"] == {"task": steps, "phase": 0, "epoch": 0} and bool(results.get("complete"))
            and results.get("matrices") == state["matrices"])


def _check_existing(directory: Path, stored: RunConfig | None, resolved: RunConfig) -> bool:
    """True when `directory` holds progress of the `resolved` config to continue from; False to start afresh."""
    if not directory.exists() or not any(directory.iterdir()):
        return False
    if stored is not None and stored != resolved:
        from norga.engine.resume_changes import config_differences

        changed = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in
                   config_differences(stored.to_dict(), resolved.to_dict()).items()]
        raise ConfigError(f"{directory} was run with other settings ({', '.join(changed)}): "
                          "use a new comparison directory, or delete that run to redo it")
    if (directory / "state.pt").is_file():
        return True
    entries = {entry.name for entry in directory.iterdir()}
    if entries <= NO_PROGRESS_FILES:  # interrupted before its first checkpoint: nothing to lose
        for name in entries:
            (directory / name).unlink()
        return False
    raise FileExistsError(f"{directory} holds files but no checkpoint to resume: move it away or delete it")


class ComparisonDirectory:
    """The comparison's own files; `request` (what was asked) must match when an existing one is continued.

    Used as a context manager it holds the directory's lock (`RunLock`) meanwhile: a second `norga compare`
    on it stops with the holder's pid and host instead of training the same method again.
    """

    def __init__(self, path: Path, request: dict[str, Any]) -> None:
        self.path = Path(path)
        self.request = request
        self.previous: dict[str, dict] = {}
        self._lock = None
        record = self.path / COMPARE_JSON
        if record.is_file():
            stored = load_json(record)
            if stored["request"] != request:
                raise ConfigError(f"{self.path} holds a comparison of another request ({stored['request']}): "
                                  f"continue it with `norga compare --resume {self.path}` or choose a new --dir")
            self.previous = {row["label"]: row for row in stored["results"]}
        elif self.path.exists() and any(entry.name != LOCK_FILE for entry in self.path.iterdir()):
            raise FileExistsError(f"{self.path} exists and is not a comparison directory: choose a new --dir")
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ComparisonDirectory:
        from norga.engine.run_lock import RunLock

        self._lock = RunLock(self.path, "comparison directory")
        if not (self.path / COMPARE_JSON).is_file():  # from now on `norga compare --resume` can continue it
            write_json({"request": self.request, "complete": False, "results": []}, self.path / COMPARE_JSON)
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @staticmethod
    def read_request(path: Path) -> dict[str, Any]:
        record = Path(path) / COMPARE_JSON
        if not record.is_file():
            raise FileNotFoundError(f"{path} holds no {COMPARE_JSON}: not a comparison that can be resumed")
        return load_json(record)["request"]

    def previous_seconds(self, label: str) -> float | None:
        return self.previous.get(label, {}).get("wall_seconds")

    def write(self, results: Sequence[MethodResult], complete: bool, title: str | None = None) -> None:
        """compare.json, compare.csv and compare.png (titled `title`) for the methods finished so far (atomic
        writes)."""
        from norga.report import plot_comparison

        write_json({"request": self.request, "complete": complete, "results": [r.to_dict() for r in results]},
                   self.path / COMPARE_JSON)
        atomic_write(self.path / COMPARE_CSV, lambda tmp: _write_csv(results, tmp))
        plot_comparison(results, self.path / COMPARE_PLOT, title)


CSV_METRICS = ("final_average_accuracy", "sample_weighted_final_accuracy", "cumulative_average_accuracy",
               "forgetting", "backward_transfer")


def _write_csv(results: Sequence[MethodResult], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "method", "joint", *CSV_METRICS, "task_identity_accuracy",
                         "task_incremental_accuracy", "wall_seconds", "status", "run_dir"])
        for r in results:
            values = [r.metrics.get(name) for name in CSV_METRICS] + [r.task_identity_accuracy,
                                                                       r.task_incremental_accuracy, r.wall_seconds]
            writer.writerow([r.label, r.method, r.joint, *("" if v is None else f"{v:.4f}" for v in values), r.status,
                             str(r.run_dir)])
