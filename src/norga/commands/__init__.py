"""Sub-commands of the `norga` CLI; each module's `add_parser(subparsers)` registers one."""

from norga.commands import compare, evaluate, methods, presets, pretrain, quickstart, run, sweep

SUBCOMMANDS = (quickstart, run, evaluate, compare, sweep, methods, presets, pretrain)
