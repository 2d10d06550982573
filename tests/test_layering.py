"""The package's layers (pyproject's ``[tool.importlinter]``): imports flow one way, also inside functions, and no
module is part of an import cycle."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
LAYERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]


def lint_imports(config: Path, cwd: Path, path: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on `config` in a fresh process with `path` first on the import path."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    env = {"PYTHONPATH": str(path), "PATH": ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    result = lint_imports(ROOT / "pyproject.toml", ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_every_top_level_module_of_the_package_has_a_layer():
    """A new module or sub-package outside every layer would escape the contract."""
    package = ROOT / "src" / "norga"
    named = {name.strip() for layer in LAYERS for name in layer.split("|")}
    modules = {f"norga.{p.stem}" for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {f"norga.{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()}
    data_only = {"norga.presets"}  # YAML files, no code
    assert modules | packages - data_only <= named, sorted(modules | packages - data_only - named)


def test_no_module_is_in_an_import_cycle():
    graph = grimp.build_graph("norga", cache_dir=None)
    cycles = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
              if graph.chain_exists(importer=b, imported=a)]
    assert not cycles, f"import cycles through {sorted(cycles)[:5]}"


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    """The checker sees imports made inside functions: the layering cannot be dodged by a late import."""
    package = tmp_path / "layered"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "high.py").write_text("from layered import low\n")
    (package / "low.py").write_text(textwrap.dedent("""
        def late():
            from layered import high  # upward, inside a function
            return high
    """))
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "layered"
        [[tool.importlinter.contracts]]
        name = "one way"
        type = "layers"
        layers = ["layered.high", "layered.low"]
    """))
    result = lint_imports(config, tmp_path, tmp_path)
    assert result.returncode == 1 and "layered.low -> layered.high" in result.stdout, result.stdout + result.stderr
