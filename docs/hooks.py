"""MkDocs hook: the site's generated parts (`norga.docs_pages`), a few repository files shown as pages, and the
checks that fail a strict build when the docs and the code disagree."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

from norga import docs_pages

log = logging.getLogger("mkdocs.hooks.norga")
ROOT = Path(__file__).resolve().parents[1]
#: Repository files the site shows as they are (written beside the code they describe): page -> file.
BORROWED = {"results.md": "benchmarks/RESULTS.md", "assets/sweep_demo.png": "examples/sweep_demo.png"}
COMPAT = Path(__file__).with_name("compat_switches.yaml")


def on_files(files: Files, config) -> Files:
    for problem in docs_pages.method_page_problems(Path(config["docs_dir"])):
        log.warning(problem)
    for page, source in BORROWED.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / source)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    for stale in docs_pages.stale_references(markdown):
        log.warning(f"{page.file.src_uri}: `{stale}` names no setting or norga module (renamed or removed?)")
    try:
        order = tuple(re.findall(r"methods/(\w+)\.md", str(config["nav"])))
        return docs_pages.expand(markdown, page.file.src_uri, docs_pages.read_compat_descriptions(COMPAT), order)
    except docs_pages.DocsError as error:
        raise PluginError(str(error)) from error
