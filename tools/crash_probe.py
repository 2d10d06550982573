"""Kill a real run at every checkpoint write and phase boundary, resume it, and compare with an uninterrupted run.

    NORGA_DATA=../shared/data python tools/crash_probe.py                 # tiny_smoke, 2 tasks (see PROBE_SETTINGS)
    python tools/crash_probe.py --set data.num_tasks=3 --events write,phase --out /tmp/probe

First an uninterrupted `norga run` lists its kill points (``NORGA_KILL_TRACE``, `norga.kill_points`):
every atomic write (``write``: right after the rename; ``tmp``: the temporary file complete, not renamed) and
every phase boundary (``phase``: a phase finished, its checkpoint not yet written). Then for each point a fresh
run is started with ``NORGA_KILL_AT=EVENT:N``, so that it SIGKILLs itself there, exactly like `kill -9`, and is
resumed with ``norga run --resume`` (or, killed before its config.yaml existed, started again into the same
directory). Its results.json (no field left out: it holds no times or paths) and every matrix CSV must then be
byte-identical to the uninterrupted run's; every checkpoints/taskK.pt must load and hold the same state (all
but the run id); no temporary file or lock may be left. One table row per kill point; exit 1 if any failed.
Every run is a process forked from the probe (torch and timm are imported once, before any run starts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from norga import cli
from norga import kill_points
from norga.engine.run_dir import RunDirectory  # noqa: F401 - imports timm and the engine once, before forking

PROBE_SETTINGS = ["data.num_tasks=2", "data.train_per_class=10", "data.test_per_class=20"]
COMPARED = ("results.json", "accuracy_matrix.csv", "before_tap_matrix.csv", "task_identity_matrix.csv",
            "task_incremental_matrix.csv")


@dataclass
class Outcome:
    """How a `norga` process ended: its exit code, or the signal that killed it, and what it wrote to stderr."""

    code: int | None
    signal: int | None
    stderr: str


def norga(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Outcome:
    """`norga ARGS` in a child process forked from this one (torch is imported once, here), with `env` set.

    The child is a real process: a kill point SIGKILLs it, however far it got.
    """
    log = log or Path(tempfile.mkstemp(prefix="crash_probe-", suffix=".err")[1])
    sys.stdout.flush()  # a child must not inherit (and repeat) what the probe has yet to print
    pid = os.fork()
    if pid == 0:  # the child: run the command line, never return into the probe
        code = 1
        try:
            os.environ.update({"HF_HUB_OFFLINE": "1", **(env or {})})
            kill_points.configure()
            with open(os.devnull, "w") as quiet, open(log, "w") as errors:
                os.dup2(quiet.fileno(), 1)
                os.dup2(errors.fileno(), 2)
                sys.stdout, sys.stderr = quiet, errors
                try:
                    code = cli.main(args)
                except BaseException:  # noqa: BLE001 - reported like an uncaught error: traceback, exit 1
                    traceback.print_exc()
                sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    stderr = log.read_text()
    log.unlink(missing_ok=True)
    if os.WIFSIGNALED(status):
        return Outcome(None, os.WTERMSIG(status), stderr)
    return Outcome(os.WEXITSTATUS(status), None, stderr)


def list_kill_points(run_args: list[str], directory: Path) -> list[tuple[str, str]]:
    """Run uninterrupted into `directory`; (EVENT:N, what it concerns) of every kill point it passed."""
    trace = directory.parent / "kill_trace.txt"
    result = norga([*run_args, "--run-dir", str(directory)], {"NORGA_KILL_TRACE": str(trace)})
    if result.code != 0:
        sys.exit(f"the uninterrupted run failed:\n{result.stderr}")
    points = []
    for line in trace.read_text().splitlines():
        point, _, detail = line.partition(" ")
        points.append((point, detail.replace(str(directory) + "/", "")))
    return points


def same_state(a, b) -> bool:
    """Equal nested checkpoint content, ignoring the run record (each run has its own id)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (a.keys() | b.keys()) - {"run"}
        return all(k in a and k in b and same_state(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def compare(directory: Path, reference: Path) -> list[str]:
    """What differs from the uninterrupted run (empty: nothing)."""
    problems = [name for name in COMPARED if (directory / name).read_bytes() != (reference / name).read_bytes()]
    for expected in sorted((reference / "checkpoints").glob("task*.pt")):
        mine = directory / "checkpoints" / expected.name
        try:
            ok = same_state(torch.load(mine, weights_only=True), torch.load(expected, weights_only=True))
        except Exception as error:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{expected.name} does not load ({type(error).__name__})")
            continue
        if not ok:
            problems.append(f"{expected.name} differs")
    leftovers = [p.name for p in directory.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    return problems + [f"left {name}" for name in leftovers]


def probe(point: str, run_args: list[str], directory: Path, reference: Path) -> tuple[str, str]:
    """Kill a fresh run at `point`, continue it, compare: (how it was continued, outcome)."""
    killed = norga([*run_args, "--run-dir", str(directory)], {"NORGA_KILL_AT": point})
    if killed.signal != signal.SIGKILL:
        return "-", f"FAIL: not killed (exit {killed.code}) {killed.stderr.strip()[-200:]}"
    if (directory / "config.yaml").is_file():
        how, again = "resume", norga(["run", "--resume", str(directory), "--quiet"])
    else:
        how, again = "restart", norga([*run_args, "--run-dir", str(directory)])
    if again.code != 0:
        return how, f"FAIL: exit {again.code}: {again.stderr.strip()[-300:]}"
    problems = in_child(compare, directory, reference)  # no torch work in the probe itself: it forks every run
    return how, "identical" if not problems else "FAIL: " + "; ".join(problems)


def in_child(function, *args):
    """``function(*args)`` (a JSON-able result) computed in a forked child."""
    handle, path = tempfile.mkstemp(prefix="crash_probe-", suffix=".json")
    os.close(handle)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            Path(path).write_text(json.dumps(function(*args)))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    result = json.loads(Path(path).read_text()) if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else [
        f"the comparison itself failed (status {status})"]
    os.unlink(path)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny_smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"config overrides (default: {' '.join(PROBE_SETTINGS)})")
    parser.add_argument("--events", default="write,tmp,phase", help="which kill points: write, tmp, phase")
    parser.add_argument("--tmp-stride", type=int, default=1, metavar="K",
                        help="probe every K-th `tmp` point only (a `tmp` kill leaves the state of the write before)")
    parser.add_argument("--points", help="only these kill points, e.g. write:3,phase:2")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="crash_probe-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = [item for setting in (args.overrides or PROBE_SETTINGS) for item in ("--set", setting)]
    run_args = ["run", args.preset, *overrides, "--quiet"]
    reference = work / "uninterrupted"
    start = time.perf_counter()
    points = [(p, d) for p, d in list_kill_points(run_args, reference) if p.split(":")[0] in args.events.split(",")
              and (not p.startswith("tmp:") or int(p.split(":")[1]) % args.tmp_stride == 1 % args.tmp_stride)
              and (args.points is None or p in args.points.split(","))]
    print(f"{len(points)} kill points of `norga {' '.join(run_args)}` "
          f"(uninterrupted: {time.perf_counter() - start:.0f} s)")
    print(f"{'kill point':<12} {'where':<52} {'then':<8} outcome")
    failures = 0
    for index, (point, detail) in enumerate(points):
        how, outcome = probe(point, run_args, work / f"killed-{index}", reference)
        failures += not outcome.startswith("identical")
        print(f"{point:<12} {detail[:52]:<52} {how:<8} {outcome}", flush=True)
        shutil.rmtree(work / f"killed-{index}", ignore_errors=True)
    print(f"{len(points) - failures} of {len(points)} kill points resumed to byte-identical results.json and CSVs and "
          f"complete, equal task checkpoints; {failures} failed ({time.perf_counter() - start:.0f} s)")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
