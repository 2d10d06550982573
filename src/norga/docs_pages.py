"""The generated parts of the documentation site, read from the registry so that they cannot drift from the code.

`docs/hooks.py` (an MkDocs hook) calls these while the site builds. A written page holds markers where the
generated parts go: ``<!-- norga:reference -->`` in ``docs/methods/NAME.md`` (the method's settings with types,
defaults and notes, its capabilities, phases, compat switches and the presets that use it),
``<!-- norga:methods-table -->`` (every registered method with a link to its page) and
``<!-- norga:compat-table -->`` (every compat switch, from the methods' ``compat()`` and
``docs/compat_switches.yaml``). The checks here fail the build: a registered method without its written page, a
page for a method that is not registered, a compat switch without its description, a backticked setting
(``norga.gate``, ``data.root``) or ``norga.*`` module that does not exist.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from norga.commands.methods import first_line, setting_notes, setting_rows
from norga.config import SHARED_KEYS, RunConfig
from norga.config_io import DEFAULT_METHOD, preset_names, read_source

MARKER = re.compile(r"^<!-- norga:([a-z-]+) -->[ \t]*$", re.MULTILINE)  # a marker is a line of its own
#: A backticked dotted name: a setting (``norga.wtp.train.lr=0.005``) or a module path (``norga.nn.gates``).
DOTTED = re.compile(r"`([a-z_][a-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:=[^`]*)?`")
FILE_SUFFIXES = {"py", "yaml", "yml", "md", "json", "csv", "png", "pt", "pth", "txt", "npz", "zip", "tar", "gz", "mat",
                 "safetensors", "sh", "toml", "log", "lock", "jpg"}
#: The stand-in a method is built on to read its capabilities: ViT-B's depth (so every default prompt block
#: exists), a narrow width (CODA's 100 keys still fit), 16 px generated images, 3 tasks of 2 classes.
STAND_IN_BACKBONE = {"img_size": 16, "patch_size": 8, "depth": 12, "embed_dim": 128, "num_heads": 2}
STAND_IN_TASKS = 3


class DocsError(ValueError):
    """The docs disagree with the code; the message names the page or file and what to change."""


# --------------------------------------------------------------------------- facts from the registry
@dataclass(frozen=True)
class MethodFacts:
    """What a registered method declares (its `Capabilities` and more), read from an instance with its defaults."""

    name: str
    summary: str  # the first line of the class's docstring
    qualname: str  # module.Class
    infers_tasks: bool
    slot_modes: tuple[str, ...]
    matrices: tuple[str, ...]
    first_task_phases: tuple[tuple[str, int, str | None], ...]  # (name, epochs, evaluates into)
    later_task_phases: tuple[tuple[str, int, str | None], ...]
    compat: dict[str, Any]
    score_gate: bool
    reads_official_checkpoints: bool


def method_names() -> list[str]:
    """norga's own registered methods (a method another package registers is documented by that package)."""
    from norga.methods import METHODS
    from norga.methods import method_names as registered

    return [name for name in registered() if METHODS[name].__module__.startswith("norga.")]


