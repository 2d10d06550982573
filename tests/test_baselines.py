"""L2P, DualPrompt, S-Prompt++ and CODA-Prompt end to end on the generated 3-task benchmark and a tiny ViT."""

import json
import logging
import math
import os

import pytest
import torch
from cli_fixture import NEEDS_FASHION_MNIST
from engine_fixtures import (
    CLASSES_PER_TASK,
    NUM_TASKS,
    TRAIN_PER_CLASS,
    FailingDataset,
    make_engine,
    make_tasks,
    run_fixture,
    tiny_config,
)

from norga.config import ConfigError
from norga.engine.loop import run_experiment
from norga.engine.run_dir import RunDirectory
from norga.methods.base import PredictRequest
from norga.nn import NoRGaGate
from norga.runtime.context import TaskDatasets
from norga.runtime.optim import schedule_factor

NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK
METHODS = ("l2p", "dualprompt", "sprompt", "coda")
SETTINGS = {  # the methods' structure at the fixture's scale (a 2-block ViT of width 32)
    "l2p": {"pool_size": 6, "top_k": 2, "length": 2, "layers": [0]},
    "dualprompt": {"g_layers": [0], "g_length": 2, "layers": [1], "length": 2},
    "sprompt": {"layers": [0, 1], "length": 2},
    "coda": {"pool_size": 6, "length": 2, "layers": [0, 1], "ortho_weight": 0.1},
}


def baseline_config(method, epochs=1, **changes):
    config = tiny_config(method=method, **changes)
    section = config.settings
    section.train.epochs, section.train.lr, section.train.batch_size = epochs, 0.01, 4
    for key, value in SETTINGS[method].items():
        setattr(section, key, value)
    return config


def engine(tmp_path, config, name="run", tasks=None):
    return make_engine(config, tmp_path / name, tasks)


