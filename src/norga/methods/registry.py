"""The method registry: a method is a `ContinualMethod` subclass registered under its name with its settings.

``@register_method`` on a class with ``name`` and ``Settings`` makes it runnable as ``method: NAME``, with
its settings in the config section ``NAME:``. A name can be registered once.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from norga.methods.base import ContinualMethod

METHODS: dict[str, type[ContinualMethod]] = {}
M = TypeVar("M", bound="type[ContinualMethod]")


def register_method(cls: M) -> M:
    """Class decorator: make `cls` available to configs as ``method: cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier (the method's config name), got {name!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Settings", None)):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass of the method's settings")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered (by {METHODS[name].__qualname__}); choose another name")
    METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered method (the built-in ones are registered when `norga.methods` is imported)."""
    import norga.methods  # noqa: F401 - registers the built-in methods

    return list(METHODS)


def method_class(name: str) -> type[ContinualMethod]:
    if name not in method_names():
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown method {name!r}{hint}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def settings_class(name: str) -> type:
    """The dataclass of method `name`'s settings."""
    return method_class(name).Settings
