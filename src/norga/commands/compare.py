"""`norga compare PRESET --methods a,b,...`: several methods on one benchmark, one table, one plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from norga.config import ConfigError
from norga.config_io import load_config

EPILOG = """examples:
  norga compare quickstart --methods norga,hide,linear_probe,ncm
  norga compare quickstart --methods norga,linear_probe --joint-upper-bound      # adds norga-joint, linear_probe-joint
  norga compare tiny_smoke --methods norga,hide --set hide:hide.wtp.train.epochs=2   # METHOD:key=value: that method only
  norga compare quickstart --methods norga --joint-upper-bound --set norga-joint:norga.wtp.train.epochs=15  # joint run only
  norga compare --resume runs/compare-quickstart-20261124-141524.123-4567        # skips finished methods

Each method runs into DIR/LABEL (same preset, backbone and seed); DIR gets compare.json, compare.csv and
compare.png. Each method reads its own section of the config (hide: HiDe-Prompt, no gate)."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="run several methods on one benchmark; one table, one plot, compare.json",
        description="Run methods one after another on the same preset (benchmark, backbone, seed), each into its "
        "own run directory, then print one table (FA, CA, FFM, task-identity and task-incremental accuracy, wall "
        "time) and write one plot.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="preset name (see `norga presets`) or a YAML file")
    parser.add_argument("--methods", help="comma-separated registered method names, e.g. norga,hide,linear_probe,ncm")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="override a config value for every method, or with METHOD: (or METHOD-joint:) for one only")
    parser.add_argument("--joint-upper-bound", nargs="?", const="*", metavar="METHODS",
                        help="also run each method (or only the listed ones) trained jointly on all tasks")
    parser.add_argument("--dir", type=Path, help="the comparison directory (default: OUTPUT_DIR/compare-NAME-TIMESTAMP)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted comparison")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="methods run at once, each in its own process with a share of the CPUs and timestamped "
                        "lines (default 1: one after another)")
    parser.add_argument("--quiet", action="store_true",
                        help="plain timestamped lines (one per epoch and evaluation) instead of progress bars")
    parser.set_defaults(handler=handle)


def split_list(text: str | None, what: str) -> list[str]:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"{what} lists a method twice: {text}")
    return names


def split_overrides(overrides: list[str], targets: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Shared ``key=value`` overrides, and ``TARGET:key=value`` ones per target (a method or a joint label)."""
    shared, per_target = [], {name: [] for name in targets}
    for override in overrides:
        key = override.partition("=")[0]
        if ":" not in key:
            shared.append(override)
            continue
        target, _, rest = override.partition(":")
        if target not in per_target:
            raise ConfigError(f"--set {override}: {target!r} is not one of --methods or their joint runs "
                              f"({', '.join(targets)})")
        per_target[target].append(rest)
    return shared, per_target


def entries_of(request: dict) -> list[tuple[str, str, bool]]:
    """(label, method, joint) of every run: the methods, then their joint upper bounds (label METHOD-joint)."""
    return ([(method, method, False) for method in request["methods"]]
            + [(f"{method}-joint", method, True) for method in request["joint_upper_bound"]])


def request_from(args: argparse.Namespace) -> dict:
    """What the comparison runs, as stored in compare.json (so `--resume` can repeat it)."""
    if not args.config or not args.methods:
        raise ConfigError("give a preset (or YAML file) and --methods, e.g. `norga compare quickstart "
                          "--methods norga,hide,linear_probe,ncm`, or --resume DIR")
    methods = split_list(args.methods, "--methods")
    joint = methods if args.joint_upper_bound == "*" else split_list(args.joint_upper_bound, "--joint-upper-bound")
    unknown = [name for name in joint if name not in methods]
    if unknown:
        raise ConfigError(f"--joint-upper-bound names {unknown}, which are not in --methods ({', '.join(methods)})")
    return {"config": args.config, "methods": methods, "joint_upper_bound": joint, "overrides": list(args.overrides)}


def refuse_unreached_sections(overrides: list[str], methods: list[str]) -> None:
    """A shared ``--set METHOD.KEY=...`` must reach one of the compared methods (else it would change nothing)."""
    from norga.methods import method_names

    for override in overrides:
        section = override.partition("=")[0].strip().split(".")[0]
        if section in method_names() and section not in methods:
            raise ConfigError(f"--set {override} reaches no method of this comparison ({', '.join(dict.fromkeys(methods))}):"
                              f" add {section} to --methods or drop it")


def handle(args: argparse.Namespace) -> int:
    from norga.commands.single_process import refuse_under_torchrun
    from norga.comparison import ComparisonDirectory, MethodRun, method_config

    refuse_under_torchrun("compare")

    if args.resume:
        if args.config or args.methods or args.overrides or args.joint_upper_bound or args.dir:
            raise ConfigError("--resume takes the comparison's stored request: drop the other arguments")
        request, directory = ComparisonDirectory.read_request(args.resume), args.resume
    else:
        request = request_from(args)
        directory = args.dir
    entries = entries_of(request)
    shared, per_target = split_overrides(request["overrides"], list(dict.fromkeys(t for e in entries for t in e[:2])))
    if directory is None:
        name = Path(request["config"]).stem if Path(request["config"]).suffix else request["config"]
        output_dir = load_config(request["config"], shared, other_sections=True).output_dir
        from norga.engine.run_dir import run_stamp

        directory = Path(output_dir) / f"compare-{name}-{run_stamp()}"
    refuse_unreached_sections(shared, [method for _, method, _ in entries])
    runs = []
    for label, method, joint in entries:  # every config is resolved (and checked) before anything is written
        own = per_target[method] + (per_target[label] if joint else [])  # METHOD: applies to its joint run too
        config = method_config(request["config"], method, shared, own, joint=joint)
        runs.append(MethodRun(label, config, Path(directory) / label))
    args.resumable = (Path(directory) / "compare.json", f"norga compare --resume {directory}")  # for Ctrl-C
    with ComparisonDirectory(directory, request) as comparison:
        return run_all(comparison, runs, quiet=args.quiet, jobs=args.jobs)


def run_all(comparison, runs, quiet: bool, jobs: int = 1) -> int:
    from norga.comparison import run_methods
    from norga.report import comparison_title, format_comparison_table

    title = comparison_title([run.config for run in runs])
    for index, run in enumerate(runs):
        print(f"[{index + 1}/{len(runs)}] {run.label} -> {run.run_dir}", file=sys.stderr, flush=True)
    results = run_methods(runs, jobs, quiet, comparison.previous_seconds,
                          lambda finished: comparison.write(finished, complete=len(finished) == len(runs), title=title))
    print(format_comparison_table(results))
    print(f"table: {comparison.path / 'compare.csv'}  plot: {comparison.path / 'compare.png'}  "
          f"record: {comparison.path / 'compare.json'}")
    return 0
