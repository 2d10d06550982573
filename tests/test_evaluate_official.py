"""`norga evaluate --tii-dir DIR --prompt-dir DIR --preset NAME`: both official stages' checkpoints, written in the
official layout for a tiny ViT, evaluated through the command and checked against float64 forwards of the raw
tensors (tests/official_fixtures.py), on a generated image-folder benchmark."""

import json
import re
from typing import NamedTuple

import pytest
import torch
import yaml
from cli_fixture import write_image_folder
from official_fixtures import (
    ARCH,
    backbone_keys,
    official_backbone,
    official_mlp_keys,
    reference_class_token,
    reference_logits,
    reference_tii_logits,
    save_prompt_stage,
    save_tii_stage,
)
from safetensors.torch import save_file

from norga.cli import main
from norga.config_io import load_config
from norga.engine.build import build_run
from norga.engine.resolve import resolve_config

HIDDEN, LAYERS, LENGTH, GATE, TASKS, CLASSES = [2], [0, 1], 4, "sigmoid", 2, 4
TIE = 1e-4  # logits closer than this (relative) may flip between float64 and float32


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An image-folder benchmark, a preset for it, and both official stages' checkpoints of tasks 1 and 2."""
    root = tmp_path_factory.mktemp("official")
    backbone = official_backbone(seed=3)
    weights = root / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, weights)
    preset = root / "tiny_official.yaml"
    preset.write_text(yaml.safe_dump({
        "method": "norga", "seed": 1, "device": "cpu", "amp": "none",  # compared with float64 up to fp32 near-ties
        "data": {"benchmark": "imagefolder", "root": str(write_image_folder(root / "images")), "num_tasks": TASKS},
        "backbone": {"name": "vit_tiny_patch16_224", "weights": str(weights),
                     "timm_kwargs": {"img_size": ARCH["img_size"], "patch_size": ARCH["patch_size"],
                                     "depth": ARCH["depth"]}},
        "norga": {"gate": GATE, "prompt": {"length": LENGTH, "layers": LAYERS}, "tii": {"mlp_hidden": HIDDEN}},
        "eval": {"batch_size": 4}}))
    tii_dir, prompt_dir = root / "output" / "NoRGa_tiny_covariance_mlp_2_seed1", root / "output" / "NoRGa_tiny_pe_seed1"
    generator = torch.Generator().manual_seed(7)
    states = {}
    for task in (1, 2):
        with torch.random.fork_rng():
            torch.manual_seed(100 + task)
            tii = {**backbone_keys(backbone), **official_mlp_keys(HIDDEN, fc_norm=False, num_classes=CLASSES)}
        prompt = {**backbone_keys(backbone),
                  "head.weight": torch.randn(CLASSES, 192, generator=generator) / 4,
                  "head.bias": 0.1 * torch.randn(CLASSES, generator=generator),
                  "e_prompt.prompt": torch.empty(len(LAYERS), 2, TASKS, LENGTH, 3, 64).uniform_(-1, 1,
                                                                                               generator=generator),
                  "e_prompt.act_scale": 0.5 + torch.rand(len(LAYERS), 2, 1, 1, generator=generator)}
        save_tii_stage(tii_dir / "checkpoint" / f"task{task}_checkpoint.pth", tii, HIDDEN)
        save_prompt_stage(prompt_dir / "checkpoint" / f"task{task}_checkpoint.pth", prompt, gate_act=GATE)
        states[task] = (tii, prompt)
    return {"root": root, "preset": preset, "tii_dir": tii_dir, "prompt_dir": prompt_dir, "states": states}


def reference(official, task: int):
    """Per seen test task after `task` (1-based): (class-IL, task-IL, task-id correct, near-ties, images), from
    float64 forwards of the raw official tensors on the benchmark's test images."""
    tii_state, prompt_state = official["states"][task]
    built = build_run(resolve_config(load_config(official["preset"])))
    class_to_task = torch.full((CLASSES,), -1)
    for index, t in enumerate(built.tasks):
        class_to_task[list(t.classes)] = index
    seen = torch.isin(class_to_task, torch.arange(task))
    rows = []
    for index in range(task):
        images, labels = map(torch.stack, zip(*((image, torch.as_tensor(label))
                                                for image, label in built.tasks[index].test)))
        frozen = reference_class_token(prompt_state, images, ARCH["depth"])
        identity = class_to_task[reference_tii_logits(tii_state, frozen, HIDDEN)
                                 .masked_fill(~seen, float("-inf")).argmax(1)]
        ties, counts = 0, []
        for slots, allowed in ((identity, seen), (torch.full_like(labels, index), class_to_task == index)):
            prompted = reference_class_token(prompt_state, images, ARCH["depth"],
                                             prompt={"layers": LAYERS, "slots": slots, "gate_act": GATE})
            logits = reference_logits(prompt_state, prompted).masked_fill(~allowed, float("-inf"))
            top = logits.topk(2, dim=1).values
            ties += int((top[:, 0] - top[:, 1] < TIE * top.abs().max()).sum())
            counts.append(int((logits.argmax(1) == labels).sum()))
        rows.append((*counts, int((identity == index).sum()), ties, len(labels)))
    return rows


