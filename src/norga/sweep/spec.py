"""A sweep request (base, axes, exclusions, shared overrides) and its expansion into named trials."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from norga.config import ConfigError, RunConfig

#: Axes with a meaning of their own; any other axis is a dotted config key set like `--set KEY=VALUE`.
METHOD, SEED, PRESET = "method", "seed", "preset"
SPEC_KEYS = ("base", "axes", "exclude", "set")
#: Longest readable trial name before it is shortened to a prefix plus a hash.
MAX_NAME = 100


@dataclass
class SweepSpec:
    """What a sweep runs: `base` (preset or YAML file) unless a `preset` axis names them, ordered `axes`,
    `exclude` (partial assignments left out) and `overrides` (``key=value`` for every trial)."""

    base: str | None
    axes: dict[str, list]
    exclude: list[dict]
    overrides: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "axes": self.axes, "exclude": self.exclude, "set": self.overrides}

    @classmethod
    def from_dict(cls, data: Any, where: str = "the sweep spec") -> SweepSpec:
        """Read and check a spec mapping (a spec file, or the sweep.yaml a sweep stored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping with keys {', '.join(SPEC_KEYS)}")
        unknown = [key for key in data if key not in SPEC_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a sweep spec has {', '.join(SPEC_KEYS)}")
        spec = cls(data.get("base"), _axes(data.get("axes"), where), _excludes(data.get("exclude"), where),
                   _overrides(data.get("set"), where))
        spec.check(where)
        return spec

    def check(self, where: str = "the sweep") -> None:
        if (self.base is None) == (PRESET not in self.axes):
            raise ConfigError(f"{where}: give either a base preset (or YAML file) or a `preset` axis, not "
                              f"{'both' if self.base is not None else 'neither'}")
        if self.base is not None and not isinstance(self.base, str):
            raise ConfigError(f"{where}: base must be a preset name or a YAML file, got {self.base!r}")
        for override in self.overrides:
            key = override.partition("=")[0].strip()
            if key == METHOD:
                value = override.partition("=")[2]
                raise ConfigError(f"{where}: `set` cannot choose the method: make it an axis (method: [{value}])")
            if key in self.axes:
                raise ConfigError(f"{where}: {key} is both an axis and in `set`: keep one")
        for entry in self.exclude:
            for key, value in entry.items():
                if key not in self.axes:
                    raise ConfigError(f"{where}: exclude entry {entry} names {key!r}, which is not an axis "
                                      f"({', '.join(self.axes)})")
                if value not in self.axes[key]:
                    raise ConfigError(f"{where}: exclude entry {entry}: {value!r} is not a value of axis {key} "
                                      f"{self.axes[key]}")


@dataclass(frozen=True)
class Trial:
    """One point of the grid; `id` names its run directory inside the sweep directory."""

    id: str
    assignment: dict[str, Any]

    def source(self, spec: SweepSpec) -> str:
        return self.assignment.get(PRESET, spec.base)

    def overrides(self, spec: SweepSpec) -> list[str]:
        """The shared overrides, then the trial's axis values (method and preset are not config keys)."""
        own = [f"{key}={json.dumps(value)}" for key, value in self.assignment.items() if key not in (METHOD, PRESET)]
        return [*spec.overrides, *own]

    @property
    def setting(self) -> str:
        """The axis values other than method, seed and preset, e.g. ``prompt.length=5`` ('' when none)."""
        return ",".join(f"{key}={_text(value)}" for key, value in self.assignment.items()
                        if key not in (METHOD, SEED, PRESET))


def load_spec(path: str | Path, extra_overrides: Sequence[str] = ()) -> SweepSpec:
    """A spec file; `extra_overrides` (``--set`` on the command line) join its `set`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if isinstance(data, dict):
        data = {**data, "set": [*_overrides(data.get("set"), str(path)), *extra_overrides]}
    return SweepSpec.from_dict(data, str(path))


def is_spec_file(path: str) -> bool:
    """A YAML file whose top level has `axes` (a plain config file does not)."""
    candidate = Path(path)
    if candidate.suffix not in (".yaml", ".yml") or not candidate.is_file():
        return False
    try:
        data = yaml.safe_load(candidate.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "axes" in data


def spec_from_grid(base: str, grid: Sequence[str], overrides: Sequence[str]) -> SweepSpec:
    """`norga sweep BASE --grid KEY=V1,V2 ...`: each value parsed as YAML (numbers, true/false, null)."""
    axes: dict[str, list] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r} must look like KEY=V1,V2, e.g. --grid seed=0,1,2")
        if key in axes:
            raise ConfigError(f"--grid {key} is given twice: list all its values in one --grid {key}=V1,V2")
        try:
            axes[key] = [yaml.safe_load(value.strip()) for value in values.split(",")]
        except yaml.YAMLError as error:
            raise ConfigError(f"cannot parse the values of --grid {item!r}: {error}") from error
    data = {"axes": axes, "set": list(overrides), **({"base": base} if base is not None else {})}
    return SweepSpec.from_dict(data, "--grid")


def expand(spec: SweepSpec) -> list[Trial]:
    """Every assignment of the axes (first axis slowest) that no exclusion matches, each with a unique name."""
    keys = list(spec.axes)
    assignments = [dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.axes.values())]
    kept = [a for a in assignments if not any(all(a[k] == v for k, v in entry.items()) for entry in spec.exclude)]
    if not kept:
        raise ConfigError("the exclusions leave no trial to run: remove some `exclude` entries")
    return [Trial(name, assignment) for name, assignment in zip(trial_names(kept), kept, strict=True)]


def trial_names(assignments: Sequence[dict[str, Any]]) -> list[str]:
    """Readable directory names (``method=norga__seed=0``); names that would clash or run long get a hash of
    the exact assignment, so two trials never share a directory."""
    readable = [_shorten("__".join(f"{key}={_slug(value)}" for key, value in a.items()), a) for a in assignments]
    folded = [name.lower() for name in readable]  # case-insensitive file systems too
    return [f"{name}-{_digest(a)}" if folded.count(name.lower()) > 1 else name
            for name, a in zip(readable, assignments, strict=True)]


def trial_config(spec: SweepSpec, trial: Trial) -> RunConfig:
    """The trial's resolved config, built by `method_config` like `norga compare` builds each method's.

    Keys of neither the shared schema nor a method's section are the trial method's own (`in_method_section`):
    ``wtp.train.epochs`` is ``norga.wtp.train.epochs`` in a NoRGa trial, ``hide.wtp.train.epochs`` in a HiDe one.
    """
    from norga.comparison import method_config
    from norga.config_io import in_method_section, read_source

    source, overrides = trial.source(spec), trial.overrides(spec)
    method = trial.assignment.get(METHOD) or read_source(source).get("method", RunConfig.method)
    return method_config(source, method, [in_method_section(override, method) for override in overrides])


# --------------------------------------------------------------------------- internals
def _axes(data: Any, where: str) -> dict[str, list]:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: `axes` must map axis names to lists of values, e.g. axes: {{seed: [0, 1, 2]}}")
    axes = {}
    for key, values in data.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: axis name {key!r} must be method, seed, preset or a dotted config key")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axis {key} must be a non-empty list of values, got {values!r}")
        texts = [json.dumps(value, sort_keys=True) for value in values]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"{where}: axis {key} lists a value twice: {values}")
        axes[key] = values
    return axes


def _excludes(data: Any, where: str) -> list[dict]:
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(entry, dict) and entry for entry in data):
        raise ConfigError(f"{where}: `exclude` must be a list of partial assignments, e.g. "
                          "exclude: [{method: hide, seed: 2}]")
    return data


def _overrides(data: Any, where: str) -> list[str]:
    if data is None:
        return []
    if isinstance(data, dict):
        return [f"{key}={json.dumps(value)}" for key, value in data.items()]
    if isinstance(data, list) and all(isinstance(item, str) and "=" in item for item in data):
        return list(data)
    raise ConfigError(f"{where}: `set` must map dotted keys to values, or list KEY=VALUE strings")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _slug(value: Any) -> str:
    """A value as a file-name part: presets given as files by their stem, anything unsafe as '_'."""
    text = _text(value)
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        text = Path(value).stem
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def _digest(assignment: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(assignment, sort_keys=True).encode()).hexdigest()[:8]


def _shorten(name: str, assignment: dict[str, Any]) -> str:
    return name if len(name) <= MAX_NAME else f"{name[:MAX_NAME - 9]}-{_digest(assignment)}"