@functools.cache
def method_facts(name: str) -> MethodFacts:
    """Build method `name` with its defaults on a tiny generated stand-in and read what it declares."""
    import torch

    from norga.config import BackboneConfig
    from norga.config_io import default_config
    from norga.engine.build import build_run
    from norga.engine.resolve import resolve_config
    from norga.methods import method_class
    from norga.runtime.context import RunContext
    from norga.synthetic import synthetic_tasks

    cls = method_class(name)
    config = default_config(name, device="cpu", amp="none", backbone=BackboneConfig(
        name="vit_tiny_patch16_224", weights="none", timm_kwargs=dict(STAND_IN_BACKBONE)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend (and a loaded machine makes that slow)
    try:
        tasks = synthetic_tasks(STAND_IN_TASKS, 2, 1, 1, STAND_IN_BACKBONE["img_size"])
        built = build_run(resolve_config(config, locate_data=False), tasks=tasks)
        method = cls(RunContext(built), built.config.settings)
    finally:
        torch.set_num_threads(threads)
    can = method.capabilities
    identity = ("task_identity",) if can.infers_tasks else ()
    return MethodFacts(
        name=name, summary=first_line(cls.__doc__), qualname=f"{cls.__module__}.{cls.__qualname__}",
        infers_tasks=can.infers_tasks, slot_modes=tuple(can.slot_modes),
        matrices=("accuracy", *identity, "task_incremental", *cls.extra_matrices),
        first_task_phases=tuple((p.name, p.epochs, p.evaluate) for p in method.phases(0)),
        later_task_phases=tuple((p.name, p.epochs, p.evaluate) for p in method.phases(1)),
        compat=dict(method.compat()),
        score_gate=can.score_gate,
        reads_official_checkpoints=can.official_checkpoints,
    )


@functools.lru_cache(maxsize=1)
def preset_methods() -> dict[str, tuple[str, frozenset[str]]]:
    """{preset: (the method it runs, the method sections it holds)} of every shipped preset."""
    result = {}
    for preset in preset_names():
        data = read_source(preset)
        result[preset] = (data.get("method", DEFAULT_METHOD), frozenset(data))
    return result


def presets_using(name: str) -> tuple[list[str], list[str]]:
    """(presets that run method `name`, presets that only hold a section for it: ``--set method=NAME``)."""
    runs = [preset for preset, (method, _) in preset_methods().items() if method == name]
    sections = [preset for preset, (method, keys) in preset_methods().items() if method != name and name in keys]
    return runs, sections


@functools.lru_cache(maxsize=1)
def shared_setting_rows() -> dict[str, tuple[str, object]]:
    """{dotted key: (type as words, default)} of the shared schema (``data.root``, ``eval.batch_size``, ...)."""
    return {key: (kind, default) for key, kind, default in setting_rows(RunConfig)
            if key.split(".")[0] != "settings"}


# --------------------------------------------------------------------------- markdown
def markdown_value(value: object) -> str:
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def settings_table(name: str) -> str:
    from norga.methods import settings_class

    settings_type = settings_class(name)
    notes = setting_notes(settings_type)
    rows = ["| setting | default | type | note |", "|---|---|---|---|"]
    for key, kind, default in setting_rows(settings_type):
        note = table_cell(notes.get(key, ""))
        rows.append(f"| `{name}.{key}` | {markdown_value(default)} | {kind.replace('|', '/')} | {note} |")
    return "\n".join(rows)


def _phase_list(phases: tuple[tuple[str, int, str | None], ...], name: str) -> str:
    def one(phase: tuple[str, int, str | None]) -> str:
        label, epochs, evaluates = phase
        if evaluates:
            return f"`{label}` (evaluates into the `{evaluates}` matrix)"
        return f"`{label}` ({epochs} epoch{'s' if epochs != 1 else ''})" if epochs else f"`{label}`"

    return ", ".join(one(phase) for phase in phases)


def method_reference(name: str, page: str) -> str:
    """The generated section of method `name`'s page (`page`: its path in the docs, for relative links)."""
    facts = method_facts(name)
    runs, sections = presets_using(name)
    compat_link = relative_link(page, "guides/compat.md")
    phases = ["- **Phases of the first task** (defaults): " + _phase_list(facts.first_task_phases, name)]
    if facts.later_task_phases != facts.first_task_phases:
        phases.append("- **Phases of every later task**: " + _phase_list(facts.later_task_phases, name))
    compat = (", ".join(f"`{name}.{key}` = {markdown_value(value)}" for key, value in facts.compat.items())
              or "none of its own")
    preset_lines = [f"- **Presets that run it**: {', '.join(f'`{p}`' for p in runs) or 'none'}"]
    if sections:
        preset_lines.append(f"- **Presets with a `{name}:` section** (`norga run PRESET --set method={name}`): "
                            + ", ".join(f"`{p}`" for p in sections))
    lines = [
        "## Reference",
        "",
        (f"Generated from the registry: `{facts.qualname}`, registered as `{name}` (settings section `{name}:`; "
         f"`norga methods {name}` prints the same settings)."),
        "",
        f"- **Infers task identity**: {'yes (a task-identity matrix is recorded)' if facts.infers_tasks else 'no'}",
        "- **Slot modes** (whose prompts `norga evaluate` can give each test image): "
        + ", ".join(f"`{mode}`" for mode in facts.slot_modes),
        f"- **Matrices a run records**: {', '.join(f'`{m}`' for m in facts.matrices)}",
        "- **Score gate on its prefixes** (`gate` in the run record): "
        + ("yes" if facts.score_gate else "no (no prefix attention)"),
        *phases,
        "- **Evaluates the official code's checkpoints** ([how](" + relative_link(page, "guides/official-checkpoints.md")
        + f")): {'yes' if facts.reads_official_checkpoints else 'no'}",
        f"- **Compat switches recorded in `results.json`** ([all switches]({compat_link})): {compat}",
        *preset_lines,
        "",
        "### Settings",
        "",
        settings_table(name),
    ]
    return "\n".join(lines)


def relative_link(page: str, target: str) -> str:
    """The link from docs page `page` to docs file `target` (both relative to the docs folder)."""
    return posixpath.relpath(target, posixpath.dirname(page) or ".")


def methods_table(page: str, order: tuple[str, ...] = ()) -> str:
    """A row per method, those named in `order` (the site's navigation) first, in that order."""
    from norga.methods import method_class

    rows = ["| method | what it is | infers task identity | settings |", "|---|---|---|---|"]
    names = method_names()
    for name in [*(n for n in order if n in names), *(n for n in names if n not in order)]:
        facts = method_facts(name)
        count = len(setting_rows(method_class(name).Settings))
        rows.append(f"| [`{name}`]({relative_link(page, f'methods/{name}.md')}) | {facts.summary} | "
                    f"{'yes' if facts.infers_tasks else 'no'} | {count} |")
    return "\n".join(rows)


def table_cell(text: str) -> str:
    """`text` as one Markdown table cell: on one line, its pipes and angle brackets escaped."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def compat_table(descriptions: dict[str, dict], page: str = "guides/compat.md") -> str:
    """One row per compat switch: where it is, its default, the official value and what the official code does.

    `descriptions` maps a switch (a key of a method's section, e.g. ``prefix_layout`` or ``tii.tap.official_chunking``,
    or a shared key such as ``data.normalization``) to ``{official, what, spec}``. Every ``compat()`` key of a
    registered method needs one, and each must name a real setting.
    """
    shared = shared_setting_rows()
    holders: dict[str, list[str]] = {}
    for name in method_names():
        for key in method_facts(name).compat:
            holders.setdefault(key, []).append(name)
    missing = sorted(set(holders) - set(descriptions))
    if missing:
        raise DocsError(f"compat switches without a description in docs/compat_switches.yaml: {missing} "
                        f"(of methods {sorted({m for k in missing for m in holders[k]})}): add an entry for each")
    rows = ["| switch | default | official | where | what the official code does |", "|---|---|---|---|---|"]
    for key, entry in descriptions.items():
        unknown = set(entry) - {"official", "what", "spec"}
        if unknown or not {"official", "what"} <= set(entry):
            raise DocsError(f"docs/compat_switches.yaml: {key} needs `official` and `what` (optional `spec`), "
                            f"not {sorted(unknown)}")
        if key.split(".")[0] in SHARED_KEYS:
            if key not in shared:
                raise DocsError(f"docs/compat_switches.yaml names {key}, which is not a setting: remove or rename it")
            default = shared[key][1]
            switch, where = f"`{key}`", "every method"
        else:
            methods = [m for m in method_names() if key in {k for k, _, _ in _rows(m)}]
            if not methods:
                raise DocsError(f"docs/compat_switches.yaml names {key}, which no registered method has: remove or "
                                "rename it")
            default = next(d for k, _, d in _rows(methods[0]) if k == key)
            switch = f"`METHOD.{key}`"
            where = ", ".join(f"[`{m}`]({relative_link(page, f'methods/{m}.md')})" for m in methods)
        spec = f" ({table_cell(entry['spec'])})" if entry.get("spec") else ""
        rows.append(f"| {switch} | {markdown_value(default)} | {markdown_value(entry['official'])} | {where} | "
                    f"{table_cell(entry['what'])}{spec} |")
    return "\n".join(rows)


@functools.cache
def _rows(name: str) -> list[tuple[str, str, object]]:
    from norga.methods import settings_class

    return setting_rows(settings_class(name))


# --------------------------------------------------------------------------- checks
def method_page_problems(docs_dir: Path) -> list[str]:
    """Registered methods without a written page, and method pages of no registered method."""
    pages = {path.stem for path in (docs_dir / "methods").glob("*.md") if path.stem != "index"}
    names = set(method_names())
    problems = [f"method {name!r} is registered but has no page: write docs/methods/{name}.md (what it does, its "
                "paper and repository, its phases, official behaviours, measured figures) with the marker "
                "<!-- norga:reference --> where its generated reference goes" for name in sorted(names - pages)]
    problems += [f"docs/methods/{name}.md describes no registered method: remove it or register {name!r}"
                 for name in sorted(pages - names)]
    return problems


def stale_references(markdown: str) -> list[str]:
    """Backticked settings (``norga.gate``, ``data.root=DIR``) and ``norga.*`` modules that do not exist."""
    names = set(method_names())
    shared = shared_setting_rows()
    stale = []
    for match in DOTTED.finditer(markdown):
        dotted = match.group(1)
        first, rest = dotted.split(".", 1)
        if dotted.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue
        if first == "norga" and _is_module_path(dotted):
            continue
        if first in names:
            keys = [key for key, _, _ in _rows(first)]
        elif first in SHARED_KEYS:
            keys, rest = list(shared), dotted
        else:
            continue
        if not any(key == rest or key.startswith(rest + ".") for key in keys):
            stale.append(dotted)
    return stale


def _is_module_path(dotted: str) -> bool:
    """Whether `dotted` is an importable norga module, or an attribute of one."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        module = ".".join(parts[:end])
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            target: Any = importlib.import_module(module)
            for attribute in parts[end:]:
                if not hasattr(target, attribute):
                    return False
                target = getattr(target, attribute)
            return True
    return False


def expand(markdown: str, page: str, descriptions: dict[str, dict], order: tuple[str, ...] = ()) -> str:
    """`markdown` of docs page `page` with every ``<!-- norga:NAME -->`` marker replaced by its generated part
    (`order`: the methods in the order the site's navigation lists them)."""
    def generated(match: re.Match) -> str:
        kind = match.group(1)
        if kind == "reference":
            if not page.startswith("methods/"):
                raise DocsError(f"{page}: <!-- norga:reference --> belongs on a method page (docs/methods/NAME.md)")
            return method_reference(Path(page).stem, page)
        if kind == "methods-table":
            return methods_table(page, order)
        if kind == "compat-table":
            return compat_table(descriptions, page)
        raise DocsError(f"{page}: unknown marker <!-- norga:{kind} -->; known: reference, methods-table, compat-table")

    kinds = [match.group(1) for match in MARKER.finditer(markdown)]
    if page.startswith("methods/") and page != "methods/index.md" and "reference" not in kinds:
        raise DocsError(f"{page} lacks the marker <!-- norga:reference --> where the generated reference goes")
    return MARKER.sub(generated, markdown)


def read_compat_descriptions(path: Path) -> dict[str, dict]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise DocsError(f"{path} must map each compat switch to its description")
    return data
