"""The ``norga`` command line: one sub-command per job (later issues add run, quickstart, ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from norga import __version__
from norga.commands import SUBCOMMANDS
from norga.config_io import ConfigError


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong": one line on stderr, exit code 2 (imported lazily: torch is slow)."""
    from norga.backbones import BackboneLoadError
    from norga.data import DataError

    return (ConfigError, DataError, BackboneLoadError, FileExistsError, FileNotFoundError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each sub-command module adds its own sub-parser here."""
    parser = argparse.ArgumentParser(
        prog="norga",
        description="Prompt-based continual learning on pre-trained Vision Transformers "
        "(NoRGa, HiDe-Prompt and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"norga {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``norga`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        print(f"norga {args.command}: error: {error}", file=sys.stderr)  # bad input: one line, no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
