"""The sweep directory: `sweep.yaml` (the resolved request), `manifest.json` (every trial and its status), one
run directory per trial, and a lock held while a `norga sweep` process runs trials in it."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from norga.config import ConfigError
from norga.storage import load_json, write_json, write_text
from norga.sweep.spec import SweepSpec, Trial

SWEEP_YAML, MANIFEST, LOCK = "sweep.yaml", "manifest.json", ".lock"
PENDING, RUNNING, COMPLETE, FAILED = "pending", "running", "complete", "failed"


class SweepDirectory:
    """Reads and writes a sweep directory; only the process holding `lock()` runs trials and edits the manifest."""

    def __init__(self, path: Path, spec: SweepSpec, manifest: dict[str, Any]) -> None:
        self.path, self.spec, self.manifest = Path(path), spec, manifest

    # ------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path, spec: SweepSpec, trials: Sequence[Trial], methods: Sequence[str],
               seeds: Sequence[int]) -> SweepDirectory:
        """A new sweep directory; it must not exist (created exclusively, so two sweeps never share one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists: continue that sweep with `norga sweep --resume {path}` "
                                  "or choose another --dir") from None
        entries = [{"id": trial.id, "assignment": trial.assignment, "method": method, "seed": seed,
                    "benchmark": trial.source(spec), "setting": trial.setting, "run_dir": trial.id,
                    "status": PENDING, "attempts": 0, "error": None, "wall_seconds": None}
                   for trial, method, seed in zip(trials, methods, seeds, strict=True)]
        directory = cls(path, spec, {"version": 1, "trials": entries})
        try:
            write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False), path / SWEEP_YAML)
            directory.save()
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)  # nothing half-written
            raise
        return directory

    @classmethod
    def open(cls, path: Path) -> SweepDirectory:
        """An existing sweep directory (for `--resume` and `--report`)."""
        path = Path(path)
        if not (path / MANIFEST).is_file() or not (path / SWEEP_YAML).is_file():
            raise FileNotFoundError(f"{path} holds no {MANIFEST} and {SWEEP_YAML}: not a sweep directory "
                                    "(start one with `norga sweep SPEC.yaml`)")
        spec = SweepSpec.from_dict(yaml.safe_load((path / SWEEP_YAML).read_text()), str(path / SWEEP_YAML))
        return cls(path, spec, load_json(path / MANIFEST))

    @staticmethod
    def free_name(parent: Path, stem: str) -> Path:
        """`parent/stem`, or `stem-2`, `stem-3` ... when taken (default names of sweeps started the same second)."""
        candidate, number = Path(parent) / stem, 1
        while candidate.exists():
            number += 1
            candidate = Path(parent) / f"{stem}-{number}"
        return candidate

    # ---------------------------------------------------------------- state
    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.manifest["trials"]

    def trial(self, trial_id: str) -> dict[str, Any]:
        return next(entry for entry in self.trials if entry["id"] == trial_id)

    def run_dir(self, entry: dict[str, Any]) -> Path:
        return self.path / entry["run_dir"]

    def update(self, trial_id: str, **fields: Any) -> None:
        """Change one trial's entry and rewrite the manifest atomically."""
        self.trial(trial_id).update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.manifest, self.path / MANIFEST)

    def run_is_complete(self, entry: dict[str, Any]) -> bool:
        """A trial counts only when its run record says it finished every task."""
        results = self.run_dir(entry) / "results.json"
        return results.is_file() and bool(load_json(results).get("complete"))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Held while trials run: a second `norga sweep --resume` of the same directory is refused."""
        with open(self.path / LOCK, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another sweep (norga) is running in {self.path}: wait for it, or stop it "
                                  "first") from None
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
