"""`norga sweep SPEC.yaml` / `norga sweep BASE --grid KEY=V1,V2 ...`: a grid of trials on Ray, resumable, with
mean ± sd over seeds and paired differences; `--report DIR [DIR ...]` re-prints and re-plots a sweep, or the
union of several into `--into`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from norga.config import ConfigError
from norga.storage import write_json

EPILOG = """examples:
  norga sweep quickstart --grid method=norga,hide --grid seed=0,1,2
  norga sweep sweep.yaml --cpus-per-trial 2
  norga sweep sweep.yaml --address 10.0.0.1:6379          # an existing Ray cluster (`ray start --head` ...)
  norga sweep --resume runs/sweep-quickstart-20261201-101500   # unfinished trials only, from their checkpoints
  norga sweep --report runs/sweep-quickstart-20261201-101500   # tables and plot again, nothing runs
  norga sweep --report runs/sweep-a runs/sweep-b --into runs/a+b --pairs-with norga   # several sweeps as one

A spec file (YAML):
  base: quickstart                       # a preset or config YAML (or an axis `preset: [...]` instead)
  axes: {method: [norga, hide], seed: [0, 1, 2], wtp.train.epochs: [3, 5]}
  exclude: [{method: hide, wtp.train.epochs: 5}]
  set: {data.train_per_class: 100}       # for every trial

