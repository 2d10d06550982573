"""`norga run CONFIG [--set key=value ...]` and `norga run --resume RUN_DIR`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from norga.config_io import load_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run one continual-learning experiment (a preset or YAML file) into a run directory",
        description="Run an experiment: both official stages per task in one run, checkpointed after every "
        "epoch. Example: norga run cifar100_sup21k_norga --set data.root=/data --set norga.wtp.train.epochs=5. "
        "Data parallel on N processes: torchrun --nproc_per_node=N -m norga run ... (gloo on CPU, nccl on GPU).",
    )
    parser.add_argument("config", nargs="?", help="preset name (see `norga presets`) or a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set norga.gate=tanh (repeatable)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue an interrupted run (with --set: change learning rates, epochs still ahead, "
                        "eval.batch_size or data.workers; recorded in the run directory)")
    parser.add_argument("--run-dir", type=Path, help="where to write the run (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    parser.add_argument("--quiet", action="store_true",
                        help="plain timestamped lines (one per epoch and evaluation) instead of progress bars")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from norga.config import ConfigError

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run directory's own config: drop CONFIG (--set may change "
                              "learning rates, epochs still ahead, eval.batch_size and data.workers)")
        config = resume_config(args.resume, args.overrides)
        run_dir = args.resume
    else:
        if not args.config:
            raise ConfigError("give a preset name or YAML file (see `norga presets`), or --resume RUN_DIR")
        config = load_config(args.config, args.overrides)
        name = config.name or (Path(args.config).stem if Path(args.config).suffix else args.config)
        from norga.engine.run_dir import run_stamp

        run_dir = args.run_dir or Path(config.output_dir) / f"{name}-{run_stamp()}"
    from norga.engine.build import build_run  # torch, timm and data readers load only for a run
    from norga.engine.loop import run_experiment
    from norga.engine.progress import Progress
    from norga.engine.resolve import resolve_config
    from norga.runtime.distributed import init_distributed, shutdown_distributed

    resolved = resolve_config(config)  # once: the device, amp and data root the run records
    dist = init_distributed(resolved.device.type)  # under torchrun: join the job
    finished = False
    try:
        run_dir = Path(dist.broadcast_object(str(run_dir)))  # one timestamp for every process
        args.resumable = (run_dir / "config.yaml", f"norga run --resume {run_dir}")  # for Ctrl-C and a full disk
        built = build_run(resolved)
        if dist.enabled and built.device.type == "cuda":
            built = replace(built, device=torch_device_of_rank(dist.local_rank))
        matrices = run_experiment(built, run_dir, resume=bool(args.resume),
                                  progress=Progress.for_command(args.quiet, enabled=dist.is_main), dist=dist)
        finished = True
    finally:
        shutdown_distributed(clean=finished)
    if dist.is_main:
        print_summary(run_dir, matrices)
    return 0


def resume_config(run_dir: Path, overrides: list[str]):
    """The config of the run in `run_dir` with `overrides` applied, which must be safe to change on resume."""
    from norga.config import ConfigError
    from norga.engine.resume_changes import check_resume_changes

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a norga run directory (it holds no config.yaml): give the folder "
                          "`norga run` created and printed, e.g. runs/NAME-YYYYMMDD-HHMMSS.mmm-PID")
    config = load_config(run_dir / "config.yaml", overrides)
    check_resume_changes(load_config(run_dir / "config.yaml"), config)
    return config


def torch_device_of_rank(local_rank: int):
    """This process's GPU in a multi-GPU job (torchrun's LOCAL_RANK)."""
    import torch

    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def print_summary(run_dir: Path, matrices: dict) -> None:
    """The final accuracy matrix and metrics on stdout."""
    from norga.engine.run_dir import metrics_of
    from norga.report import format_matrix, format_metric

    accuracy, identity = matrices["accuracy"], matrices.get("task_identity")
    last = accuracy.num_steps - 1
    m = metrics_of(accuracy, last)
    print(f"run directory: {run_dir}")
    print(format_matrix(accuracy, last))
    task_identity = None if identity is None else identity.final_average_accuracy(last)
    within = matrices.get("task_incremental")
    task_incremental = None if within is None else within.final_average_accuracy(last)
    print(f"FA {format_metric(m['final_average_accuracy'])}  CA {format_metric(m['cumulative_average_accuracy'])}  "
          f"FFM {format_metric(m['forgetting'])}  task-identity {format_metric(task_identity)}  "
          f"task-incremental {format_metric(task_incremental)}")
