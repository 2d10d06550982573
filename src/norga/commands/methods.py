"""`norga methods [NAME]`: every registered method with its settings and defaults, or one in full.

The rows (`setting_rows`), the notes beside each setting in the code (`setting_notes`) and a method's one-line
summary (`first_line`) are also what the docs site's generated method pages show (`norga.docs_pages`)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
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


def setting_notes(settings_type: type, prefix: str = "") -> dict[str, str]:
    """The comment beside (or the ``#:`` comment above) each field of a settings dataclass, nested ones flattened,
    by dotted key: what the code says a setting means, without a second copy in the docs."""
    notes: dict[str, str] = {}
    for cls in reversed(settings_type.__mro__):
        if dataclasses.is_dataclass(cls) and cls is not object:
            notes.update(_own_field_comments(cls))
    result = {f"{prefix}{key}": note for key, note in notes.items()}
    defaults = settings_type()
    for f in dataclasses.fields(settings_type):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            result.update(setting_notes(type(value), f"{prefix}{f.name}."))
    return result


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        lines = textwrap.dedent("".join(inspect.getsourcelines(cls)[0])).splitlines(keepends=True)
    except (OSError, TypeError):
        return {}
    comments = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, row = [], node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                above.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            text = _trailing_comment(lines[node.end_lineno - 1]) or " ".join(above)
            if text:
                comments[node.target.id] = text
    return comments


def _trailing_comment(line: str) -> str:
    """The ``# ...`` at the end of a line of code (a ``#`` inside a string does not count)."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(line).readline):
            if token.type == tokenize.COMMENT:
                text = token.string.lstrip("#").strip()
                return "" if text.startswith("noqa") else text
    except (tokenize.TokenError, IndentationError):
        return ""
    return ""


def first_line(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def describe(name: str, full: bool) -> str:
    from norga.methods import method_class

    cls = method_class(name)
    lines = [f"{name:13s} {first_line(cls.__doc__)}"]
    if full:
        lines.append(f"  settings: section `{name}:` in a preset, or `norga run PRESET --set {name}.KEY=VALUE`")
        notes = setting_notes(cls.Settings)
        for key, kind, default in setting_rows(cls.Settings):
            note = f"  # {notes[key]}" if key in notes else ""
            lines.append(f"  {name}.{key:36s} {default!r:24}  {kind}{note}")
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
