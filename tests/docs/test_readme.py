"""The README's commands are the ones CI runs, and its quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _block_after(heading: str, lang: str) -> str:
    section = README.split(heading, 1)[1]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no ```{lang} block after {heading!r}"
    return match.group(1)


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = _block_after("## Install", "bash").strip()
    test = _block_after("## Test", "bash").strip()
    assert install in ci
    for part in test.split("&&"):
        assert part.strip() in ci, part


@pytest.mark.integration
def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _block_after("## Quickstart", "python")
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    import lora_tsd

    model = namespace["model"]
    layers = lora_tsd.adapted_layers(model)
    assert layers and all(layer.is_switched for _, layer in layers)
    assert (tmp_path / "my-adapter" / "tsd_config.json").is_file()
    assert (tmp_path / "my-adapter-peft" / "adapter_config.json").is_file()
