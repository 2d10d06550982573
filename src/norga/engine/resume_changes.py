"""What `norga run --resume DIR --set KEY=VALUE` may change, and a run's identity (what it may not).

Safe on resume are settings that steer what is still to be computed without invalidating what was: learning
rates, epoch counts (of phases still ahead; the engine checks the current one), the evaluation batch size and
the number of loader workers. They are named by key patterns, not by method sections, so every method's
section is covered. Everything else defines the run: its hash (`identity_hash`) is stored with every
checkpoint, and a resume under another value is refused.
"""

from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatchcase
from typing import Any

from norga.config import ConfigError, RunConfig
from norga.config_io import default_config

#: Dotted-key patterns a resume may change.
RESUME_SAFE = ("*.lr", "*.epochs", "eval.batch_size", "data.workers")


def is_resume_safe(key: str) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in RESUME_SAFE)


def config_differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every value that differs between two nested config dicts."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(old.keys() | new.keys()):
        a, b, dotted = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_differences(a, b, dotted + "."))
        elif a != b:
            changes[dotted] = (a, b)
    return changes


def check_resume_changes(stored: RunConfig, requested: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The changes `requested` makes to a run's `stored` config; a `ConfigError` if any is not safe on resume."""
    changes = config_differences(stored.to_dict(), requested.to_dict())
    unsafe = [key for key in changes if not is_resume_safe(key)]
    if unsafe:
        raise ConfigError(f"--resume cannot change {', '.join(unsafe)}: the run so far was computed with the stored "
                          f"value; only {', '.join(RESUME_SAFE)} may change on resume (start a new run for the rest)")
    return changes


def identity_hash(config: RunConfig) -> str:
    """sha256 of the settings that define the run: equal for every resume of one run.

    Settings a resume may change are left out, and so are those at their default: a setting a later norga adds
    (at a default that keeps the earlier behaviour) leaves the hash of the runs made before it as it was.
    """
    defining = _not_default(_without_safe(config.to_dict()), default_config(config.method).to_dict())
    defining["method"] = config.method  # its defaults are those of its method: the method always counts
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()


def _not_default(data: dict, defaults: dict) -> dict:
    """The entries of `data` that differ from `defaults` (nested dicts compared key by key)."""
    kept = {}
    for key, value in data.items():
        default = defaults.get(key)
        if isinstance(value, dict):
            if inner := _not_default(value, default if isinstance(default, dict) else {}):
                kept[key] = inner
        elif key not in defaults or value != default:
            kept[key] = value
    return kept


def _without_safe(data: dict, prefix: str = "") -> dict:
    kept = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            kept[key] = _without_safe(value, dotted + ".")
        elif not is_resume_safe(dotted):
            kept[key] = value
    return kept


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
