"""The ``norga`` command line: one sub-command per job.

One exit-code rule for every sub-command: 0 success; 2 bad input or an unusable environment (a one-line
message naming the problem and the fix, no traceback); 130 interrupted (Ctrl-C, with the command that
continues the run); 1 an internal error (the traceback, to report).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from norga import __version__
from norga.commands import SUBCOMMANDS
from norga.config import ConfigError

EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong": one line on stderr, exit code 2 (imported lazily: torch is slow)."""
    from norga.backbones import BackboneLoadError
    from norga.data import DataError
    from norga.storage import CheckpointError, StorageError

    return (ConfigError, DataError, BackboneLoadError, CheckpointError, StorageError, FileExistsError,
            FileNotFoundError, FloatingPointError)


def one_line(error: BaseException) -> str:
    """`error`'s message on one line; for an error raised in a data-loader worker (whose message torch turns
    into the worker's whole traceback), the original error's own message."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


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
    except KeyboardInterrupt:
        print(f"norga {args.command}: interrupted{_continue_hint(args, 'continue with')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        from norga.storage import StorageError

        hint = _continue_hint(args, "then resume with") if isinstance(error, StorageError) else ""
        print(f"norga {args.command}: error: {one_line(error)}{hint}", file=sys.stderr)  # bad input: one line
        return EXIT_USER_ERROR


def _continue_hint(args: argparse.Namespace, lead: str) -> str:
    """`; continue with `COMMAND`` once a handler has made a directory it can continue (``args.resumable``:
    (a file that exists once there is something to continue, the command))."""
    marker, command = getattr(args, "resumable", (None, None))
    return f"; {lead} `{command}`" if marker is not None and Path(marker).is_file() else ""


if __name__ == "__main__":
    sys.exit(main())
