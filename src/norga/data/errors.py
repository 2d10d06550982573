"""Errors of the data layer: each message names the problem and the fix."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """The data is not where it was looked for; the message says where it looked and how to get it."""


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (the message names the file)."""


class DataLayoutError(ValueError):
    """The data is there but not as the benchmark needs it: missing class folders, an empty split,
    a class count that does not match, a split manifest that does not match the files."""
