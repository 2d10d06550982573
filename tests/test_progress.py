"""What a run shows while it runs: bars over batches on a terminal, timestamped lines elsewhere, the banner."""

import io
import json
import re
from collections import Counter

import pytest
from engine_fixtures import (
    CLASSES_PER_TASK,
    NUM_TASKS,
    TRAIN_PER_CLASS,
    build,
    tiny_config,
)

from norga.engine.banner import format_banner
from norga.engine.loop import run_experiment
from norga.engine.progress import Progress

NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK
RECORDS = {"benchmark": {"name": "synthetic", "num_tasks": NUM_TASKS, "task_classes": [[0, 1], [2, 3], [4, 5]],
                         "train_images": 48, "test_images": 24, "source": "/data/synthetic"}}
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
EPOCH_LINE = re.compile(rf"^{STAMP} NoRGa · synthetic · task (\d)/{NUM_TASKS} (\w+) epoch (\d+)/(\d+)  loss \S+  ")
EVALUATED = re.compile(rf"^{STAMP} NoRGa · synthetic · task (\d)/{NUM_TASKS} evaluated: accuracy [\d. ]+ \| FA ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(tmp_path, stream):
    config = tiny_config()
    run_experiment(build(config, records=RECORDS), tmp_path / "run",
                   progress=Progress("auto", label="NoRGa", stream=stream))
    return stream.getvalue()


def test_not_a_terminal_gets_one_timestamped_line_per_epoch_and_evaluation(tmp_path):
    text = run(tmp_path, io.StringIO())
    assert "\r" not in text  # no bar redraws in a log file
    lines = text.splitlines()
    banner_end = next(i for i, line in enumerate(lines) if not line.startswith(("  ", lines[0])))
    assert re.match(rf"^{STAMP} NoRGa · synthetic: starting a run$", lines[0])
    body = lines[banner_end:]
    epochs = [EPOCH_LINE.match(line) for line in body]
    evaluations = [EVALUATED.match(line) for line in body]
    other = [line for line, e, v in zip(body, epochs, evaluations, strict=True) if not e and not v]
    assert all(re.match(rf"^{STAMP} NoRGa · synthetic · task \d/{NUM_TASKS} evaluated before tap: ", line)
               for line in other), other
    assert [int(v.group(1)) for v in evaluations if v] == list(range(1, NUM_TASKS + 1))
    seen = Counter((e.group(1), e.group(2), int(e.group(3)), int(e.group(4))) for e in epochs if e)
    assert seen and set(seen.values()) == {1}  # every epoch once
    for task, phase, _, total in seen:  # and every epoch of every phase
        assert {epoch for t, p, epoch, _ in seen if (t, p) == (task, phase)} == set(range(1, total + 1))
    assert {phase for _, phase, _, _ in seen} >= {"tii_train", "wtp_train", "tap"}
    batches = -(-CLASSES_PER_TASK * TRAIN_PER_CLASS // tiny_config().settings.wtp.train.batch_size)
    assert any("wtp_train epoch 1/2  loss" in line and f" {batches} batches in " in line for line in body)
    log = (tmp_path / "run" / "log.txt").read_text()
    for line in body:  # log.txt reads the same
        assert line.split(" ", 2)[2] in log


def test_a_terminal_gets_bars_over_batches_naming_method_benchmark_task_and_phase(tmp_path):
    text = run(tmp_path, Terminal())
    assert "\r" in text
    bar = re.compile(r"NoRGa · synthetic · task 2/3 wtp_train epoch 2/2: +\d+%\|.*\| \d+/(\d+) \[[\d:]+<[\d:?]+, "
                     r"\s*[\d.?]+\s*(?:batch/s|s/batch)")
    assert bar.search(text), text[:2000]
    assert re.search(r"phase ~\d+:\d\d left", text)  # the phase's ETA once an epoch has finished
    assert re.search(r"NoRGa · synthetic · task 2/3 tap: +\d+%\|.*\| [12]/2 \[", text)  # TAP: a bar over epochs
    kept = [line for line in text.replace("\r", "\n").splitlines() if "wtp_train:" in line]
    assert len(kept) == NUM_TASKS and all("2 epochs in" in line for line in kept)  # a line per task and phase


def test_quiet_and_off(caplog):
    assert Progress("lines", stream=Terminal()).mode == "lines"  # --quiet: lines, even on a terminal
    assert Progress.for_command(quiet=True).mode == "lines"
    assert Progress.for_command(quiet=False, enabled=False).mode == "off"  # the other processes of a job
    stream = io.StringIO()
    progress = Progress("off", label="NoRGa", stream=stream)
    with caplog.at_level("INFO", logger="norga"), progress.phase(0, 2, "wtp_train", epochs=1) as phase:
        assert list(progress.batches([1, 2, 3])) == [1, 2, 3]
        phase.epoch_done(0, {"loss": 0.5})
    assert stream.getvalue() == ""  # nothing on the stream...
    assert "NoRGa · task 1/2 wtp_train epoch 1/1  loss 0.5000  3 batches in " in caplog.text  # ...the log has it
    with pytest.raises(ValueError, match="progress mode must be one of"):
        Progress("loud")


def test_banner_names_run_directory_method_benchmark_backbone_precision_device():
    facts = {"run_dir": "/runs/quickstart-norga-1", "method": "norga", "threads": 2, "processes": 1,
             "device": "cpu", "benchmark": {**RECORDS["benchmark"], "name": "fashion-mnist"},
             "backbone": {"name": "norga-vit-tiny-c10", "arch": "vit_tiny_patch16_224", "input_size": [3, 32, 32],
                          "weights": "/pkg/norga-vit-tiny-c10.safetensors", "sha256": "0123456789abcdef"},
             "precision": {"amp": "none", "amp_requested": "auto", "native_bf16": False, "compile": False}}
    lines = format_banner(facts, label="NoRGa")
    assert lines[0] == "NoRGa · fashion-mnist: starting a run"
    text = "\n".join(lines)
    for expected in ("run directory  /runs/quickstart-norga-1", "method         norga (shown as NoRGa)",
                     "fashion-mnist: 3 tasks × 2 classes, 48 training / 24 test images, from /data/synthetic",
                     "backbone       norga-vit-tiny-c10 (timm vit_tiny_patch16_224, 32×32 input)",
                     "weights        /pkg/norga-vit-tiny-c10.safetensors (sha256 0123456789ab…)",
                     "precision      fp32 (amp auto: no native bf16 here), compile off",
                     "device         cpu, 2 threads"):
        assert expected in text, text
    resumed = format_banner({**facts, "steps": 3, "resumed_at": {"task": 1, "phase": 2, "epoch": 0}})
    assert resumed[0].endswith("resuming the run") and "  resuming at    task 2, phase 3, epoch 1" in resumed
    assert format_banner({"backbone": {**facts["backbone"], "weights": "none"}})[2] == (
        "  weights   random (backbone.weights=none)")


def test_task_committed_is_called_once_per_task_after_its_results_are_on_disk(tmp_path):
    class Recorder(Progress):
        def __init__(self) -> None:
            super().__init__("off")
            self.committed: list[tuple[int, int]] = []

        def task_committed(self, task: int) -> None:
            finished = json.loads((tmp_path / "run" / "results.json").read_text())["tasks_finished"]
            self.committed.append((task, finished))

    recorder = Recorder()
    config = tiny_config()
    run_experiment(build(config, records=RECORDS), tmp_path / "run", progress=recorder)
    assert recorder.committed == [(task, task + 1) for task in range(NUM_TASKS)]
