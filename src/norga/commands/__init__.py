"""Sub-commands of the `norga` CLI; each module's `add_parser(subparsers)` registers one."""

import os

from norga.config_io import ConfigError


def refuse_under_torchrun(command: str) -> None:
    """Commands that run whole experiments one after another stay single-process; `norga run` is data parallel."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"norga {command} runs in one process: launch it without torchrun, or run one "
                          "experiment data-parallel with `torchrun --nproc_per_node=N -m norga run PRESET`")


from norga.commands import compare, presets, pretrain, quickstart, run  # noqa: E402

SUBCOMMANDS = (quickstart, run, compare, presets, pretrain)
