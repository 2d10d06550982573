"""Sub-commands of the `norga` CLI; each module's `add_parser(subparsers)` registers one."""

from norga.commands import compare, presets, pretrain, quickstart, run

SUBCOMMANDS = (quickstart, run, compare, presets, pretrain)
