"""Trials as Ray tasks: one per free slot of `--cpus-per-trial` / `--gpus-per-trial`, on a local Ray instance or
an existing cluster (`--address`); a trial whose worker dies is retried by Ray (`max_retries`) and resumes its
run directory from the last checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from norga.config import ConfigError, RunConfig
from norga.engine.progress import Progress
from norga.sweep.directory import COMPLETE, FAILED, PENDING, RUNNING, SweepDirectory

INSTALL_HINT = "pip install 'norga[sweep]'"
#: Test hook, ``TRIAL_ID:MARKER[:TIMES]``: the worker of that trial SIGKILLs itself right after a task is
#: checkpointed, at most TIMES times (default 1) over all attempts; files MARKER.1, MARKER.2 ... record each kill.
KILL_HOOK = "NORGA_SWEEP_TEST_KILL"
POLL_SECONDS = 1.0
#: Each attempt of a trial leaves a file ATTEMPTS/<trial id>/<time>-<pid> (content: the node's address) in the
#: sweep directory before it starts; the driver counts them. (Not a Ray actor: a task blocked on a call to one
#: hands its CPUs back to Ray, which then starts one trial too many.)
ATTEMPTS = ".attempts"


def require_ray():
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"sweeps run their trials on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass
class Resources:
    """What each trial asks of Ray, and where Ray is."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None  # None: a local Ray instance sized to this machine
    max_retries: int = 2  # re-runs of a trial whose worker or node died (Python errors are not retried)

    def check(self) -> None:
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.max_retries < 0:
            raise ConfigError("--cpus-per-trial must be > 0, --gpus-per-trial and --max-retries >= 0")
        if self.gpus_per_trial > 1:
            raise ConfigError("--gpus-per-trial above 1 is not supported yet: give each trial one GPU, or run one "
                              "multi-GPU experiment with `torchrun --nproc_per_node=N -m norga run`")
        machine = len(os.sched_getaffinity(0))
        if self.address is None and self.cpus_per_trial > machine:
            raise ConfigError(f"--cpus-per-trial {self.cpus_per_trial:g} exceeds this machine's {machine} CPUs: "
                              "lower it, or join a cluster with bigger nodes via --address")

    @property
    def threads(self) -> int:
        """torch threads per trial: its CPU share, at least one."""
        return max(1, int(self.cpus_per_trial))


def start_ray(resources: Resources):
    """Join the cluster at `resources.address`, or start a local instance with this machine's CPUs."""
    import logging

    ray = require_ray()
    if resources.address:
        ray.init(address=resources.address, logging_level=logging.WARNING)
        available = ray.cluster_resources()
        if resources.cpus_per_trial > available.get("CPU", 0) or resources.gpus_per_trial > available.get("GPU", 0):
            print(f"warning: the cluster has {available.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} GPUs "
                  "now; trials wait until a node with their share joins", file=sys.stderr)
    else:
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level=logging.WARNING)
    return ray


def run_trials(directory: SweepDirectory, configs: dict[str, RunConfig], resources: Resources) -> None:
    """Run the trials named by `configs` (id -> resolved config) as Ray tasks and record each outcome in the
    manifest as it arrives; returns when every one has finished or failed."""
    ray = start_ray(resources)
    task = ray.remote(_run_trial).options(num_cpus=resources.cpus_per_trial, num_gpus=resources.gpus_per_trial,
                                          max_retries=resources.max_retries, retry_exceptions=False)
    pending = {task.remote(trial_id, config, str(directory.run_dir(directory.trial(trial_id))), resources.threads):
               trial_id for trial_id, config in configs.items()}
    print(f"{len(pending)} trials submitted to Ray ({resources.cpus_per_trial:g} CPUs, "
          f"{resources.gpus_per_trial:g} GPUs each; {ray.cluster_resources().get('CPU', 0):g} CPUs in the cluster)",
          file=sys.stderr, flush=True)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            _record_starts(directory, pending.values())  # before the outcomes: their attempts are counted
            for ref in done:
                _record_outcome(directory, pending.pop(ref), ref, ray)
    finally:
        for trial_id in pending.values():  # interrupted (Ctrl-C): the next --resume runs them again
            if directory.trial(trial_id)["status"] == RUNNING:
                directory.update(trial_id, status=PENDING, error="the sweep stopped before this trial finished")
        ray.shutdown()


