"""The method registry: a method is a `ContinualMethod` subclass registered under its name with its settings.

``@register_method`` on a class with ``name`` and ``Settings`` makes it runnable as ``method: NAME``, with
its settings in the config section ``NAME:``. A name can be registered once. Built-in methods register when
`norga.methods` is imported (this module is only ever imported through it); methods published by another package
name their class in the ``norga.methods`` entry-point group of that package's metadata::

    [project.entry-points."norga.methods"]
    my_method = "my_package.my_module:MyMethod"

and are loaded the first time the registry is asked for its names.
"""

from __future__ import annotations

import dataclasses
import difflib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from norga.methods.base import ContinualMethod

#: The entry-point group through which other packages add methods.
ENTRY_POINT_GROUP = "norga.methods"

METHODS: dict[str, type[ContinualMethod]] = {}
M = TypeVar("M", bound="type[ContinualMethod]")
_entry_points_loaded = False


def register_method(cls: M) -> M:
    """Class decorator: make `cls` available to configs as ``method: cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier (the method's config name), got {name!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Settings", None)):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass of the method's settings")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered (by {METHODS[name].__qualname__}); choose another name")
    METHODS[name] = cls
    return cls


def load_entry_points() -> None:
    """Register the methods other packages declare in the ``norga.methods`` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        method = entry.load()  # a module that registers itself on import gives the same class: no error
        if getattr(method, "name", None) != entry.name:
            raise TypeError(f"entry point {entry.name!r} of group {ENTRY_POINT_GROUP!r} names {entry.value}, whose "
                            f"name is {getattr(method, 'name', None)!r}: the entry point's name must be the method's")
        register_method(method)


def method_names() -> list[str]:
    """Every registered method: the built-in ones and those of the ``norga.methods`` entry points."""
    load_entry_points()
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
