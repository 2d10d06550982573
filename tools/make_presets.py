"""Generate src/norga/presets/*.yaml from the official scripts' resolved arguments.

    python tools/make_presets.py [path/to/official_scripts_effective_args.json]

Every official NoRGa / HiDe-Prompt script (two `main.py` calls: stage A = task-identity model,
stage B = prompts) becomes one preset. Learning rates are written as the official code *uses* them:
``lr · batch/256`` where `unscale_lr` is set, except the stage-B TAP lr (`ca_lr`), which it never scales.
Compat switches keep norga's correct defaults; the official values are noted in comments.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "reference" / "official_scripts_effective_args.json"
PRESETS = ROOT / "src" / "norga" / "presets"

BACKBONES = {
    "vit_base_patch16_224": "sup21k",
    "vit_base_patch16_224_21k_ibot": "ibot21k",
    "vit_base_patch16_224_ibot": "ibot1k",
    "vit_base_patch16_224_dino": "dino1k",
    "vit_base_patch16_224_mocov3": "mocov3",
}
BENCHMARKS = {"Split-CIFAR100": "cifar100", "Split-Imagenet-R": "imagenet-r", "Split-CUB200": "cub200",
              "5-datasets": "5-datasets"}
METHODS = {"NoRGa": "norga", "HiDe": "hide"}


def effective_lr(args: dict, lr: float) -> float:
    return round(lr * args["batch_size"] / 256.0 if args["unscale_lr"] else lr, 10)


def preset_from_script(script: str, calls: list[dict]) -> tuple[str, dict, str]:
    """(preset name, config dict, header comment) for one official script."""
    stage_a = next(a for a in calls if a["train_inference_task_only"])
    stage_b = next(a for a in calls if not a["train_inference_task_only"])
    bench, _, method = script[: -len(".sh")].rpartition("_")
    bench, _, backbone_tag = bench.partition("_")
    name = f"{bench}_{backbone_tag}_{METHODS[method]}".lower()
    gate = stage_b.get("gate_act") if method == "NoRGa" else None
    config = {
        "method": METHODS[method],
        "seed": stage_b["seed"],
        "data": {"benchmark": BENCHMARKS[stage_b["dataset"]], "num_tasks": stage_b["num_tasks"]},
        "backbone": {"name": BACKBONES[stage_b["model"]], "weights": "hub"},
        "prompt": {
            "length": stage_b["length"],
            "layers": stage_b["e_prompt_layer_idx"],
            "gate": gate,
            "momentum": stage_b["prompt_momentum"],
        },
        "tii": {
            "mlp_hidden": stage_a["original_model_mlp_structure"],
            "train": {"epochs": stage_a["epochs"], "lr": effective_lr(stage_a, stage_a["lr"]),
                      "batch_size": stage_a["batch_size"], "schedule": stage_a["sched"],
                      "clip_grad": stage_a["clip_grad"]},
            "tap": {"epochs": stage_a["crct_epochs"], "lr": effective_lr(stage_a, stage_a["ca_lr"]),
                    "samples_per_class": stage_a["batch_size"]},
        },
        "wtp": {
            "train": {"epochs": stage_b["epochs"], "lr": effective_lr(stage_b, stage_b["lr"]),
                      "batch_size": stage_b["batch_size"], "schedule": stage_b["sched"],
                      "clip_grad": stage_b["clip_grad"]},
            "head_lr_scale": 0.1 if stage_b["larger_prompt_lr"] else 1.0,
            "contrastive_weight": stage_b["reg"],
            "tap": {"epochs": stage_b["crct_epochs"], "lr": stage_b["ca_lr"],
                    "samples_per_class": 5 * stage_b["batch_size"]},
        },
        "eval": {"batch_size": stage_b["batch_size"]},
    }
    header = (f"# Official script scripts/{script} (MoE_PromptCL @ e418337), both stages in one run.\n"
              f"# Official compat values (norga keeps the correct defaults): prefix_layout official, "
              f"batchwise_prompt {str(stage_b['batchwise_prompt']).lower()}, normalization official, "
              f"mask_final_logits false.\n")
    return name, config, header


def generate(source: Path = DEFAULT_SOURCE) -> dict[str, str]:
    """Preset file name -> YAML text for every NoRGa / HiDe-Prompt script."""
    scripts = json.loads(source.read_text())
    files = {}
    for script, calls in sorted(scripts.items()):
        if script.endswith(("_NoRGa.sh", "_HiDe.sh")):
            name, config, header = preset_from_script(script, calls)
            files[f"{name}.yaml"] = header + yaml.safe_dump(config, sort_keys=False)
    return files


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
    for file_name, text in generate(source).items():
        (PRESETS / file_name).write_text(text)
        print(PRESETS / file_name)


if __name__ == "__main__":
    main()