Each trial runs into DIR/<axis values> (a normal run directory); DIR gets sweep.yaml, manifest.json,
sweep.csv/json, summary.csv/json (mean ± sd per method, setting, benchmark), paired.csv/json and sweep.png."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="run a grid of methods x seeds x settings x presets on Ray; mean ± sd and paired differences",
        description="Expand a grid into trials, run them as Ray tasks (a local instance, or a cluster with "
        "--address), each into its own run directory, and aggregate them over seeds.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", nargs="?", metavar="SPEC.yaml|BASE",
                        help="a sweep spec file, or a base preset / config YAML with --grid")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="an axis: method, seed, preset or any config key (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every trial (repeatable)")
    parser.add_argument("--dir", type=Path, help="the sweep directory (default: OUTPUT_DIR/sweep-NAME-TIMESTAMP)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="run a sweep's unfinished trials")
    parser.add_argument("--report", type=Path, nargs="+", metavar="DIR",
                        help="re-print and re-plot a sweep, or several as one table (with --into); runs nothing")
    parser.add_argument("--into", type=Path, metavar="OUT",
                        help="with several --report directories: the folder for their combined tables and plot")
    parser.add_argument("--pairs-with", metavar="METHOD",
                        help="print only the paired differences that involve METHOD (the files keep all)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="N",
                        help="CPUs (and torch threads) per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="N",
                        help="GPUs per trial: 0 (default), a fraction, or 1")
    parser.add_argument("--address", metavar="HOST:PORT",
                        help="join this Ray cluster (host:port of `ray start --head`)")
    parser.add_argument("--max-retries", type=int, default=2, metavar="N",
                        help="re-runs of a trial whose worker or node dies, each from its checkpoint (default 2)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from norga.commands.single_process import refuse_under_torchrun
    from norga.sweep.directory import SweepDirectory

    refuse_under_torchrun("sweep")
    if args.report:
        _refuse_with(args, "--report", ("spec", "grid", "overrides", "dir", "resume"))
        directories = [SweepDirectory.open(path) for path in args.report]
        if len(directories) > 1 and args.into is None:
            raise ConfigError("several --report directories are written together: add --into OUT (a new folder "
                              "for their combined tables and plot)")
        return report(directories, args.into, args.pairs_with)
    if args.into or args.pairs_with:
        raise ConfigError(f"{'--into' if args.into else '--pairs-with'} goes with --report DIR ...")
    resources = _resources(args)
    if args.resume:
        _refuse_with(args, "--resume", ("spec", "grid", "overrides", "dir"))
        directory = SweepDirectory.open(args.resume)
        configs = _configs(directory.spec, [_trial(entry) for entry in directory.trials])
        _ready()
    else:
        spec, name = _spec(args)
        from norga.sweep.spec import expand

        trials = expand(spec)
        configs = _configs(spec, trials)  # every trial's config is resolved (and checked) before anything is written
        _ready()
        directory = SweepDirectory.create(args.dir or _default_dir(spec, name, configs), spec, trials,
                                          [c.method for c in configs.values()], [c.seed for c in configs.values()])
        print(f"sweep directory: {directory.path} ({len(trials)} trials)", file=sys.stderr, flush=True)
    return run(directory, configs, resources)


def run(directory, configs, resources) -> int:
    """Run the trials not yet complete, then write and print the tables; 1 if any trial failed."""
    from norga.sweep.directory import COMPLETE, FAILED
    from norga.sweep.executor import run_trials

    with directory.lock():
        for entry in directory.trials:  # finished earlier (also when a previous sweep process died after it)
            if entry["status"] != COMPLETE and directory.run_is_complete(entry):
                directory.update(entry["id"], status=COMPLETE, error=None)
        todo = {entry["id"]: configs[entry["id"]] for entry in directory.trials
                if not (entry["status"] == COMPLETE and directory.run_is_complete(entry))}
        if todo:
            run_trials(directory, todo, resources)
    report(directory)
    failed = [entry["id"] for entry in directory.trials if entry["status"] == FAILED]
    if failed:
        print(f"norga sweep: {len(failed)} of {len(directory.trials)} trials failed ({', '.join(failed)}; errors in "
              f"{directory.path / 'manifest.json'}): `norga sweep --resume {directory.path}` runs them again",
              file=sys.stderr)
        return 1
    return 0


def report(directories, into: Path | None = None, pairs_with: str | None = None) -> int:
    """Tables and plot from the trials' results.json files (of one sweep directory, or of several written into
    `into`); prints the summary and the paired differences (those involving `pairs_with` when given)."""
    from norga.sweep import aggregate
    from norga.sweep.plot import SWEEP_PLOT, plot_sweep

    directories = directories if isinstance(directories, list) else [directories]
    if into is None:
        rows, out = aggregate.trial_rows(directories[0]), directories[0].path
    else:
        rows, out = aggregate.combined_rows(directories), Path(into)
        out.mkdir(parents=True, exist_ok=True)
        write_json({"sweeps": [str(d.path) for d in directories]}, out / COMBINED_SOURCES)
    summary, pairs = aggregate.summarize(rows), aggregate.paired_differences(rows)
    aggregate.write_tables(out, rows, summary, pairs)
    plot_sweep(summary, rows, out / SWEEP_PLOT)
    complete = sum(row["status"] == "complete" for row in rows)
    print(f"{complete} of {len(rows)} trials complete; mean ± sd over seeds:")
    print(aggregate.format_summary(summary))
    shown = [p for p in pairs if pairs_with in (None, p["method_a"], p["method_b"])]
    if shown:
        print("\npaired differences on shared seeds:")
        print(aggregate.format_paired(shown))
    print(f"\ntables: {out}/{{sweep,summary,paired}}.csv  plot: {out / SWEEP_PLOT}")
    return 0


#: In a combined report's folder: the sweep directories it was made from.
COMBINED_SOURCES = "sources.json"


# --------------------------------------------------------------------------- helpers
def _refuse_with(args: argparse.Namespace, option: str, others: tuple[str, ...]) -> None:
    given = [name for name in others if getattr(args, name)]
    if given:
        flags = ", ".join("SPEC/BASE" if name == "spec" else "--" + {"overrides": "set"}.get(name, name)
                          for name in given)
        raise ConfigError(f"{option} takes the sweep directory's stored request: drop {flags}")


def _resources(args: argparse.Namespace):
    from norga.sweep.executor import Resources

    resources = Resources(args.cpus_per_trial, args.gpus_per_trial, args.address, args.max_retries)
    resources.check()
    return resources


def _ready() -> None:
    """Ray must be installed before a sweep directory is made."""
    from norga.sweep.executor import require_ray

    require_ray()


def _spec(args: argparse.Namespace):
    from norga.sweep.spec import is_spec_file, load_spec, spec_from_grid

    if args.spec and is_spec_file(args.spec):
        if args.grid:
            raise ConfigError(f"{args.spec} is a sweep spec with its own axes: drop --grid, or give a base preset")
        return load_spec(args.spec, args.overrides), Path(args.spec).stem
    if not args.grid:
        raise ConfigError("give a sweep spec (YAML with `axes`), or a base preset with --grid KEY=V1,V2, e.g. "
                          "`norga sweep quickstart --grid method=norga,hide --grid seed=0,1,2`, or --resume DIR")
    spec = spec_from_grid(args.spec, args.grid, args.overrides)
    name = (Path(args.spec).stem if Path(args.spec).suffix else args.spec) if args.spec else "presets"
    return spec, name


def _trial(entry: dict):
    from norga.sweep.spec import Trial

    return Trial(entry["id"], entry["assignment"])


def _configs(spec, trials) -> dict:
    from norga.sweep.spec import trial_config

    return {trial.id: trial_config(spec, trial) for trial in trials}


def _default_dir(spec, name: str, configs: dict) -> Path:
    from norga.sweep.directory import SweepDirectory

    output_dir = next(iter(configs.values())).output_dir
    return SweepDirectory.free_name(Path(output_dir), f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
