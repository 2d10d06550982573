"""What a run shows while it runs: a start banner, then either a bar per epoch over its batches (with rate and
ETA, on a terminal) or plain timestamped lines, one per epoch and per evaluation (not a terminal, ``--quiet``:
CI logs). Every line also goes to the "norga" logger, so the run's log.txt reads the same way.

The engine declares what runs (`Progress.phase`); the run context passes every batch iterable through
`Progress.batches`, which is where the bars move.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO, TypeVar

from tqdm import tqdm

from norga.engine.banner import format_banner, run_title

log = logging.getLogger("norga")
T = TypeVar("T")

MODES = ("auto", "bars", "lines", "off")


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``, ``3 batches``."""
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith(('sh', 'tch')) else 's'}"


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PhaseTracker:
    """One phase of one task (or an evaluation) while it runs: its epochs, their durations, batches counted."""

    def __init__(self, progress: Progress, description: str, epochs: int, first_epoch: int,
                 summary: bool = True) -> None:
        self.progress = progress
        self.summary = summary  # a closing line in bars mode (evaluations have their own result line instead)
        self.description = description
        self.epochs = epochs
        self.epoch = first_epoch  # the epoch under way (0-based)
        self.first_epoch = first_epoch
        self.started = self.epoch_started = time.perf_counter()
        self.batches = self.epoch_batches = 0
        self.epoch_seconds: list[float] = []
        self.last_logs: dict = {}
        self.epoch_bar: tqdm | None = None  # bars mode, phases whose batches the run context never sees

    @property
    def label(self) -> str:
        """What a bar or line says: the phase, and the epoch when it trains."""
        if self.epochs:
            return f"{self.description} epoch {min(self.epoch, self.epochs - 1) + 1}/{self.epochs}"
        return self.description

    def seconds_left(self) -> float | None:
        """The phase's remaining time from the mean epoch so far (None before the first epoch ends)."""
        if not self.epoch_seconds:
            return None
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        return max(0.0, mean * (self.epochs - self.epoch) - (time.perf_counter() - self.epoch_started))

    def epoch_done(self, epoch: int, logs: dict) -> None:
        """Called after every finished epoch with its logs (e.g. the loss)."""
        now = time.perf_counter()
        seconds = now - self.epoch_started
        self.epoch_seconds.append(seconds)
        self.epoch, self.epoch_started, self.last_logs = epoch + 1, now, dict(logs)
        left = self.seconds_left()
        values = format_logs(logs)
        work = f"{plural(self.epoch_batches, 'batch')} in " if self.epoch_batches else ""
        rate = f" ({self.epoch_batches / seconds:.1f} batches/s)" if seconds > 0 and self.epoch_batches else ""
        eta = f", phase done in ~{clock(left)}" if left is not None and epoch + 1 < self.epochs else ""
        self.progress._event(f"{self.description} epoch {epoch + 1}/{self.epochs}  {values}  "
                             f"{work}{seconds:.1f} s{rate}{eta}", bars=False)
        if not self.epoch_batches:  # e.g. TAP on sampled features: no batch bar moved, so a bar over epochs does
            self.progress._epoch_tick(self)
        self.epoch_batches = 0

    def finished(self) -> None:
        """In bars mode, the line that stays once the bars are gone: a training phase's epochs, time and last
        logs, or a step's batches and time (lines mode already has a line per epoch)."""
        seconds = time.perf_counter() - self.started
        ran = self.epoch - self.first_epoch
        if self.epoch_bar is not None:
            self.epoch_bar.close()
        if self.epochs and ran:
            values = format_logs(self.last_logs)
            self.progress._event(f"{self.description}: {plural(ran, 'epoch')} in {seconds:.1f} s  {values}",
                                 lines=False, logged=True)
        elif not self.epochs:  # steps and evaluations: their time in log.txt; on the stream in bars mode
            work = f"{plural(self.batches, 'batch')} in " if self.batches else ""
            self.progress._event(f"{self.description}: {work}{seconds:.1f} s", lines=False,
                                 bars=bool(self.batches and self.summary), logged=True)


