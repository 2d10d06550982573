"""Every declared setting of every registered method has an effect: a config load and a whole tiny run of the method
read each field of its settings (nested sections included) in code that names it, or the section's refusal check
does. A field nothing reads would be validated, written to config.yaml and listed by `norga methods` while changing
nothing (as ``tii.tap.momentum`` was, before TAP's SGD took its momentum from it).

Reads are recorded on the settings classes' attribute access. Code that walks every field by a computed name (the
loader, ``asdict``, copies, comparisons, `section_path`) does not count, and neither do the run record's hooks
(``compat``, ``run_record``, ``summary``), which write a value down without acting on it.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections import defaultdict
from typing import Any

import pytest
from engine_fixtures import make_engine, tiny_config

from norga.config import OptimConfig
from norga.methods import METHODS

ALL = sorted(METHODS)
RECORDS = {"compat", "run_record", "summary"}  # hooks that record settings rather than act on them
#: Runs besides the tiny config's that turn on what some settings act on (``--set`` keys relative to the section):
#: the official batch vote (which task-identity accuracy counts), L2P with prefixes and a G-prompt (their layout,
#: blocks and gate), S-Prompt++ with a G-prompt (its blocks), the RanPAC task-identity head (its settings), the
#: analytic heads' first-session adaptation (an adapter's shape, VPT's prompt length).
VARIANTS = {
    "hide": [{"batchwise_prompt": True}, {"tii.head": "ranpac", "tii.ranpac.projection_dim": 64}],
    "norga": [{"batchwise_prompt": True}, {"tii.head": "ranpac", "tii.ranpac.projection_dim": 64}],
    "ranpac": [{"first_session": "adapter"}, {"first_session": "vpt_deep"}],
    "simplecil": [{"first_session": "adapter"}, {"first_session": "vpt_deep"}],
    "l2p": [{"prompt_type": "prefix", "g_length": 2, "g_layers": [1], "gate": "tanh"}],
    "sprompt": [{"g_length": 2, "g_layers": [1]}],
}


def sections(settings: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted prefix: section object}`` of a settings tree (the root as "")."""
    found = {prefix: settings}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            found |= sections(value, f"{prefix}{f.name}.")
    return found


def literal_names(code: types.CodeType) -> set[str]:
    """The attribute names and string constants (inside constant tuples too) that `code` spells out."""
    names, pending = set(code.co_names), list(code.co_consts)
    while pending:
        const = pending.pop()
        if isinstance(const, str):
            names.add(const)
        elif isinstance(const, (tuple, frozenset)):
            pending.extend(const)
    return names


class FieldReads:
    """Which declared fields of which settings objects were read by code that names them."""

    def __init__(self) -> None:
        self.reads: dict[int, set[str]] = defaultdict(set)
        self.alive: list[Any] = []  # every object read, kept so that no id is reused by another

    def install(self, monkeypatch: pytest.MonkeyPatch, classes: set[type]) -> None:
        for cls in classes:
            declared = {f.name for f in dataclasses.fields(cls)}

            def recording(obj: Any, name: str, declared: set[str] = declared) -> Any:
                if name in declared:
                    code = sys._getframe(1).f_code
                    if (not code.co_filename.startswith("<") and code.co_name not in RECORDS
                            and name in literal_names(code)):
                        self.reads[id(obj)].add(name)
                        self.alive.append(obj)
                return object.__getattribute__(obj, name)

            monkeypatch.setattr(cls, "__getattribute__", recording)

    def unread(self, *roots: Any) -> list[str]:
        """Declared keys of the settings trees `roots` (the same settings, as loaded and as the method holds them)
        that nothing read in any of them."""
        read: set[str] = set()
        for root in roots:
            for prefix, section in sections(root).items():
                read |= {prefix + name for name in self.reads.get(id(section), ())}
        declared = {prefix + f.name for prefix, section in sections(roots[0]).items()
                    for f in dataclasses.fields(section) if not dataclasses.is_dataclass(getattr(section, f.name))}
        return sorted(declared - read)


def settings_classes(method: str) -> set[type]:
    return {type(section) for section in sections(METHODS[method].Settings()).values()}


@pytest.mark.parametrize("method", ALL)
def test_every_declared_setting_is_read_by_a_config_load_and_a_tiny_run(tmp_path, monkeypatch, method):
    reads = FieldReads()
    reads.install(monkeypatch, settings_classes(method))
    unread = None
    for index, changes in enumerate([{}, *VARIANTS.get(method, [])]):
        config = tiny_config(method, **changes)
        engine = make_engine(config, tmp_path / f"run{index}")
        engine.run()
        left = set(reads.unread(config.settings, engine.method.settings))
        unread = left if unread is None else unread & left
    assert not unread, (f"{method} settings that nothing reads: {', '.join(f'{method}.{key}' for key in sorted(unread))}"
                        " (wire them or remove them; one read only under another setting: add a run to VARIANTS)")


def test_a_field_only_walked_over_or_recorded_counts_as_unread(monkeypatch):
    """The recorder itself: asdict, the loader and a record hook read every field, yet none of them counts."""
    reads = FieldReads()
    reads.install(monkeypatch, {OptimConfig})
    cfg = OptimConfig()
    dataclasses.asdict(cfg)
    assert cfg == OptimConfig() and repr(cfg)

    def compat() -> float:
        return cfg.lr

    compat()
    assert cfg.epochs == 20  # named here: read
    assert reads.unread(cfg) == sorted({f.name for f in dataclasses.fields(OptimConfig)} - {"epochs"})
