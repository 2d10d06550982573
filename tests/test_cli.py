"""The norga console script's top level."""

import subprocess
import sys

from norga import __version__
from norga.cli import main


def test_version_and_help_from_the_module_entry_point():
    version = subprocess.run([sys.executable, "-m", "norga", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"norga {__version__}"
    help_text = subprocess.run([sys.executable, "-m", "norga", "--help"], capture_output=True, text=True, check=True)
    assert "usage: norga" in help_text.stdout and "continual learning" in help_text.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: norga" in capsys.readouterr().out


def test_unknown_command_fails(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("an unknown command must exit non-zero")
    assert "invalid choice" in capsys.readouterr().err
