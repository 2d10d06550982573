"""The README stays a landing page whose commands are true: CI runs its test command, the quickstart comes first,
and its methods table links every registered method's page."""

import re
import subprocess
from pathlib import Path

from norga.docs_pages import method_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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
    assert command in (ROOT / "docs" / "getting-started.md").read_text()  # the docs give the same command


def test_the_readme_is_a_landing_page_that_starts_with_the_quickstart():
    assert len(README.splitlines()) < 120
    first_command = re.search(r"```bash\n(.*?)\n", README).group(1)
    assert first_command.endswith("norga quickstart") and first_command in (ROOT / "docs" / "index.md").read_text()
    assert "mkdocs serve" in README


def test_the_readme_methods_table_links_every_registered_methods_page():
    table = README[README.index("## Methods"):].split("\n\n")[1].splitlines()[2:]
    linked = {}
    for row in table:
        name = re.search(r"\| `(\w+)` \|", row).group(1)
        linked[name] = re.search(r"\]\((docs/methods/\w+\.md)\)", row).group(1)
    assert set(linked) == set(method_names())  # norga's own methods
    for name, page in linked.items():
        assert page == f"docs/methods/{name}.md" and (ROOT / page).is_file()
