"""Divergence stops a run with the setting that matters and the truth about what is on disk; a resume may change
learning rates, epochs still ahead, the evaluation batch size and loader workers, recorded in the run
directory, and refuses every other change."""

from __future__ import annotations

import json

import pytest
from engine_fixtures import (
    CLASSES_PER_TASK,
    NUM_TASKS,
    build,
    tiny_config,
)

from norga.config import ConfigError, OptimConfig
from norga.config_io import default_config, load_config
from norga.engine.loop import Position, open_run, run_experiment
from norga.engine.resume_changes import check_resume_changes, identity_hash

NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK


class InjectedCrash(RuntimeError):
    pass


def probe_config(lr=0.01, epochs=3):
    config = tiny_config(method="linear_probe")
    config.settings.train = OptimConfig(epochs=epochs, lr=lr, batch_size=4)
    return config


def run(tmp_path, config, name="run", **kwargs):
    return run_experiment(build(config), tmp_path / name, **kwargs)


def crash_at(position: Position):
    def after_epoch(at: Position) -> None:
        if at == position:
            raise InjectedCrash(f"crash at {at}")
    return after_epoch


def test_finite_but_exploding_training_is_stopped_naming_its_learning_rate(tmp_path):
    """Adam at lr 1e4: every value stays finite, the loss grows a thousandfold; nothing was checkpointed yet."""
    with pytest.raises(FloatingPointError) as caught:
        run(tmp_path, probe_config(lr=1e4))
    message = str(caught.value)
    assert "training diverged in epoch" in message and "lower linear_probe.train.lr (now 10000)" in message
    assert "nothing was checkpointed yet" in message and "last good checkpoint" not in message
    assert not (tmp_path / "run" / "state.pt").exists()


@pytest.mark.parametrize("key", ["wtp.train.lr", "tii.train.lr"])
def test_the_message_names_the_learning_rate_of_the_phase_that_diverged(tmp_path, key):
    config = tiny_config(**{key: 1e5})
    with pytest.raises(FloatingPointError) as caught:
        run(tmp_path, config)
    message = str(caught.value)
    assert f"lower norga.{key} (now 100000)" in message, message
    others = {"wtp.train.lr", "tii.train.lr", "tii.tap.lr", "wtp.tap.lr"} - {key}
    assert not any(other in message for other in others), message


def test_a_divergence_after_a_checkpoint_names_it_and_the_resume_command(tmp_path):
    """Task 1 trains with a fitting rate and is committed; resumed with a far higher one, task 2 explodes."""
    with pytest.raises(InjectedCrash):
        run(tmp_path, probe_config(), after_epoch=crash_at(Position(1, 0, 0)))
    with pytest.raises(FloatingPointError) as caught:
        run(tmp_path, probe_config(lr=1e4), resume=True)
    message = str(caught.value)
    assert "the last checkpoint (task 2, before phase train_head) is intact" in message, message
    assert f"norga run --resume {tmp_path / 'run'} --set linear_probe.train.lr=" in message


def test_a_resume_may_lower_a_learning_rate_mid_phase_and_the_change_is_recorded(tmp_path):
    config = probe_config()
    with pytest.raises(InjectedCrash):
        run(tmp_path, config, after_epoch=crash_at(Position(1, 0, 1)))
    lower = probe_config(lr=0.001)
    rates = []
    engine = open_run(build(lower), tmp_path / "run", resume=True,
                      after_epoch=lambda at: rates.append([g["lr"] for g in engine.method.optimizer.param_groups]))
    engine.run()
    assert rates[0] == [0.001]  # the interrupted phase's optimizer continues at the new rate
    directory = tmp_path / "run"
    changes = json.loads((directory / "environment.json").read_text())["resume_changes"]
    assert changes == [{"at": {"task": 1, "phase": 0, "epoch": 1}, "time": changes[0]["time"],
                        "changes": {"linear_probe.train.lr": {"from": 0.01, "to": 0.001}}}]
    assert load_config(directory / "config.yaml").settings.train.lr == 0.001
    assert "linear_probe.train.lr: 0.01 -> 0.001" in (directory / "log.txt").read_text()


def test_epochs_ahead_may_change_but_not_below_what_the_current_phase_has_run(tmp_path):
    config = probe_config(epochs=3)
    with pytest.raises(InjectedCrash):
        run(tmp_path, config, after_epoch=crash_at(Position(1, 0, 2)))
    with pytest.raises(ConfigError, match="2 have already run: give at least 2"):
        run(tmp_path, probe_config(epochs=1), resume=True)
    matrices = run(tmp_path, probe_config(epochs=4), resume=True)
    assert matrices["accuracy"].tested(NUM_TASKS - 1) == NUM_TASKS


def test_a_resume_refuses_changes_that_are_not_safe(tmp_path):
    config = probe_config()
    with pytest.raises(InjectedCrash):
        run(tmp_path, config, after_epoch=crash_at(Position(1, 0, 1)))
    other = probe_config()
    other.settings.train.batch_size = 8
    with pytest.raises(ConfigError, match="--resume cannot change linear_probe.train.batch_size"):
        run(tmp_path, other, resume=True)


def test_safe_keys_are_named_by_pattern_and_leave_the_identity_unchanged():
    stored = tiny_config()
    changed = tiny_config(**{"wtp.train.lr": 0.5, "tii.tap.epochs": 9, "eval.batch_size": 7, "data.workers": 2})
    assert set(check_resume_changes(stored, changed)) == {"norga.wtp.train.lr", "norga.tii.tap.epochs",
                                                          "eval.batch_size", "data.workers"}
    l2p = tiny_config("l2p")
    faster = tiny_config("l2p", **{"train.lr": 0.3})  # any method's learning rate, whatever its section
    assert set(check_resume_changes(l2p, faster)) == {"l2p.train.lr"}
    assert identity_hash(changed) == identity_hash(stored)
    assert identity_hash(tiny_config(**{"wtp.train.batch_size": 5})) != identity_hash(stored)
    with pytest.raises(ConfigError, match="cannot change norga.prompt.length, seed"):
        check_resume_changes(stored, tiny_config(**{"prompt.length": 9, "seed": 1}))


def test_a_setting_added_later_at_its_default_leaves_the_identity_of_earlier_runs_and_the_method_always_counts():
    import dataclasses

    from norga.config import RunConfig
    from norga.methods import METHODS

    stored = tiny_config()
    before = identity_hash(stored)
    norga = METHODS["norga"]
    later = dataclasses.make_dataclass("LaterSettings", [("new_switch", bool, dataclasses.field(default=False))],
                                       bases=(norga.Settings,))
    original = norga.Settings
    try:
        norga.Settings = later  # a norga with one more setting, whose default keeps today's behaviour
        upgraded = RunConfig(**{**{f.name: getattr(stored, f.name) for f in dataclasses.fields(stored)},
                                "settings": later(**dataclasses.asdict(stored.settings) | {"new_switch": False})})
        assert identity_hash(upgraded) == before
        upgraded.settings.new_switch = True
        assert identity_hash(upgraded) != before  # set away from its default, it defines the run
    finally:
        norga.Settings = original
    assert identity_hash(default_config("norga")) != identity_hash(default_config("hide"))
