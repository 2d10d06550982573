"""`norga quickstart`: NoRGa and HiDe-Prompt side by side on Split Fashion-MNIST, offline, in minutes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from norga.config_io import load_config

PRESET = "quickstart"
METHODS = {"NoRGa": [], "HiDe-Prompt": ["method=hide", "prompt.gate=null"]}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="run NoRGa and HiDe-Prompt on Split Fashion-MNIST with the shipped tiny backbone",
        description="Offline: Split Fashion-MNIST (5 tasks x 2 classes) on norga's shipped ViT-Ti. Data from "
        "--data-root, $NORGA_DATA or /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).",
    )
    parser.add_argument("--data-root", help="folder holding fashion-mnist/ (the four IDX files)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"), help="where the two run directories go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a quickstart config value for both methods")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from norga.engine.build import build_run
    from norga.engine.loop import run_experiment
    from norga.engine.progress import Progress
    from norga.report import format_matrix

    stamp = time.strftime("%Y%m%d-%H%M%S")
    summaries = {}
    for label, method_overrides in METHODS.items():
        overrides = [*method_overrides, *args.overrides] + ([f"data.root={args.data_root}"] if args.data_root else [])
        config = load_config(PRESET, overrides)
        run_dir = args.output_dir / f"quickstart-{label.lower()}-{stamp}"
        start = time.perf_counter()
        built = build_run(config)
        matrices = run_experiment(config, built.model, built.tasks, built.num_classes, run_dir, device=built.device,
                                  progress=Progress(enabled=not args.quiet), records=built.records)
        last = len(built.tasks) - 1
        accuracy = matrices["accuracy"]
        summaries[label] = (accuracy.final_average_accuracy(last), accuracy.cumulative_average_accuracy(last),
                            accuracy.forgetting(last), matrices["task_identity"].final_average_accuracy(last),
                            time.perf_counter() - start, run_dir)
        print(f"\n{label}: accuracy matrix (rows: test task, columns: after training task)")
        print(format_matrix(accuracy, last))
    print(f"\n{'method':12s} {'FA':>7s} {'CA':>7s} {'FFM':>7s} {'task-id':>8s} {'time s':>7s}  run directory")
    for label, (fa, ca, ffm, tii, seconds, run_dir) in summaries.items():
        print(f"{label:12s} {fa:7.2f} {ca:7.2f} {ffm:7.2f} {tii:8.2f} {seconds:7.1f}  {run_dir}")
    return 0