class Progress:
    """Shows a run's progress on `stream` (stderr) in one of `MODES`.

    ``auto``: bars on a terminal, plain lines otherwise; ``lines``: plain timestamped lines (``--quiet``);
    ``off``: nothing on the stream (the log file still gets the lines). `label` names the method in every bar
    and line (default: the config's method name); the benchmark is added from the run's facts (`start`).
    """

    def __init__(self, mode: str = "auto", label: str | None = None, stream: TextIO | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, not {mode!r}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bars" if _is_terminal(self.stream) else "lines"
        self.mode = mode
        self.label = label
        self.prefix = label or ""
        self._phase: PhaseTracker | None = None

    @classmethod
    def for_command(cls, quiet: bool, label: str | None = None, enabled: bool = True) -> Progress:
        """What a CLI command shows: lines with ``--quiet``, else bars on a terminal; nothing when not `enabled`
        (the other processes of a distributed run)."""
        return cls("off" if not enabled else "lines" if quiet else "auto", label)

    # ---------------------------------------------------------------- banner
    def start(self, facts: dict) -> None:
        """Print the start banner of a run (see `banner.format_banner`) and name its bars after it."""
        self.prefix = run_title(facts, self.label)
        header, *rest = format_banner(facts, self.label)
        self._event(header, prefix=False)
        for line in rest:
            self._event(line, prefix=False, stamp=False)

    # ---------------------------------------------------------------- phases
    @contextmanager
    def phase(self, task: int, num_tasks: int, name: str, epochs: int = 0, first_epoch: int = 0,
              summary: bool = True):
        """Track phase `name` of task `task` (0-based) while the body runs; yields its `PhaseTracker`."""
        tracker = PhaseTracker(self, f"task {task + 1}/{num_tasks} {name}", epochs, first_epoch, summary)
        outer, self._phase = self._phase, tracker
        try:
            yield tracker
        finally:
            self._phase = outer
        tracker.finished()

    def batches(self, items: Sequence[T]) -> Iterator[T]:
        """`items` one by one, counted (and, in bars mode, shown as a bar) when each is done."""
        tracker = self._phase
        bar = None
        if self.mode == "bars" and len(items):
            bar = tqdm(total=len(items), desc=self._bar_label(tracker), unit="batch", leave=False, file=self.stream,
                       dynamic_ncols=True, mininterval=0.5)
            postfix = self._bar_postfix(tracker)
            if postfix:
                bar.set_postfix_str(postfix, refresh=False)
        try:
            for item in items:
                yield item
                if tracker is not None:
                    tracker.batches += 1
                    tracker.epoch_batches += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def _epoch_tick(self, tracker: PhaseTracker) -> None:
        """Move the bar over a phase's epochs (created at its first finished epoch)."""
        if self.mode != "bars":
            return
        if tracker.epoch_bar is None:  # shown at once with the epochs done so far
            tracker.epoch_bar = tqdm(total=tracker.epochs, initial=tracker.epoch, unit="epoch", leave=False,
                                     desc=" · ".join(filter(None, [self.prefix, tracker.description])),
                                     file=self.stream, dynamic_ncols=True, mininterval=0.5,
                                     postfix=self._bar_postfix(tracker))
            return
        tracker.epoch_bar.set_postfix_str(self._bar_postfix(tracker), refresh=False)
        tracker.epoch_bar.update(1)

    def _bar_label(self, tracker: PhaseTracker | None) -> str:
        parts = [self.prefix] if self.prefix else []
        return " · ".join(parts + ([tracker.label] if tracker else []))

    @staticmethod
    def _bar_postfix(tracker: PhaseTracker | None) -> str:
        if tracker is None:
            return ""
        values = [format_logs({key: value}) for key, value in tracker.last_logs.items()]
        left = tracker.seconds_left()
        if left is not None and tracker.epochs:
            values.append(f"phase ~{clock(left)} left")
        return ", ".join(values)

    # ----------------------------------------------------------------- lines
    def result(self, line: str) -> None:
        """A line that stays in every mode (an evaluation's accuracies)."""
        self._event(line)

    def write(self, line: str) -> None:
        """A line that stays in every mode (kept for callers that print notes)."""
        self._event(line)

    def task_committed(self, task: int) -> None:
        """Called once task `task` (0-based) is learnt, evaluated and on disk; shows nothing (a hook for
        subclasses)."""

    def note(self, line: str) -> None:
        """A line for log.txt only (details a reader needs afterwards that the stream leaves out)."""
        self._event(line, bars=False, lines=False, logged=True)

    def _event(self, text: str, *, bars: bool = True, lines: bool = True, prefix: bool = True,
               stamp: bool = True, logged: bool | None = None) -> None:
        """`text` to the stream where this mode shows it (`bars` / `lines`), and to the log file as in lines mode
        (or where `logged` says)."""
        line = f"{self.prefix} · {text}" if prefix and self.prefix else text
        if lines if logged is None else logged:  # log.txt reads like the plain lines
            log.info(line)
        if self.mode == "bars" and bars:
            tqdm.write(line, file=self.stream)
        elif self.mode == "lines" and lines:
            print(f"{timestamp()} {line}" if stamp else line, file=self.stream, flush=True)


@contextmanager
def warnings_logged(logger: logging.Logger) -> Iterator[None]:
    """Every Python warning shown while the body runs also goes to `logger` (the run's log.txt), as
    ``WARNING UserWarning: message (file:line)``; it is still shown where it would have been."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        logger.warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def format_logs(logs: dict) -> str:
    """An epoch's logs for a line: ``loss 0.1234  lr 0.015`` (a list: one value per parameter group)."""
    def number(key: str, value: float) -> str:
        return f"{float(value):.3g}" if key == "lr" else f"{float(value):.4f}"

    def values(key: str, value) -> str:
        return ",".join(number(key, v) for v in value) if isinstance(value, list) else number(key, value)

    return "  ".join(f"{key} {values(key, value)}" for key, value in logs.items())


def evaluation_line(task: int, num_tasks: int, stage: str, matrix, identity=None, summary: bool = True) -> str:
    """``task 2/5 evaluated[ STAGE]: accuracy 77.0 11.0 | FA 44.00  CA 59.00  FFM 0.00  task-id 60.00`` from an
    `AccuracyMatrix` (with `summary`: CA and FFM too, and task identity when the task-identity matrix is given);
    metrics that are undefined print as ``—``."""
    def metric(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    rows = matrix.tested(task)
    accuracies = " ".join(f"{value:.1f}" for value in matrix.accuracies()[:rows, task])
    text = f"task {task + 1}/{num_tasks} evaluated{' ' + stage if stage else ''}: accuracy {accuracies} | " \
           f"FA {metric(matrix.final_average_accuracy(task))}"
    if not summary:
        return text
    text += f"  CA {metric(matrix.cumulative_average_accuracy(task))}  FFM {metric(matrix.forgetting(task))}"
    return text if identity is None else f"{text}  task-id {metric(identity.final_average_accuracy(task))}"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
