"""docs/results.md and the README's headline are generated from the committed results files: a hand edit of a
number, or a results file changed without rebuilding, makes the committed text differ from a fresh render."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_module():
    spec = importlib.util.spec_from_file_location("results_build", ROOT / "docs" / "results" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_is_the_render_of_the_committed_results():
    build = _build_module()
    committed = (ROOT / "docs" / "results.md").read_text()
    assert build.render_report() == committed, "docs/results.md is stale or hand-edited: run docs/results/build.py"


def test_readme_headline_is_the_render_of_the_committed_results():
    build = _build_module()
    committed = (ROOT / "README.md").read_text()
    assert build.readme_with_headline(committed) == committed, (
        "the README's results headline is stale or hand-edited: run docs/results/build.py")
    assert build.HEADLINE_START in committed and "| lora |" in committed

