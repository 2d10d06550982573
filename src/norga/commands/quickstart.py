"""`norga quickstart`: NoRGa, HiDe-Prompt and their pipeline without prompts on Split Fashion-MNIST."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PRESET = "quickstart"
#: label -> (registered method, its overrides); each method reads its own section of the preset
ROWS = {"NoRGa": ("norga", ()), "HiDe-Prompt": ("hide", ()), "No prompts": ("hide", ("hide.prompt.length=0",))}
BASELINE = "No prompts"  # HiDe-Prompt's pipeline, settings and seed with the prompts left out


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="run NoRGa, HiDe-Prompt and their pipeline without prompts on Split Fashion-MNIST",
        description="Split Fashion-MNIST (5 tasks x 2 classes) on norga's shipped ViT-Ti; shows what the prompts add "
        "against the same pipeline without them. Data from --data-root, $NORGA_DATA, "
        "/usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist) or norga's download folder "
        "($NORGA_DOWNLOADS, else ~/.cache/norga/data); when it is in none of them it is downloaded through "
        "torchvision (checksum-verified) into --data-root, else $NORGA_DATA, else the download folder.",
    )
    parser.add_argument("--data-root", help="folder holding fashion-mnist/ (the four IDX files)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"), help="where the three run directories go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a quickstart config value for every row")
    parser.add_argument("--quiet", action="store_true",
                        help="plain timestamped lines (one per epoch and evaluation) instead of progress bars")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="rows run at once, each in its own process with a share of the CPUs and timestamped "
                        "lines (default: all 3 on a machine with 2 CPUs or more; 1: one after another, with progress bars)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from norga.commands.single_process import refuse_under_torchrun
    from norga.comparison import MethodRun, method_config, run_methods
    from norga.report import format_comparison_table, format_matrix, format_prompt_effect

    refuse_under_torchrun("quickstart")

    from norga.engine.run_dir import run_stamp

    stamp = run_stamp()
    overrides = [*args.overrides] + ([f"data.root={args.data_root}"] if args.data_root else [])
    runs = [MethodRun(label, method_config(PRESET, method, overrides, method_overrides),
                      args.output_dir / f"quickstart-{label.lower().replace(' ', '-')}-{stamp}")
            for label, (method, method_overrides) in ROWS.items()]
    # all at once by default: 3 processes of 1 thread on 2 CPUs took 67 s, 2 at a time 85 s, one after another 95 s
    jobs = args.jobs if args.jobs is not None else len(runs) if len(os.sched_getaffinity(0)) > 1 else 1
    results = run_methods(runs, jobs, args.quiet)
    for result in results:
        print(f"\n{result.label}: accuracy matrix (rows: test task, columns: after training task)")
        print(format_matrix(result.matrix, result.matrix.num_steps - 1))
    print()
    print(format_comparison_table(results))
    baseline = next(r for r in results if r.label == BASELINE)
    print()
    print(format_prompt_effect([r for r in results if r is not baseline], baseline))
    return 0