def prompt_state(method):
    return {k: v.clone() for k, v in method.prompts.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_evaluates(tmp_path, method):
    run = engine(tmp_path, baseline_config(method))
    initial, backbone = prompt_state(run.method), {k: v.clone() for k, v in run.context.model.state_dict().items()}
    matrices = run.run()
    accuracy = matrices["accuracy"].accuracies()
    assert all(0 <= accuracy[i, t] <= 100 for t in range(NUM_TASKS) for i in range(t + 1))
    assert all(accuracy[i, t] == 0 for t in range(NUM_TASKS) for i in range(t + 1, NUM_TASKS))
    assert accuracy[:, -1].sum() > 0
    learned = run.method.prompts.state_dict()
    assert any(not torch.equal(learned[k], v) for k, v in initial.items())  # the prompts learned
    after = run.context.model.state_dict()
    assert all(torch.equal(after[k], v) == (not k.startswith("backbone.head.")) for k, v in backbone.items())
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == method and results["tasks_finished"] == NUM_TASKS


def test_task_mask_trains_only_the_tasks_slot_and_key_which_start_from_the_previous_slot(tmp_path):
    run = engine(tmp_path, baseline_config("dualprompt"))
    method, prompts = run.method, run.method.prompts
    for task in range(2):
        for phase in method.phases(task):
            before = prompt_state(method)
            method.run_phase(task, phase, 0, lambda epoch, logs: None)
    after = prompt_state(method)
    moved = [not torch.equal(after[f"e.slots.{slot}"], before[f"e.slots.{slot}"]) for slot in range(3)]
    assert moved == [False, True, False]
    keys_moved = (after["key.keys"] != before["key.keys"]).any(dim=1).tolist()
    assert keys_moved == [False, True, False]
    assert not torch.equal(after["g.slots.0"], before["g.slots.0"])  # the G-prompt is shared and keeps learning
    method.begin_task(2)
    assert torch.equal(prompts["e"].slots[2], prompts["e"].slots[1])  # sequential init
    assert not torch.equal(prompts["key"].keys[2], prompts["key"].keys[1])  # keys are not copied


def test_batchwise_vote_only_when_switched_on(tmp_path):
    images = torch.cat([make_tasks()[t].test.tensors[0][:2] for t in range(NUM_TASKS)])
    for batchwise in (False, True):
        config = baseline_config("dualprompt", **{"batchwise_prompt": batchwise})
        run = engine(tmp_path, config, f"vote{batchwise}")
        keys = run.method.prompts["key"]
        frozen = run.context.frozen_encode(images)
        with torch.no_grad():  # key t is a task-t image's own query: that image picks it, surely
            keys.keys.copy_(frozen[::2][: len(keys.keys)])
        own = keys.similarity(frozen).argmax(dim=1)
        assert len(set(own.tolist())) > 1, "the test needs a batch whose samples pick different keys"
        tasks = run.method.predict(PredictRequest(images, NUM_TASKS, frozen)).tasks
        expected = torch.full_like(own, int(torch.bincount(own).argmax())) if batchwise else own
        assert torch.equal(tasks, expected)


def test_gate_and_layers_come_from_the_section(tmp_path, caplog):
    config = baseline_config("sprompt", **{"gate": "sigmoid"})
    config.settings.layers = [0, 1, 2, 3, 4]
    with caplog.at_level(logging.WARNING, logger="norga"):
        run = engine(tmp_path, config)
    assert run.method.e_layers == [0, 1] and "this backbone has 2 blocks" in caplog.text
    gates = run.method.prompts["gates"]
    assert sorted(gates) == ["0", "1"] and all(isinstance(g, NoRGaGate) for g in gates.values())
    with pytest.raises(ConfigError, match=r"dualprompt.layers = \[2, 3, 4\] does not fit this 2-block backbone: "
                                          r"set --set dualprompt.layers=\[...\] to blocks 0..1"):
        engine(tmp_path, tiny_config(method="dualprompt", **{"g_layers": [0], "layers": [2, 3, 4]}), "deep")


@pytest.mark.parametrize("method", ["dualprompt", "coda"])
def test_resume_after_a_crash_mid_epoch_gives_identical_results(tmp_path, method):
    config = baseline_config(method, epochs=2)
    straight = run_fixture(config, tmp_path / "straight")
    tasks = make_tasks()
    per_epoch = CLASSES_PER_TASK * TRAIN_PER_CLASS
    tasks[1] = TaskDatasets(tasks[1].classes, FailingDataset(tasks[1].train, per_epoch + per_epoch // 2),
                            tasks[1].train_eval, tasks[1].test)  # crash inside task 1's second epoch
    with pytest.raises(RuntimeError, match="injected failure"):
        run_fixture(config, tmp_path / "crashed", tasks)
    state, _ = RunDirectory(tmp_path / "crashed", create=False).load_state()
    assert (state["position"]["task"], state["position"]["epoch"]) == (1, 1)
    resumed = run_fixture(config, tmp_path / "crashed", resume=True)
    for name in straight:
        assert torch.equal(torch.as_tensor(straight[name].accuracies()), torch.as_tensor(resumed[name].accuracies()))
    final = [torch.load(tmp_path / run / "checkpoints" / "task3.pt", weights_only=True)["method"]["prompts"]
             for run in ("straight", "crashed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    run = engine(tmp_path, baseline_config("l2p"))
    state = run.method.state_dict()
    state["prompts"]["e.prompts"] = state["prompts"]["e.prompts"][:, :3]
    with pytest.raises(RuntimeError, match="size mismatch for e.prompts"):
        run.method.load_state_dict(state)
    del state["prompts"]["key.keys"]
    with pytest.raises(RuntimeError, match="Missing key"):
        run.method.load_state_dict(state)


def test_official_prefix_layout_pairs_halves_as_the_official_reshape_while_training(tmp_path):
    """A training batch on one slot: its first half uses the key half as keys and values, its second the value half."""
    images = make_tasks()[0].train.tensors[0][:4]
    official = engine(tmp_path, baseline_config("sprompt", **{"prefix_layout": "official"}), "official")
    correct = engine(tmp_path, baseline_config("sprompt"), "correct")
    query = official.context.frozen_encode(images)
    with torch.no_grad():
        got = official.method.prompted(images, query, 0, train=True).logits
        for half, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
            state = prompt_state(official.method)
            state["e.slots.0"][:, 1 - half] = state["e.slots.0"][:, half]
            correct.method.prompts.load_state_dict(state)
            want = correct.method.prompted(images, query, 0, train=True).logits
            assert (got[rows] - want[rows]).abs().max() <= 1e-5
    correct.method.prompts.load_state_dict(prompt_state(official.method))
    with torch.no_grad():
        assert (got - correct.method.prompted(images, query, 0, train=True).logits).abs().max() > 1e-4


def test_coda_cosine_schedule_is_codas_formula():
    epochs, base = 20, 0.001
    coda_lrs = [base * math.cos(99 * math.pi * epoch / (200 * (epochs - 1))) for epoch in range(epochs)]
    ours = [base * schedule_factor("coda_cosine", epoch, epochs, base) for epoch in range(epochs)]
    assert ours == pytest.approx(coda_lrs) and ours[0] == base and ours[-1] == pytest.approx(0.0157 * base, rel=1e-2)


REAL = os.environ.get("NORGA_DATA")


@pytest.mark.slow
@pytest.mark.realdata
@NEEDS_FASHION_MNIST
@pytest.mark.parametrize("method", METHODS)
def test_tiny_smoke_preset_runs_each_baseline_on_real_fashion_mnist(tmp_path, method):
    from norga.config_io import load_config
    from norga.engine.build import build_run
    from norga.engine.resolve import resolve_config

    built = build_run(resolve_config(load_config("tiny_smoke", [f"method={method}"])))
    matrices = run_experiment(built, tmp_path / method)
    accuracy = matrices["accuracy"]
    assert len(built.tasks) == 5 and 0 < accuracy.final_average_accuracy(4) <= 100