def _record_starts(directory: SweepDirectory, trial_ids) -> None:
    """Trials with attempt files the manifest has not counted yet are running (again). A worker writes its
    attempt file atomically: the hidden temporary file beside it is not an attempt yet."""
    for trial_id in trial_ids:
        folder = directory.path / ATTEMPTS / trial_id
        attempts = sorted(path for path in folder.iterdir() if not path.name.startswith(".")) \
            if folder.is_dir() else []
        if len(attempts) <= directory.trial(trial_id)["attempts"]:
            continue
        pid, node = int(attempts[-1].name.split("-")[1]), attempts[-1].read_text()
        directory.update(trial_id, status=RUNNING, attempts=len(attempts), worker={"pid": pid, "node": node})
        print(f"started  {trial_id} (attempt {len(attempts)}, pid {pid} on {node})", file=sys.stderr, flush=True)


def _record_outcome(directory: SweepDirectory, trial_id: str, ref, ray) -> None:
    entry = directory.trial(trial_id)
    try:
        outcome = ray.get(ref)
    except ray.exceptions.RayTaskError as error:  # a Python error in the trial: not retried
        cause = error.cause if getattr(error, "cause", None) is not None else error
        message = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
        directory.update(trial_id, status=FAILED, error=message)
        print(f"{trial_id}: {error}", file=sys.stderr)  # the worker's traceback
    except ray.exceptions.RayError as error:  # worker or node died, retries used up
        first_line = (str(error).strip().splitlines() or [""])[0]
        directory.update(trial_id, status=FAILED,
                         error=f"{type(error).__name__} after {entry['attempts']} attempts: {first_line}")
    else:
        if directory.run_is_complete(entry):
            seconds = outcome["wall_seconds"] if outcome["wall_seconds"] is not None else entry.get("wall_seconds")
            directory.update(trial_id, status=COMPLETE, error=None, wall_seconds=seconds, run_status=outcome["status"])
        else:
            directory.update(trial_id, status=FAILED, error=(
                f"the trial returned but {directory.run_dir(entry) / 'results.json'} is not complete here: the sweep "
                "directory must be on a file system every node mounts at the same path"))
    entry = directory.trial(trial_id)
    detail = f"in {entry['wall_seconds']:.1f} s" if entry["status"] == COMPLETE and entry["wall_seconds"] else \
        (entry["error"] or "")
    print(f"{entry['status']:8s} {trial_id} {detail}", file=sys.stderr, flush=True)


def _run_trial(trial_id: str, config: RunConfig, run_dir: str, threads: int) -> dict[str, Any]:
    """Inside a Ray worker: one trial through `norga compare`'s code path (resumes from its checkpoint)."""
    import ray
    import torch

    from norga.comparison import MethodRun, run_method
    from norga.storage import write_text

    torch.set_num_threads(threads)
    attempt = Path(run_dir).parent / ATTEMPTS / trial_id / f"{time.time_ns():020d}-{os.getpid()}"
    write_text(ray.util.get_node_ip_address(), attempt)
    result = run_method(MethodRun(trial_id, config, Path(run_dir)), progress=_progress(trial_id))
    finished_earlier = result.status == "finished earlier"
    return {"status": result.status, "wall_seconds": None if finished_earlier else result.wall_seconds}


def _progress(trial_id: str) -> Progress:
    target, _, rest = os.environ.get(KILL_HOOK, "").partition(":")
    marker, _, times = rest.partition(":")
    return KillAfterTask(marker, int(times or 1)) if target == trial_id and marker else Progress("off")


class KillAfterTask(Progress):
    """`KILL_HOOK`'s progress: after each committed task, while fewer than `times` marker files exist, it creates
    the next one and SIGKILLs this process (a worker dying mid-trial)."""

    def __init__(self, marker: str, times: int) -> None:
        super().__init__("off")
        self.marker, self.times = marker, times

    def task_committed(self, task: int) -> None:
        for kill in range(1, self.times + 1):
            try:
                os.close(os.open(f"{self.marker}.{kill}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os.kill(os.getpid(), signal.SIGKILL)
