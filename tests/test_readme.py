"""The README's commands and example stay true."""

import re
import runpy
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_library_example_runs_and_matches_the_readme(capsys):
    example = ROOT / "examples" / "norga_on_timm.py"
    runpy.run_path(str(example), run_name="__main__")
    assert "logits (4, 100)" in capsys.readouterr().out
    readme_code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    example_lines = {line.split("#")[0].strip() for line in example.read_text().splitlines()}
    for line in readme_code.splitlines():
        assert line.split("#")[0].strip() in example_lines, f"README line not in the example: {line!r}"


def test_ci_runs_the_readme_test_command():
    marker = README.index("<!-- test-command -->")
    command = README[marker:].splitlines()[2]
    assert "pytest" in command
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == command
    assert "test_command=$(awk '/<!-- test-command -->/{getline; getline; print; exit}' README.md)" in (ROOT / ".ci" / "run").read_text()
