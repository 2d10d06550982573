"""The refusal of commands that run whole experiments one after another under torchrun."""

from norga.config import ConfigError


def refuse_under_torchrun(command: str) -> None:
    """Commands that run whole experiments one after another stay single-process; `norga run` is data parallel."""
    from norga.runtime.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ConfigError(f"norga {command} runs in one process: launch it without torchrun, or run one "
                          "experiment data-parallel with `torchrun --nproc_per_node=N -m norga run PRESET`")
