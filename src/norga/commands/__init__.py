"""Sub-commands of the `norga` CLI; each module's `add_parser(subparsers)` registers one."""

from norga.commands import presets, pretrain, quickstart, run

SUBCOMMANDS = (quickstart, run, presets, pretrain)
