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


def _python_blocks_after(heading: str) -> list[str]:
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_states_the_quick_path_facts():
    """The facts a new user needs before the first run, as the code does them (checked by other tests)."""
    from lora_tsd.app.workflow.config import TrainConfig
    from lora_tsd.app.workflow.outputs import default_run_name

    default = TrainConfig()
    for fact in ("python3 -m venv .venv", f"runs/{default_run_name(default)}", default.task,
                 "80 % train, 10 % validation and 10 % test", 'python -m pytest -m "not integration"',
                 "**into your real cache**", "80 MiB"):
        assert fact in README, fact


@pytest.mark.integration
def test_readme_peft_loading_examples_run_offline_on_the_embedded_minilm(tmp_path, monkeypatch):
    """Every python block of the PEFT-loading section runs as written, offline, on exports of the embedded MiniLM
    (the folder names the blocks use are written here by `lora-tsd export`)."""
    import subprocess
    import sys

    from tiny_assets import sentiment_rows, write_jsonl

    from lora_tsd.app.cli import main

    monkeypatch.chdir(tmp_path)
    rows = [{"text": r["text"], "label": ["negative", "positive"][r["label"]]} for r in sentiment_rows(60)]
    task = write_jsonl(tmp_path / "reviews.jsonl", rows)
    assert main(["train", "--model", "minilm", "--task", f"jsonl:{task}", "--steps", "2", "--warmup-steps", "0",
                 "--batch-size", "8", "--max-eval", "8", "--max-length", "16", "--no-progress", "--output-dir",
                 "run"]) == 0
    assert main(["export", "run", "--out", "minilm-export"]) == 0
    assert main(["export", "run", "--out", "minilm-merged", "--merged"]) == 0
    blocks = _python_blocks_after("## Loading the exported adapter with stock PEFT")
    assert len(blocks) == 2
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    printed = []
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        printed.append(done.stdout.strip())
    from lora_tsd.app.assets.models import model_cache_path

    assert printed[0] in ("sentence-transformers/all-MiniLM-L6-v2", str(model_cache_path("minilm").resolve()))
    assert printed[1] == "{0: 'negative', 1: 'positive'}"