class Done(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run(capsys, *arguments) -> Done:
    """`norga ARGUMENTS` in this process (as the console script runs it), with its exit code and output."""
    capsys.readouterr()
    code = main([str(argument) for argument in arguments])
    return Done(code, *capsys.readouterr())


def evaluate(capsys, official, *arguments) -> Done:
    return run(capsys, "evaluate", "--tii-dir", official["tii_dir"], "--prompt-dir", official["prompt_dir"],
               "--preset", official["preset"], "--quiet", *arguments)


def record_of(done):
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip().splitlines()[-1].removeprefix("written: ").removesuffix(" (and .csv)")
    return json.loads(open(path).read()), path


@pytest.mark.parametrize("arguments", [("--set", "norga.prefix_layout=correct"), ("--set", "eval.batch_size=1")])
def test_official_checkpoints_evaluate_to_what_their_raw_tensors_define(official, capsys, arguments):
    # the official layout (the default) equals the correct one at batch size 1, where no sample has neighbours
    record, path = record_of(evaluate(capsys, official, *arguments))
    assert record["after_task"] == TASKS and record["slots"] == "predicted"
    assert record["compat"]["prefix_layout"] == ("correct" if "norga.prefix_layout=correct" in arguments else "official")
    assert record["loaded"]["prompt"]["stage"] == "prompt" and record["loaded"]["task_identity"]["keys_loaded"] > 0
    assert str(official["prompt_dir"]) + "-evaluations" in path  # beside the official folder, not inside it
    for row, (within, task_il, identity, ties, images) in zip(record["per_task"], reference(official, TASKS)):
        assert row["images"] == images
        assert abs(row["accuracy"] * images / 100 - within) <= ties + 1e-6
        assert abs(row["task_incremental"] * images / 100 - task_il) <= ties + 1e-6
        assert abs(row["task_identity"] * images / 100 - identity) < 1e-6


def test_an_earlier_task_and_a_named_output_folder(official, capsys, tmp_path):
    record, path = record_of(evaluate(capsys, official, "--task", "1", "--slots", "true", "--output", tmp_path / "mine",
                                      "--set", "eval.batch_size=1"))
    assert path.startswith(str(tmp_path / "mine")) and record["after_task"] == 1 and len(record["per_task"]) == 1
    (_, task_il, _, ties, images), = reference(official, 1)
    assert abs(record["per_task"][0]["task_incremental"] * images / 100 - task_il) <= ties + 1e-6


@pytest.mark.parametrize(("arguments", "message"), [
    (("--set", "norga.prompt.length=3"), (r"'e_prompt.prompt' is shaped \(2, 2, 2, 4, 3, 64\) .* --set "
                                          r"norga.prompt.length")),
    (("--set", "method=l2p"), "cannot read an official code.s checkpoints: give a preset of hide or norga"),
    (("--task", "3"), "the preset's benchmark has tasks 1 to 2"),
])
def test_a_preset_that_does_not_fit_is_one_line_and_exit_2(official, capsys, tmp_path, arguments, message):
    done = evaluate(capsys, official, "--output", tmp_path / "out", *arguments)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_task_file_or_a_folder_that_is_no_official_run_is_refused(official, capsys, tmp_path):
    missing = tmp_path / "tii"
    (missing / "checkpoint").mkdir(parents=True)
    source = official["tii_dir"] / "checkpoint" / "task1_checkpoint.pth"
    (missing / "checkpoint" / "task1_checkpoint.pth").write_bytes(source.read_bytes())
    done = run(capsys, "evaluate", "--tii-dir", missing, "--prompt-dir", official["prompt_dir"], "--preset",
                 official["preset"], "--task", "2")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no task-identity checkpoint of task 2" in done.stderr and "as --tii-dir" in done.stderr
    for arguments, message in ((("--tii-dir", tmp_path / "nowhere", "--prompt-dir", official["prompt_dir"], "--preset",
                                 official["preset"]), "is not a folder"),
                               (("--prompt-dir", official["prompt_dir"]), "--tii-dir, --preset missing"),
                               ((tmp_path, "--preset", official["preset"]), "not both")):
        done = run(capsys, "evaluate", *arguments)
        assert done.returncode == 2 and message in done.stderr, done.stderr
