"""Reading and writing `RunConfig`: presets by name, YAML files, ``dotted.key=value`` overrides, validation.

Validation happens here and only here, from the field types: ``Literal`` choices, `Range` bounds, `OneOf`
run-time choices, optional values, lists, nested sections; unknown keys and values get a "did you mean".
The method's section is typed by its ``Settings`` class (`norga.methods.registry`); sections of other
registered methods in a file (presets that serve several methods) are validated too, then left out.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from norga.config import SHARED_KEYS, ConfigError, OneOf, Range, RunConfig

PRESET_PACKAGE = "norga.presets"
#: The method a config runs when it names none.
DEFAULT_METHOD = "norga"

#: Keys of the old shared schema that are now a method's own settings: where to find them.
MOVED_KEYS = {"prompt": "norga.prompt / norga.gate (hide.prompt for HiDe-Prompt)", "tii": "norga.tii (or hide.tii)",
              "wtp": "norga.wtp (or hide.wtp)"}


def preset_names() -> list[str]:
    """Names of the presets shipped in the package."""
    folder = resources.files(PRESET_PACKAGE)
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, preset_names())}; `norga presets` lists them")
    return resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()


def read_source(source: str | Path | None) -> dict:
    """The mapping a preset name or YAML file holds (empty for None)."""
    if source is None:
        return {}
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    else:
        text = preset_text(str(source))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of config keys")
    return _unshared(data)


def _unshared(value: Any) -> Any:
    """A copy in which no two places share a mapping or list (YAML anchors and ``<<`` merges alias them)."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def load_config(source: str | Path | None = None, overrides: Sequence[str] = (), *,
                other_sections: bool = False) -> RunConfig:
    """A preset name or YAML file (missing keys keep defaults), then ``key=value`` overrides, validated.

    An override into another method's section is refused (it would not apply to this run) unless
    `other_sections` (``norga compare``: shared overrides reach every method's run).
    """
    data = read_source(source)
    for override in overrides:
        key, value = parse_override(override)
        _assign(data, key, value)
    config = build_config(data)
    if not other_sections:
        for override in overrides:
            section = override.partition("=")[0].strip().split(".")[0]
            if section != config.method and section in _method_names():
                raise ConfigError(f"--set {override} does not apply: this run's method is {config.method!r}, whose "
                                  f"settings are {config.method}.*; add --set method={section} to run {section}")
    return config


def build_config(data: dict) -> RunConfig:
    """A validated `RunConfig` from its YAML mapping (shared keys, the method's section, other methods' sections)."""
    data = copy.deepcopy(data)
    names = _method_names()
    method = data.pop("method", DEFAULT_METHOD)
    if method not in names:
        raise ConfigError(f"method must be one of {sorted(names)}, got {method!r}{_suggest(str(method), names)}; "
                          "`norga methods` lists them")
    sections = {name: data.pop(name) for name in list(data) if name in names}
    for key in data:
        if key not in SHARED_KEYS:
            hint = f": moved to {MOVED_KEYS[key]}" if key in MOVED_KEYS else _suggest(str(key), [*SHARED_KEYS, *names])
            raise ConfigError(f"unknown config key {key!r}{hint}")
    settings = {name: _checked(_build(_settings_class(name), value, name), name) for name, value in sections.items()}
    shared = _build(RunConfig, data, "", default_config(method))
    shared.settings = settings.get(method, shared.settings)
    return shared


def _checked(settings: Any, section: str) -> Any:
    """A method's settings after the cross-field checks (``check(dotted key)``, raising ConfigError) of its nested
    sections (e.g. every `OptimConfig`'s) and then its own, where they have one."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            _checked(value, f"{section}.{f.name}")
    check = getattr(settings, "check", None)
    if callable(check):
        check(section)
    return settings


def parse_override(override: str) -> tuple[str, Any]:
    """``dotted.key=value`` -> (key, value parsed as YAML: numbers, true/false, null, [lists], {maps})."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. eval.batch_size=64")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse the value of {override!r}: {error}") from error


def in_method_section(override: str, method: str) -> str:
    """``key=value`` with a key that is neither shared nor a method's section read relative to `method`'s
    section (``wtp.train.lr=...`` -> ``norga.wtp.train.lr=...``); other overrides unchanged."""
    key = override.partition("=")[0].strip()
    first = key.split(".")[0]
    if first in SHARED_KEYS or first in _method_names() or "=" not in override:
        return override
    return f"{method}.{override.strip()}"


def apply_override(config: RunConfig, override: str) -> None:
    """Set one ``dotted.key=value`` on `config` in place (validated like a file)."""
    data = config.to_dict()
    key, value = parse_override(override)
    _assign(data, key, value)
    rebuilt = build_config(data)
    for f in dataclasses.fields(config):
        setattr(config, f.name, getattr(rebuilt, f.name))


