"""`norga evaluate RUN_DIR [--task K] [--slots predicted|true|none] [--set key=value ...]`, and the same on the
official code's checkpoints: `norga evaluate --tii-dir DIR --prompt-dir DIR --preset NAME [--output DIR] ...`."""

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
        "The official code's checkpoints instead of a run: --tii-dir and --prompt-dir (the --output_dir of its "
        "two stages) and --preset (the model and benchmark they were trained on); evaluated with the official "
        "prefix layout unless --set sets another, written to --output (default: PROMPT_DIR-evaluations beside "
        "it). Data parallel: torchrun --nproc_per_node=N -m norga evaluate RUN_DIR.",
    )
    parser.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR", help="a run directory `norga run` wrote")
    official = parser.add_argument_group("official checkpoints (instead of RUN_DIR)")
    official.add_argument("--tii-dir", type=Path, metavar="DIR", help="the official task-identity run's --output_dir "
                          "(its checkpoint/task<K>_checkpoint.pth; the prompt run's --trained_original_model)")
    official.add_argument("--prompt-dir", type=Path, metavar="DIR", help="the official prompt run's --output_dir")
    official.add_argument("--preset", metavar="NAME", help="preset name or YAML file the official run matches "
                          "(see `norga presets`); --set adjusts it")
    parser.add_argument("--output", type=Path, metavar="DIR", help="where the record goes (default: "
                        "RUN_DIR/evaluations; for official checkpoints PROMPT_DIR-evaluations beside the prompt run's)")
    parser.add_argument("--task", type=int, metavar="K", help="the checkpoint after task K (default: the last one)")
    parser.add_argument("--slots", choices=SLOT_MODES, default="predicted",
                        help="whose prompts each test image gets: the method's own choice (predicted, default), its "
                        "true task's (true: HiDe-Prompt, NoRGa, DualPrompt, S-Prompt++), or none: the frozen "
                        "backbone through the same head (none: the prompt methods)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="evaluate with another eval.*, prefix_layout, batchwise_prompt, data.root, device or "
                        "amp (repeatable); what was trained cannot change (with --preset: any key of the preset)")
    parser.add_argument("--quiet", action="store_true", help="plain timestamped lines instead of progress bars")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from norga.config import ConfigError
    from norga.engine.reevaluate import evaluation_config

    if args.task is not None and args.task < 1:
        raise ConfigError(f"--task {args.task}: tasks count from 1")
    official = [f"--{name.replace('_', '-')}" for name in ("tii_dir", "prompt_dir", "preset")
                if getattr(args, name) is not None]
    if args.run_dir is not None and official:
        raise ConfigError(f"give RUN_DIR or the official checkpoints (--tii-dir, --prompt-dir, --preset), not both: "
                          f"drop RUN_DIR or {', '.join(official)}")
    if args.run_dir is None:
        return handle_official(args)
    stored, config, changes = evaluation_config(args.run_dir, args.overrides)
    from norga.engine.reevaluate import reevaluate
    from norga.engine.run_dir import RunDirectory

    def evaluate(built, dist):
        RunDirectory(args.run_dir, create=False, write=False).check_benchmark(built.records)
        return reevaluate(args.run_dir, built, stored, changes, task=None if args.task is None else args.task - 1,
                          slots=args.slots, dist=dist)

    return evaluate_and_report(config, evaluate, args.output)


def evaluate_and_report(config, evaluate, output) -> int:
    """Resolve `config` and build its model and data (each process of a torchrun job), ``evaluate(built, dist)``,
    then on rank 0 write the record (to `output`, default the run's evaluations/) and print its table."""
    from norga.engine.build import build_run
    from norga.engine.reevaluate import format_evaluation, write_evaluation
    from norga.engine.resolve import resolve_config
    from norga.runtime.distributed import init_distributed, shutdown_distributed

    resolved = resolve_config(config)
    dist = init_distributed(resolved.device.type)
    finished = False
    try:
        evaluation = evaluate(build_run(resolved), dist)
        finished = True
    finally:
        shutdown_distributed(clean=finished)
    if dist.is_main:
        path = write_evaluation(evaluation, output)
        print(format_evaluation(evaluation))
        print(f"written: {path} (and .csv)")
    return 0


def handle_official(args: argparse.Namespace) -> int:
    """`norga evaluate --tii-dir DIR --prompt-dir DIR --preset NAME`: the official code's checkpoints."""
    from norga.config import ConfigError

    missing = [f"--{name.replace('_', '-')}" for name in ("tii_dir", "prompt_dir", "preset")
               if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"give a run directory (norga evaluate RUN_DIR) or the official checkpoints with "
                          f"--tii-dir, --prompt-dir and --preset ({', '.join(missing)} missing)")
    for name in ("tii_dir", "prompt_dir"):
        if not getattr(args, name).is_dir():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a folder: give the "
                                    "official run's --output_dir (it holds checkpoint/task<K>_checkpoint.pth)")
    from norga.engine.official_evaluation import default_output, evaluate_official, official_config

    _, config, changes = official_config(args.preset, args.overrides)

    def evaluate(built, dist):
        return evaluate_official(args.tii_dir, args.prompt_dir, args.preset, built, changes,
                                 task=None if args.task is None else args.task - 1, slots=args.slots, dist=dist)

    return evaluate_and_report(config, evaluate, args.output or default_output(args.prompt_dir))
