"""The documentation site stays true: it builds strictly, every registered method has its page with a reference
generated from the registry, the commands in the docs parse with the real parsers, the library example runs."""

from __future__ import annotations

import dataclasses
import html
import logging
import re
import runpy
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from norga import docs_pages
from norga.cli import build_parser
from norga.commands.methods import setting_notes, setting_rows
from norga.config import ConfigError, PositiveInt
from norga.config_io import load_config, preset_names
from norga.methods import METHODS, ContinualMethod, settings_class

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `mkdocs build --strict` builds it (in this process: torch is already imported)."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config as load_mkdocs_config

    folder = tmp_path_factory.mktemp("site")
    config = load_mkdocs_config(str(ROOT / "mkdocs.yml"), site_dir=str(folder))
    assert config.strict
    build(config)  # raises (Abort) on any warning: a broken link or anchor, a page left out, a stale setting name
    return folder


BUILT_IN = docs_pages.method_names()  # norga's own methods (another package's are documented there)


def test_the_site_builds_strictly_with_every_methods_settings_generated(site):
    for name in BUILT_IN:
        page = html.unescape((site / "methods" / name / "index.html").read_text())
        for key, _, _ in setting_rows(settings_class(name)):
            assert f"{name}.{key}" in page, f"methods/{name}: {name}.{key} missing from the generated reference"
        facts = docs_pages.method_facts(name)
        for phase, _, _ in facts.first_task_phases:
            assert phase in page
    compat = html.unescape((site / "guides" / "compat" / "index.html").read_text())
    for name in BUILT_IN:
        for key in docs_pages.method_facts(name).compat:
            assert f"METHOD.{key}" in compat
    home = html.unescape((site / "index.html").read_text())
    assert all(f'href="methods/{name}/"' in home for name in BUILT_IN)
    listed = re.findall(r'href="methods/(\w+)/"', home)
    nav = re.findall(r"methods/(\w+)\.md", str(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    assert [name for name in dict.fromkeys(listed)] == [name for name in nav if name != "index"]  # nav's order
    assert (site / "results" / "index.html").is_file() and (site / "assets" / "sweep_demo.png").is_file()


def test_every_registered_method_has_a_written_page_in_the_navigation():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = re.findall(r"methods/(\w+)\.md", str(nav))
    assert docs_pages.method_page_problems(DOCS) == []
    assert set(listed) - {"index"} == set(BUILT_IN)


@dataclass
class _FakeSettings:
    width: PositiveInt = 3  # how wide


class _Unpaged(ContinualMethod):
    """A built-in method nobody wrote a page for."""

    __module__ = "norga.methods.unpaged"
    name = "unpaged"
    Settings = _FakeSettings


class _External(ContinualMethod):
    """A method another package registers (its docs are that package's)."""

    name = "external"
    Settings = _FakeSettings


def test_a_method_without_its_page_or_a_page_without_its_method_fails_the_build(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(METHODS, "unpaged", _Unpaged)
    monkeypatch.setitem(METHODS, "external", _External)
    problems = docs_pages.method_page_problems(DOCS)
    assert len(problems) == 1 and "docs/methods/unpaged.md" in problems[0]
    monkeypatch.delitem(METHODS, "unpaged")
    monkeypatch.delitem(METHODS, "external")
    docs = tmp_path / "docs"
    (docs / "methods").mkdir(parents=True)
    for name in [*BUILT_IN, "retired"]:
        (docs / "methods" / f"{name}.md").write_text("# x\n")
    assert docs_pages.method_page_problems(docs) == [
        "docs/methods/retired.md describes no registered method: remove it or register 'retired'"]

    from mkdocs.config import load_config as load_mkdocs_config
    from mkdocs.structure.files import Files

    config = load_mkdocs_config(str(ROOT / "mkdocs.yml"), docs_dir=str(docs), site_dir=str(tmp_path / "site"))
    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        config.plugins.on_files(Files([]), config=config)  # as a build calls docs/hooks.py
    assert "retired.md describes no registered method" in caplog.text  # a warning: strict mode fails the build


def test_a_method_page_needs_the_reference_marker():
    with pytest.raises(docs_pages.DocsError, match="lacks the marker"):
        docs_pages.expand("# NCM\n", "methods/ncm.md", {})
    with pytest.raises(docs_pages.DocsError, match="unknown marker"):
        docs_pages.expand("<!-- norga:nonsense -->\n", "index.md", {})
    inline = "write `<!-- norga:reference -->` where it goes\n"  # a mention is not a marker
    assert docs_pages.expand(inline, "guides/adding-a-method.md", {}) == inline


def test_stale_setting_and_module_names_are_found():
    text = ("`norga.gate=tahn` `hide.tii.tap.official_chunking` `data.root=DIR` `eval.batch_size` `norga.nn.gates` "
            "`norga.methods.METHODS` `hide.py` `results.json` `norga.wtp.train` "
            "`norga.gates` `hide.tii.tap.chunking` `data.rooot` `norga.methods.NOPE` `l2p.gate_kind`")
    assert docs_pages.stale_references(text) == ["norga.gates", "hide.tii.tap.chunking", "data.rooot",
                                                 "norga.methods.NOPE", "l2p.gate_kind"]


def test_every_compat_switch_needs_a_description_naming_a_real_setting():
    descriptions = docs_pages.read_compat_descriptions(DOCS / "compat_switches.yaml")
    without = {key: value for key, value in descriptions.items() if key != "prefix_layout"}
    with pytest.raises(docs_pages.DocsError, match=r"without a description.*prefix_layout"):
        docs_pages.compat_table(without)
    with pytest.raises(docs_pages.DocsError, match="no_such_switch, which no registered method has"):
        docs_pages.compat_table({**descriptions, "no_such_switch": {"official": 1, "what": "x"}})
    with pytest.raises(docs_pages.DocsError, match="data.no_such_key, which is not a setting"):
        docs_pages.compat_table({**descriptions, "data.no_such_key": {"official": 1, "what": "x"}})
    table = docs_pages.compat_table(descriptions)
    assert table.count("\n") == len(descriptions) + 1  # header, rule, a row per switch


def test_setting_notes_are_the_comments_beside_or_above_each_field():
    @dataclass
    class Inner:
        rate: float = 0.1  # how fast

    @dataclass
    class Outer:
        #: a note above
        #: on two lines
        first: int = 1
        plain: str = "a#b"
        inner: Inner = dataclasses.field(default_factory=Inner)

    assert setting_notes(Outer) == {"first": "a note above on two lines", "inner.rate": "how fast"}


def test_norga_methods_shows_the_same_notes_and_summary_as_the_pages(capsys):
    from norga.cli import main
    from norga.commands.methods import first_line

    for name in BUILT_IN:
        assert main(["methods", name]) == 0
        shown = capsys.readouterr().out
        summary = first_line(METHODS[name].__doc__)
        assert summary == docs_pages.method_facts(name).summary and summary in shown
        for key, note in setting_notes(settings_class(name)).items():
            assert f"# {note}" in next(line for line in shown.splitlines() if f"{name}.{key} " in line)


def test_presets_are_listed_under_the_method_they_run():
    for name in BUILT_IN:
        runs, sections = docs_pages.presets_using(name)
        for preset in runs:
            assert load_config(preset).method == name
        for preset in sections:
            assert load_config(preset).method != name and load_config(preset, [f"method={name}"]).method == name
    assert "quickstart" in docs_pages.presets_using("norga")[0]
    assert "quickstart" in docs_pages.presets_using("hide")[1]


# --------------------------------------------------------------------------- the examples
def norga_commands(text: str) -> list[list[str]]:
    """The arguments of every `norga ...` (also `.venv/bin/norga`, `torchrun ... -m norga`, `$ norga`) in the
    bash blocks of `text`, comments and environment assignments left out."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.splitlines():
            for part in line.removeprefix("$ ").split("&&"):
                words = shlex.split(part, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words and words[0].endswith("norga"):
                    commands.append(words[1:])
                elif words[:1] == ["torchrun"] and "norga" in words:
                    commands.append(words[words.index("norga") + 1:])
    return commands


#: Commands cheap enough to run for real (the others need data, weights, a GPU or minutes: they are parsed and
#: their settings checked against their preset).
EXECUTED = ("methods", "presets")


def test_every_norga_command_in_the_docs_parses_and_its_settings_exist(capsys):
    from norga.cli import main

    checked, executed = 0, set()
    for path in [ROOT / "README.md", *pages()]:
        for argv in norga_commands(path.read_text()):
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as error:
                raise AssertionError(f"{path.relative_to(ROOT)}: `norga {' '.join(argv)}` does not parse") from error
            checked += 1
            if args.command in EXECUTED and tuple(argv) not in executed:
                assert main(argv) == 0, f"{path.relative_to(ROOT)}: `norga {' '.join(argv)}` failed"
                assert capsys.readouterr().out.strip()
                executed.add(tuple(argv))
            preset = getattr(args, "config", None)
            resumed = getattr(args, "resume", None)
            if resumed is not None:  # runs/PRESET-YYYYMMDD-...: the preset the run directory was made from
                preset = re.sub(r"-\d{8}-.*$", "", resumed.name)
            if args.command in ("run", "compare") and preset in preset_names():
                overrides = [o for o in args.overrides if ":" not in o.split("=")[0]]
                try:
                    load_config(preset, overrides, other_sections=args.command == "compare")
                except ConfigError as error:
                    raise AssertionError(f"{path.relative_to(ROOT)}: `norga {' '.join(argv)}`: {error}") from error
    assert checked >= 20 and len(executed) >= 2  # the extractor finds them (25, and 2 to run, when written)


def test_the_library_example_runs_and_matches_the_docs(capsys):
    example = ROOT / "examples" / "norga_on_timm.py"
    runpy.run_path(str(example), run_name="__main__")
    assert "logits (4, 100)" in capsys.readouterr().out
    (documented,) = code_blocks((DOCS / "guides" / "library.md").read_text(), "python")
    example_lines = {line.split("#")[0].strip() for line in example.read_text().splitlines()}
    for line in documented.splitlines():
        assert line.split("#")[0].strip() in example_lines, f"docs line not in the example: {line!r}"