def default_config(method: str = DEFAULT_METHOD, **shared: Any) -> RunConfig:
    """A `RunConfig` of registered method `method` with its default settings (`shared`: other top-level fields)."""
    return RunConfig(method=method, settings=_settings_class(method)(), **shared)


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config` reads it back identically."""
    from norga.storage import write_text

    write_text(config_yaml(config), path)


def config_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def flat_settings(settings: Any, prefix: str = "") -> dict[str, Any]:
    """``{"dotted.key": value}`` of a settings dataclass (nested sections flattened)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value, dotted = getattr(settings, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flat_settings(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def describe_type(field_type: Any) -> str:
    """A field type as a reader would say it: "an integer >= 1", "one of ['adam', 'sgd']", ..."""
    return _describe(field_type)


# --------------------------------------------------------------------------- internals
def _method_names() -> list[str]:
    from norga.methods.registry import method_names

    return method_names()


def _settings_class(name: str) -> type:
    from norga.methods.registry import settings_class

    return settings_class(name)


def _assign(data: dict, dotted: str, value: Any) -> None:
    """Set `dotted` in the nested mapping `data`; a mapping value merges into an existing section."""
    parts = dotted.split(".")
    target = data
    for depth, part in enumerate(parts[:-1]):
        existing = target.get(part)
        if existing is None:
            existing = target[part] = {}
        if not isinstance(existing, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} is a value, not a section: cannot set {dotted}")
        target = existing
    last = parts[-1]
    if isinstance(value, dict) and isinstance(target.get(last), dict):
        target[last] = {**target[last], **value}
    else:
        target[last] = value


def _build(cls: type, data: Any, prefix: str, base: Any = None):
    """`cls` from a mapping; keys it does not give keep `base`'s values (the section's own defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "settings"]
    result = copy.deepcopy(base) if base is not None else cls()
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(str(key), names)}")
        field_type = hints[key]
        if dataclasses.is_dataclass(field_type):
            setattr(result, key, _build(field_type, value, dotted, getattr(result, key)))
        else:
            setattr(result, key, _check(value, field_type, dotted))
    return result


def _check(value: Any, field_type: Any, dotted: str) -> Any:
    """`value` checked (and, ints or number strings for floats, converted) against a field annotation."""
    value = _coerce(value, field_type)
    if not _matches(value, field_type):
        raise ConfigError(f"{dotted} must be {_describe(field_type)}, got {value!r}{_choice_hint(value, field_type)}")
    return value


def _coerce(value: Any, field_type: Any) -> Any:
    """Ints for float fields become floats; strings YAML 1.1 leaves unparsed (``1e-3``) become numbers."""
    if _accepts(field_type, float) and not _accepts(field_type, str):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    if typing.get_origin(field_type) is list and isinstance(value, list):
        (item,) = typing.get_args(field_type) or (Any,)
        return [_coerce(v, item) for v in value]
    if typing.get_origin(field_type) in (typing.Union, types.UnionType) and isinstance(value, list):
        lists = [arg for arg in typing.get_args(field_type) if typing.get_origin(arg) is list]
        return _coerce(value, lists[0]) if len(lists) == 1 else value
    return value


def _accepts(field_type: Any, kind: type) -> bool:
    """Whether `field_type` (through Optional / Annotated) admits values of the plain type `kind`."""
    origin = typing.get_origin(field_type)
    if origin is typing.Annotated:
        return _accepts(typing.get_args(field_type)[0], kind)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, kind) for arg in typing.get_args(field_type))
    return field_type is kind


def _matches(value: Any, field_type: Any) -> bool:
    origin = typing.get_origin(field_type)
    if origin is typing.Annotated:
        base, *metadata = typing.get_args(field_type)
        return _matches(value, base) and all(_within(value, rule) for rule in metadata)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(field_type))
    if origin is typing.Literal:
        return value in typing.get_args(field_type)
    if field_type is type(None):
        return value is None
    if field_type is bool:
        return isinstance(value, bool)
    if field_type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if field_type is float:
        return isinstance(value, float) and math.isfinite(value)
    if field_type is str:
        return isinstance(value, str)
    if origin is list or field_type is list:
        (item,) = typing.get_args(field_type) or (Any,)
        return isinstance(value, list) and (item is Any or all(_matches(v, item) for v in value))
    if origin is dict or field_type is dict:
        return isinstance(value, dict)
    return True


def _within(value: Any, rule: Any) -> bool:
    if isinstance(rule, Range):
        return rule.violation(value) is None
    if isinstance(rule, OneOf):
        return value in rule.options()
    return True


def _describe(field_type: Any) -> str:
    origin = typing.get_origin(field_type)
    if origin is typing.Annotated:
        base, *metadata = typing.get_args(field_type)
        text = _describe(base)
        for rule in metadata:
            if isinstance(rule, Range):
                text += " " + _range_text(rule)
            elif isinstance(rule, OneOf):
                text = f"one of {rule.options()}"
        return text
    if origin in (typing.Union, types.UnionType):
        options = [_describe(arg) for arg in typing.get_args(field_type) if arg is not type(None)]
        nullable = type(None) in typing.get_args(field_type)
        return " or ".join(options) + (" or null" if nullable else "")
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(field_type))}"
    if origin is list:
        (item,) = typing.get_args(field_type) or (Any,)
        return f"a list, each {_describe(item)}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            dict: "a mapping"}.get(field_type, str(field_type).replace("typing.", ""))


def _range_text(rule: Range) -> str:
    parts = []
    if rule.min is not None:
        parts.append(f"{'>' if rule.exclusive_min else '>='} {rule.min:g}")
    if rule.max is not None:
        parts.append(f"<= {rule.max:g}")
    return " and ".join(parts)


def _choice_hint(value: Any, field_type: Any) -> str:
    """A "did you mean" among the string choices of `field_type`, if it has any."""
    if not isinstance(value, str):
        return ""
    return _suggest(value, [c for c in _choices(field_type) if isinstance(c, str)])


def _choices(field_type: Any) -> list:
    origin = typing.get_origin(field_type)
    if origin is typing.Literal:
        return list(typing.get_args(field_type))
    if origin is typing.Annotated:
        base, *metadata = typing.get_args(field_type)
        found = [c for rule in metadata if isinstance(rule, OneOf) for c in rule.options()]
        return found or _choices(base)
    if origin in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(field_type) for c in _choices(arg)]
    return []


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
