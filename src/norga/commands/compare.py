"""`norga compare PRESET --methods a,b,...`: several methods on one benchmark, one table, one plot."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from norga.config_io import ConfigError, load_config

EPILOG = """examples:
  norga compare quickstart --methods norga,hide,linear_probe,ncm
  norga compare quickstart --methods norga,linear_probe --joint-upper-bound      # adds norga-joint, linear_probe-joint
  norga compare tiny_smoke --methods norga,hide --set hide:wtp.train.epochs=2   # METHOD:key=value: that method only
  norga compare --resume runs/compare-quickstart-20261124-141524                 # skips finished methods

Each method runs into DIR/LABEL (same preset, backbone and seed); DIR gets compare.json, compare.csv and
compare.png. A method name implies its defining settings (hide: prompt.gate=null)."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="run several methods on one benchmark; one table, one plot, compare.json",
        description="Run methods one after another on the same preset (benchmark, backbone, seed), each into its "
        "own run directory, then print one table (FA, CA, FFM, task-identity accuracy, wall time) and write one plot.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="preset name (see `norga presets`) or a YAML file")
    parser.add_argument("--methods", help="comma-separated registered method names, e.g. norga,hide,linear_probe,ncm")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="override a config value for every method, or with METHOD: for that method only")
    parser.add_argument("--joint-upper-bound", nargs="?", const="*", metavar="METHODS",
                        help="also run each method (or only the listed ones) trained jointly on all tasks")
    parser.add_argument("--dir", type=Path, help="the comparison directory (default: OUTPUT_DIR/compare-NAME-TIMESTAMP)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted comparison")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=handle)


def split_list(text: str | None, what: str) -> list[str]:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"{what} lists a method twice: {text}")
    return names


def split_overrides(overrides: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Shared ``key=value`` overrides, and ``METHOD:key=value`` ones per method."""
    shared, per_method = [], {name: [] for name in methods}
    for override in overrides:
        key = override.partition("=")[0]
        if ":" not in key:
            shared.append(override)
            continue
        method, _, rest = override.partition(":")
        if method not in per_method:
            raise ConfigError(f"--set {override}: {method!r} is not one of --methods ({', '.join(methods)})")
        per_method[method].append(rest)
    return shared, per_method


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


def handle(args: argparse.Namespace) -> int:
    from norga.comparison import ComparisonDirectory, MethodRun, method_config

    if args.resume:
        if args.config or args.methods or args.overrides or args.joint_upper_bound or args.dir:
            raise ConfigError("--resume takes the comparison's stored request: drop the other arguments")
        request, directory = ComparisonDirectory.read_request(args.resume), args.resume
    else:
        request = request_from(args)
        name = Path(request["config"]).stem if Path(request["config"]).suffix else request["config"]
        base = load_config(request["config"], split_overrides(request["overrides"], request["methods"])[0])
        directory = args.dir or Path(base.output_dir) / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    shared, per_method = split_overrides(request["overrides"], request["methods"])
    entries = [(method, False) for method in request["methods"]] + [(m, True) for m in request["joint_upper_bound"]]
    runs = []
    for method, joint in entries:  # every config is resolved (and checked) before anything is written
        label = f"{method}-joint" if joint else method
        config = method_config(request["config"], method, shared, per_method[method], joint=joint)
        runs.append(MethodRun(label, config, Path(directory) / label))
    return run_all(ComparisonDirectory(directory, request), runs, quiet=args.quiet)


def run_all(comparison, runs, quiet: bool) -> int:
    from norga.comparison import run_method
    from norga.engine.progress import Progress
    from norga.report import format_comparison_table

    results = []
    for index, run in enumerate(runs):
        print(f"[{index + 1}/{len(runs)}] {run.label} -> {run.run_dir}", file=sys.stderr, flush=True)
        results.append(run_method(run, Progress(enabled=not quiet), comparison.previous_seconds(run.label)))
        comparison.write(results, complete=len(results) == len(runs))
    print(format_comparison_table(results))
    print(f"table: {comparison.path / 'compare.csv'}  plot: {comparison.path / 'compare.png'}  "
          f"record: {comparison.path / 'compare.json'}")
    return 0
