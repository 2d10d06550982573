"""Reading and writing `RunConfig`: presets by name, YAML files, ``dotted.key=value`` overrides, validation."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from norga.config import GATE_ACTIVATIONS, RunConfig

#: Registered method names (norga.methods registers exactly these; kept here so configs load without torch).
METHOD_NAMES = ("norga", "hide", "l2p", "dualprompt", "sprompt", "coda", "linear_probe", "ncm")

PRESET_PACKAGE = "norga.presets"

#: Allowed values of the string-valued switches, by dotted key suffix.
CHOICES: dict[str, tuple] = {
    "method": METHOD_NAMES,
    "gate": (*GATE_ACTIVATIONS, None),
    "gate_train_tasks": ("first", "all", "none"),
    "prompt_type": ("prefix", "tokens"),
    "train_selection": ("task", "similarity"),
    "ncm.metric": ("cosine", "euclidean"),
    "prompt.prefix_layout": ("correct", "official"),
    "prompt.attention_impl": ("fused", "reference"),
    "data.normalization": ("backbone", "official"),
    "schedule": ("constant", "step", "cosine", "coda_cosine"),
    "optimizer": ("adam", "sgd"),
    "amp": ("none", "bf16", "auto"),
    "device": ("auto", "cpu", "cuda", "mps"),
}


class ConfigError(ValueError):
    """A config that cannot be used; the message says what is wrong and what would be right."""


def preset_names() -> list[str]:
    """Names of the presets shipped in the package."""
    folder = resources.files(PRESET_PACKAGE)
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, preset_names())}; `norga presets` lists them")
    return resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A preset name or YAML file (missing keys keep defaults), then ``key=value`` overrides, validated."""
    data: dict = {}
    if source is not None:
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
    config = _build(RunConfig, data, "")
    for override in overrides:
        apply_override(config, override)
    return config


def apply_override(config: RunConfig, override: str) -> None:
    """Set one ``dotted.key=value`` (value parsed as YAML: numbers, true/false, null, [lists])."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. wtp.train.epochs=3")
    parts = key.strip().split(".")
    target: Any = config
    for depth, part in enumerate(parts[:-1]):
        target = getattr(target, _field_name(target, part, ".".join(parts[: depth + 1])))
    name = _field_name(target, parts[-1], key.strip())
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse the value of {override!r}: {error}") from error
    field = {f.name: f for f in dataclasses.fields(target)}[name]
    if dataclasses.is_dataclass(getattr(target, name)):
        setattr(target, name, _build(type(getattr(target, name)), value, key.strip(), getattr(target, name)))
    else:
        setattr(target, name, _check(value, _hints(type(target))[field.name], key.strip()))


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config` reads it back identically."""
    from norga.engine.checkpoint import write_text

    write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), path)


# --------------------------------------------------------------------------- internals
def _build(cls: type, data: Any, prefix: str, base: Any = None):
    """`cls` from a mapping; keys it does not give keep `base`'s values (the section's own defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
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


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_name(target: Any, part: str, dotted: str) -> str:
    names = [f.name for f in dataclasses.fields(target)] if dataclasses.is_dataclass(target) else []
    if part not in names:
        raise ConfigError(f"unknown config key {dotted!r}{_suggest(part, names)}")
    return part


def _check(value: Any, field_type: Any, dotted: str) -> Any:
    """Type-check `value` against a field annotation; ints are accepted for floats."""
    if not _matches(value, field_type):
        raise ConfigError(f"{dotted} must be {_describe(field_type)}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and _base(field_type) is float:
        value = float(value)
    choices = next((options for suffix, options in CHOICES.items() if dotted == suffix or dotted.endswith("." + suffix)), None)
    if choices is not None and value not in choices:
        raise ConfigError(f"{dotted} must be one of {[c if c is not None else 'null' for c in choices]}, got {value!r}"
                          f"{_suggest(str(value), [str(c) for c in choices if c is not None])}")
    return value


def _base(field_type: Any) -> Any:
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    if typing.get_origin(field_type) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return field_type


def _matches(value: Any, field_type: Any) -> bool:
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(field_type))
    if field_type is type(None):
        return value is None
    if field_type is bool:
        return isinstance(value, bool)
    if field_type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if field_type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if field_type is str:
        return isinstance(value, str)
    if origin is list or field_type is list:
        (item,) = typing.get_args(field_type) or (Any,)
        return isinstance(value, list) and (item is Any or all(_matches(v, item) for v in value))
    if origin is dict or field_type is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    return True


def _describe(field_type: Any) -> str:
    text = str(field_type).replace("typing.", "").replace("NoneType", "null")
    return {"<class 'bool'>": "true or false", "<class 'int'>": "an integer", "<class 'float'>": "a number",
            "<class 'str'>": "a string"}.get(text, text)


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
