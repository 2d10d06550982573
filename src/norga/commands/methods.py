"""`norga methods [NAME]`: every registered method with its settings and defaults, or one in full."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from norga.config import ConfigError
from norga.config_io import describe_type


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list the registered methods and their settings",
                                   description="Every registered method, its settings section and defaults. "
                                   "A run sets one with `norga run PRESET --set METHOD.KEY=VALUE`, e.g. `norga run quickstart --set norga.gate=tanh`.")
    parser.add_argument("name", nargs="?", help="a method to show in full (every setting, its type and default)")
    parser.set_defaults(handler=handle)


def setting_rows(settings_type: type, prefix: str = "") -> list[tuple[str, str, object]]:
    """(dotted key, type as words, default) of every setting of a settings dataclass, nested ones flattened."""
    hints = typing.get_type_hints(settings_type, include_extras=True)
    defaults = settings_type()
    rows = []
    for f in dataclasses.fields(settings_type):
        value, dotted = getattr(defaults, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows += [(key, kind, getattr_path(value, key[len(dotted) + 1:]))
                     for key, kind, _ in setting_rows(type(value), dotted + ".")]
        else:
            rows.append((dotted, describe_type(hints[f.name]), value))
    return rows


def getattr_path(value: object, dotted: str) -> object:
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def describe(name: str, full: bool) -> str:
    from norga.methods import method_class

    cls = method_class(name)
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    lines = [f"{name:13s} {doc}"]
    if full:
        lines.append(f"  settings: section `{name}:` in a preset, or `norga run PRESET --set {name}.KEY=VALUE`")
        for key, kind, default in setting_rows(cls.Settings):
            lines.append(f"  {name}.{key:36s} {default!r:24}  {kind}")
    return "\n".join(lines)


def handle(args: argparse.Namespace) -> int:
    from norga.methods import method_names

    if args.name:
        if args.name not in method_names():
            from norga.config_io import _suggest

            raise ConfigError(f"unknown method {args.name!r}{_suggest(args.name, method_names())}; "
                              "`norga methods` lists them")
        print(describe(args.name, full=True))
        return 0
    for name in method_names():
        print(describe(name, full=True) + "\n")
    return 0
