"""`norga evaluate RUN_DIR [--task K] [--slots predicted|true|none] [--set key=value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from norga.methods.base import SLOT_MODES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="re-evaluate a run from a task checkpoint (another test batch size, prefix layout, or "
        "with the true or no prompts); the run's own results stay as they are",
        description="Load a run's checkpoint after task K and evaluate every test task seen so far: class-"
        "incremental accuracy with the prompts --slots names, task-incremental accuracy (each image's true task "
        "given) and task-identity accuracy. Writes RUN_DIR/evaluations/taskK-SLOTS-STAMP.json and .csv. Example: "
        "norga evaluate runs/quickstart-norga-... --set eval.batch_size=1 --set norga.prefix_layout=official. "
        "Data parallel: torchrun --nproc_per_node=N -m norga evaluate RUN_DIR.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory `norga run` wrote")
    parser.add_argument("--task", type=int, metavar="K", help="the checkpoint after task K (default: the last one)")
    parser.add_argument("--slots", choices=SLOT_MODES, default="predicted",
                        help="whose prompts each test image gets: the method's own choice (predicted, default), its "
                        "true task's (true: HiDe-Prompt, NoRGa, DualPrompt, S-Prompt++), or none: the frozen "
                        "backbone through the same head (none: the prompt methods)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="evaluate with another eval.*, prefix_layout, batchwise_prompt, data.root, device or "
                        "amp (repeatable); what was trained cannot change")
    parser.add_argument("--quiet", action="store_true", help="plain timestamped lines instead of progress bars")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from norga.config_io import ConfigError
    from norga.engine.reevaluate import evaluation_config

    if args.task is not None and args.task < 1:
        raise ConfigError(f"--task {args.task}: tasks count from 1")
    stored, config, changes = evaluation_config(args.run_dir, args.overrides)
    from norga.engine.build import build_run, resolve_device
    from norga.engine.distributed import init_distributed, shutdown_distributed
    from norga.engine.reevaluate import format_evaluation, reevaluate, write_evaluation
    from norga.engine.run_dir import RunDirectory

    dist = init_distributed(resolve_device(config.device).type)
    finished = False
    try:
        built = build_run(config)
        RunDirectory(args.run_dir, create=False, write=False).check_benchmark(built.records)
        evaluation = reevaluate(args.run_dir, built.model, built.tasks, built.num_classes, stored, config, changes,
                                task=None if args.task is None else args.task - 1, slots=args.slots,
                                device=built.device, dist=dist, init_generator=built.init_generator)
        finished = True
    finally:
        shutdown_distributed(clean=finished)
    if dist.is_main:
        path = write_evaluation(evaluation)
        print(format_evaluation(evaluation))
        print(f"written: {path} (and .csv)")
    return 0
