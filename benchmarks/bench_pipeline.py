"""Whole-pipeline wall time with frozen-feature caching on vs off (NoRGa, generated benchmark, CPU).

The backbone is ViT-Ti-sized (width 192, depth 12) at 32 px; 5 tasks of 2 classes, 64 training and
32 test images per class; official phase structure with shortened epochs. Usage:

    python benchmarks/bench_pipeline.py [--threads 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from _timing import machine, machine_line

from norga.config import OptimConfig, RunConfig
from norga.config_io import default_config
from norga.engine.loop import Engine
from norga.engine.run_dir import RunDirectory
from norga.methods.hide import TAPConfig
from norga.nn import PromptedViT
from norga.runtime.context import BuiltRun
from norga.synthetic import synthetic_tasks


def config_for(epochs: int, cache: bool, augment: bool) -> RunConfig:
    config = default_config("norga", seed=1, cache_frozen_features=cache, amp="none")  # fp32, as measured so far
    s = config.settings
    s.gate = "sigmoid"
    s.tii.augment = augment
    s.tii.train = OptimConfig(epochs=epochs, lr=1e-3, batch_size=32)
    s.tii.tap = TAPConfig(epochs=epochs, lr=0.01, samples_per_class=32)
    s.wtp.train = OptimConfig(epochs=epochs, lr=0.01, batch_size=32)
    s.wtp.tap = TAPConfig(epochs=epochs, lr=0.01, samples_per_class=64)
    config.eval.batch_size = 64
    return config


def timed_run(config: RunConfig, tasks, workdir: Path) -> tuple[float, int, float]:
    """Wall seconds, frozen images encoded and final average accuracy of one run (model built from `config`)."""
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4)
    model = PromptedViT(backbone, num_classes=sum(len(task.classes) for task in tasks),
                        attention_impl=config.attention_impl)
    if config.compile:
        model.compile_blocks()
    built = BuiltRun(config, model, tasks, model.backbone.num_classes, torch.device("cpu"))
    engine = Engine(built, RunDirectory(workdir))
    start = time.perf_counter()
    matrices = engine.run()
    return time.perf_counter() - start, engine.context.frozen_images_encoded, matrices["accuracy"].final_average_accuracy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = synthetic_tasks(num_tasks=5, classes_per_task=2, train_per_class=64, test_per_class=32, size=32)
    print(f"{machine_line(machine(), args.threads)}; {args.epochs} epochs per phase")
    print("| task-identity training | caching | wall s | frozen images encoded | FA |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for augment in (False, True):
            times = {}
            for cache in (False, True):
                seconds, encoded, fa = timed_run(config_for(args.epochs, cache, augment), tasks,
                                                 Path(tmp) / f"a{augment}c{cache}")
                times[cache] = seconds
                label = "augmented views (official)" if augment else "cached features"
                print(f"| {label} | {'on' if cache else 'off'} | {seconds:.1f} | {encoded} | {fa:.2f} |")
            print(f"| speed-up from caching | | {times[False] / times[True]:.2f}x | | |")


if __name__ == "__main__":
    main()
