"""Every command line and option a message suggests exists: parsed with the real parsers, keys loaded as config."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import norga
from norga.cli import build_parser
from norga.config import ConfigError
from norga.config_io import load_config
from norga.data.manifest import build_parser as manifest_parser

SOURCE = Path(norga.__file__).resolve().parent
COMMANDS = ("run", "evaluate", "compare", "quickstart", "sweep", "methods", "presets", "pretrain")
#: A suggested command line: `norga SUB ...` up to a backtick, a comment, the end of a sentence or a bracket.
#: ("norga run: ..." is an error's prefix, not a command line.)
COMMAND_LINE = re.compile(r"\bnorga (?:%s)\b(?!:)(?:(?!\. )[^`#\n()])*" % "|".join(COMMANDS))
FOREIGN = re.compile(r"torchrun [^`]*?-m |python -m norga\.data\.manifest [^`.]*|ray start [^`)]*")  # other programs' command lines
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
SET_VALUE = re.compile(r"--set[ =]([\w.:-]+)=(\S+?)(?=[\s,;)`'\"]|\.(?:\s|$)|$)")
PLACEHOLDER = "PLACEHOLDER"
LIBRARY_OF = {"comparison.py": "compare", "reevaluate.py": "evaluate", "official_evaluation.py": "evaluate"}
#: (modules behind one command: their messages name its options)


def message_strings(path: Path) -> list[str]:
    """The string constants of a module (f-strings with their fields as a placeholder), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    parts_of_fstrings = {id(value) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                         for value in node.values}
    strings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            strings.append("".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in parts_of_fstrings):
            strings.append(node.value)
    return strings


def command_lines(text: str) -> list[list[str]]:
    lines = []
    for match in COMMAND_LINE.finditer(text):
        words = match.group(0).rstrip(" .,;:").replace("...", "").split()
        lines.append(words[1:])
    return lines


def suggestions(path: Path) -> tuple[list[list[str]], set[str], list[tuple[str, str]]]:
    """(command lines, options named outside command lines, --set KEY=VALUE pairs) in `path`'s messages (the
    parser has already joined adjacent string pieces into one constant)."""
    commands, flags, settings = [], set(), []
    for text in message_strings(path):
        commands += command_lines(text)
        settings += SET_VALUE.findall(text)
        rest = FOREIGN.sub(" ", COMMAND_LINE.sub(" ", text))
        flags |= set(FLAG.findall(rest))
    return commands, flags, settings


def option_strings(parser) -> set[str]:
    found = {option for action in parser._actions for option in action.option_strings}
    for action in parser._actions:
        if isinstance(action.choices, dict):  # sub-commands (other choices are values)
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def sub_parser(name: str):
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices[name]


def own_parser_flags(path: Path) -> set[str]:
    """The options a module's own messages may name: its command's, or those of every command that runs a
    benchmark (library messages can surface under any of them)."""
    if path.name == "cli.py":
        return option_strings(build_parser())
    command = LIBRARY_OF.get(path.name, path.stem if path.parent.name == "commands" else None)
    if path.parent.name == "sweep":  # norga/sweep/*: the modules behind `norga sweep`
        command = "sweep"
    if command in COMMANDS:
        return option_strings(sub_parser(command))
    if path.name == "resume_changes.py":  # what `norga run --resume` may change
        return option_strings(sub_parser("run"))
    if path.name in ("manifest.py", "split_manifest.py"):
        return option_strings(manifest_parser())
    return set.intersection(*(option_strings(sub_parser(name)) for name in ("run", "compare", "quickstart")))


def concrete(word: str) -> str:
    """A placeholder in a suggested command line (DIR, FILE, {path}, <...>) as a value the parser accepts."""
    return re.sub(r"PLACEHOLDER|<[^>]*>|\b[A-Z][A-Z_]*\b", "x", word)


MODULES = sorted(SOURCE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_suggested_command_lines_parse_with_the_real_parser(path):
    parser = build_parser()
    for words in suggestions(path)[0]:
        try:
            parser.parse_args([concrete(word) for word in words])
        except SystemExit as exit_:
            raise AssertionError(f"{path.name} suggests `norga {' '.join(words)}`, which the parser refuses") from exit_


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_named_options_exist(path):
    flags = {flag for flag in suggestions(path)[1] if "_" not in flag}  # --output_dir: the official scripts' own
    missing = flags - own_parser_flags(path)
    assert not missing, f"{path.name} names options its commands lack: {sorted(missing)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_suggested_config_keys_exist(path):
    for key, value in suggestions(path)[2]:
        key = key.rpartition(":")[2]  # compare's METHOD:key=value
        if PLACEHOLDER in key or key.isupper():
            continue
        try:
            load_config("tiny_smoke", [f"{key}={concrete(value)}"])
        except ConfigError as error:
            assert "unknown config key" not in str(error), f"{path.name} suggests --set {key}=...: {error}"


def test_norga_options_have_no_underscores_so_an_official_scripts_option_is_never_taken_for_one():
    assert not [flag for flag in option_strings(build_parser()) if "_" in flag]


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scanner itself: a message with a wrong flag and a wrong command is caught."""
    module = tmp_path / "bad.py"
    module.write_text('raise ValueError(f"pass --data-root {x} or run `norga run --frobnicate {x}`; '
                      '--set data.rot=1")\n')
    commands, flags, settings = suggestions(module)
    assert ["run", "--frobnicate", "PLACEHOLDER"] in commands and "--data-root" in flags
    assert ("data.rot", "1") in settings
    assert "--data-root" not in own_parser_flags(module)
    with pytest.raises(SystemExit):
        build_parser().parse_args([concrete(w) for w in ["run", "--frobnicate", "PLACEHOLDER"]])
