"""The README's quick path from a fresh virtual environment: its install command, a short default run, and its
fast test command. Slow (an install and the fast suite): marked integration."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.integration


def _bash_block_after(heading: str) -> list[str]:
    section = README.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_quick_path_from_a_fresh_venv(tmp_path):
    install = _bash_block_after("## Install")
    assert install == ["python3 -m venv .venv", ". .venv/bin/activate", 'pip install -c constraints.txt -e ".[dev]"']
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(command: str, timeout: int) -> subprocess.CompletedProcess:
        script = f". {venv}/bin/activate && cd {ROOT} && {command}"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # the README's `python3 -m venv`
    run(install[2], timeout=1800)
    out = tmp_path / "short-default-run"
    done = run(f"lora-tsd train --steps 5 --warmup-steps 1 --max-eval 32 --output-dir {out}", timeout=1800)
    assert f"run folder: {out}" in done.stdout and (out / "peft" / "adapter_config.json").is_file()
    fast = re.search(r'`(python -m pytest -m "not integration")`', README).group(1)
    # The fast command itself, on the core tests only: the whole fast suite already runs in the same CI job, and
    # twice would double its time.
    done = run(fast + " -q -x -p no:cacheprovider tests/core", timeout=3600)
    assert re.search(r"\d+ passed", done.stdout), done.stdout[-2000:]
