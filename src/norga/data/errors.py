"""Errors of the data layer: each message names the problem and the fix."""

from __future__ import annotations


class DataError(Exception):
    """Base of every error about the user's data (a command line reports these in one line)."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The data is not where it was looked for; the message says where it looked and how to get it."""


class UnreadableImageError(DataError, ValueError):
    """An image file that cannot be decoded (the message names the file)."""


class DataLayoutError(DataError, ValueError):
    """The data is there but not as the benchmark needs it: missing class folders, an empty split,
    a class count that does not match, a split manifest that does not match the files."""


class BenchmarkOptionError(DataError, ValueError):
    """A benchmark name or option that does not fit: an unknown benchmark or dataset, more tasks than classes,
    a switch given to a benchmark it does not apply to."""
