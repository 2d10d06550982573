"""log.txt holds what a reader needs afterwards: per task and phase every epoch's loss and learning rate, the
evaluations (class-IL, task-IL, task identity per seen task), each phase's time, the run's, and every warning."""

import logging
import re
import warnings

import pytest
from engine_fixtures import NUM_TASKS, run_fixture, tiny_config

from norga.methods.hide import HiDePrompt

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def test_log_txt_holds_losses_learning_rates_evaluations_timings_and_warnings(tmp_path, monkeypatch):
    real = HiDePrompt._prompt_stats

    def stats_with_warnings(self, task):
        warnings.warn(f"a library warning during task {task + 1}", UserWarning, stacklevel=1)
        logging.getLogger("norga.methods").warning("a norga warning during task %d", task + 1)
        real(self, task)

    monkeypatch.setattr(HiDePrompt, "_prompt_stats", stats_with_warnings)
    config = tiny_config(**{"wtp.train.lr": 0.02, "wtp.train.schedule": "constant", "wtp.head_lr_scale": 0.1,
                            "tii.train.lr": 0.003})
    with pytest.warns(UserWarning, match="a library warning") as shown:
        run_fixture(config, tmp_path / "run")
    assert len(shown) == NUM_TASKS  # still shown (here: recorded) where it would have been
    log = (tmp_path / "run" / "log.txt").read_text()
    epochs = re.findall(rf"^{STAMP} INFO .*task (\d)/{NUM_TASKS} (\w+) epoch (\d)/2  loss ([\d.]+)  lr (\S+)  ", log,
                        re.MULTILINE)
    # learning rates by hand: constant prompt lr and 0.1 x for the head; TAP cosine over 2 epochs: lr, lr / 2
    expected = {"tii_train": ["0.003", "0.003"], "wtp_train": ["0.02,0.002", "0.02,0.002"],
                "tii_tap": ["0.01", "0.005"], "tap": ["0.01", "0.005"]}
    for task in range(1, NUM_TASKS + 1):
        for phase, rates in expected.items():
            if phase in ("tii_tap", "tap") and task == 1:
                continue  # task 1 has no task-adaptive stages
            found = [(int(epoch), lr) for t, p, epoch, _, lr in epochs if (int(t), p) == (task, phase)]
            assert found == [(1, rates[0]), (2, rates[1])], (task, phase, found)
    assert all(float(loss) > 0 for *_, loss, _ in epochs)
    for task in range(1, NUM_TASKS + 1):
        for what in ("evaluated", "evaluated task-incremental", "evaluated task-identity"):
            accuracies = r" [\d.]+" * task
            assert re.search(rf"task {task}/{NUM_TASKS} {what}: accuracy{accuracies} \| FA ", log), (task, what)
        for step in ("tii_stats", "momentum", "prompt_stats", "evaluate"):  # steps' and evaluations' times
            assert re.search(rf"task {task}/{NUM_TASKS} {step}: (\d+ batch(es)? in )?[\d.]+ s$", log, re.MULTILINE)
        assert re.search(rf"task {task}/{NUM_TASKS} wtp_train: 2 epochs in [\d.]+ s  loss ", log)
    assert re.search(r"run finished in [\d.]+ s$", log, re.MULTILINE)
    for task in range(1, NUM_TASKS + 1):
        assert re.search(rf"WARNING UserWarning: a library warning during task {task} \(.*test_run_log.py:\d+\)$",
                         log, re.MULTILINE)
        assert re.search(rf"WARNING a norga warning during task {task}$", log, re.MULTILINE)


def test_python_warnings_after_the_run_are_not_logged_to_it(tmp_path):
    run_fixture(tiny_config(**{"wtp.train.epochs": 1, "tii.train.epochs": 1}), tmp_path / "run")
    with pytest.warns(UserWarning, match="after the run"):
        warnings.warn("after the run", UserWarning, stacklevel=1)
    assert "after the run" not in (tmp_path / "run" / "log.txt").read_text()
