"""Sub-commands of the `norga` CLI; each module's `add_parser(subparsers)` registers one."""

from norga.config_io import ConfigError


def refuse_under_torchrun(command: str) -> None:
    """Commands that run whole experiments one after another stay single-process; `norga run` is data parallel."""
    from norga.engine.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ConfigError(f"norga {command} runs in one process: launch it without torchrun, or run one "
                          "experiment data-parallel with `torchrun --nproc_per_node=N -m norga run PRESET`")


from norga.commands import compare, evaluate, methods, presets, pretrain, quickstart, run, sweep  # noqa: E402

SUBCOMMANDS = (quickstart, run, evaluate, compare, sweep, methods, presets, pretrain)
