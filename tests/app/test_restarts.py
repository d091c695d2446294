"""``lora-tsd train --stuck-restarts``: a run that ends stuck (validation never left a one-class prediction) is
trained again with another seed and the better attempt on validation is exported; the run folder then holds that
attempt, complete, and the others are kept under ``restarts/``.

On the tiny BERT and the toy sentiment task of test_safeguards.py (400 rows), lr 1.0 provably stays at one
prediction (a "stuck" run) and lr 3e-2 learns the task in seed 1000 (100 % validation).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.cli import main
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.app.workflow.restarts import (
    RESTARTS_DIR,
    check_restarts,
    is_stuck,
    rank_key,
    restart_seed,
    train_with_restarts,
)
from lora_tsd.app.workflow.run import run_training
from lora_tsd.errors import ConfigError

STEPS = 60
OPTIONS = dict(method="tsd", r=4, dash_directions=2, prelaunch_steps=5, steps=STEPS, batch_size=8, warmup_steps=5,
               eval_batch_size=16, progress=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("restarts")
    return {"root": root, "model": make_encoder(root / "enc"),
            "task": write_jsonl(root / "s.jsonl", sentiment_rows(400))}


def config(assets, out, **extra):
    return TrainConfig.from_dict({"model": str(assets["model"]), "task": f"jsonl:{assets['task']}",
                                  "output_dir": str(out), **OPTIONS, **extra})


def summary(run):
    return json.loads((run / "summary.json").read_text())


def test_restart_seeds_ranks_and_bad_counts():
    assert [restart_seed(0, k) for k in (1, 2)] == [1000, 2000]
    assert restart_seed(2**32 - 1, 1) == 999  # seeds stay 32-bit
    stuck = {"collapse": {"kind": "stuck"}, "exported": {"validation": 0.6}}
    fell_back = {"collapse": {"kind": "collapsed"}, "exported": {"validation": 0.7}}
    learned = {"collapse": None, "exported": {"validation": 0.55}}
    assert is_stuck(stuck) and not is_stuck(fell_back) and not is_stuck(learned)
    assert rank_key(learned) > rank_key(fell_back) > rank_key(stuck)  # no collapse beats any accuracy
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ConfigError, match="--stuck-restarts must be an integer ≥ 0"):
            check_restarts(bad)


def test_a_stuck_run_is_replaced_by_a_restart_that_learns(assets, tmp_path):
    """The restart learns (lr 3e-2 for the attempts after the first): the run folder becomes the restart's run,
    the stuck run moves to restarts/seed-0, every saved path follows its run, and eval reads the new one."""
    out = tmp_path / "run"
    lines: list[str] = []
    got = train_with_restarts(config(assets, out, lr=1.0), 1, run_training,
                              train=lambda c: run_training(c.with_options(lr=3e-2)), say=lines.append)
    s = summary(out)
    assert got == s and s["config"]["seed"] == 1000 and s["config"]["lr"] == 3e-2 and s["collapse"] is None
    aside = out / RESTARTS_DIR / "seed-0"
    stuck = summary(aside)
    assert is_stuck(stuck) and stuck["config"]["seed"] == 0
    assert sorted(p.name for p in (out / RESTARTS_DIR).iterdir()) == ["seed-0"]
    attempts = [{"seed": 0, "validation_accuracy": stuck["exported"]["validation"], "collapse": "stuck",
                 "folder": str(aside)},
                {"seed": 1000, "validation_accuracy": s["exported"]["validation"], "collapse": None,
                 "folder": str(out)}]
    assert s["restarts"] == {"max": 1, "attempts": attempts, "exported_seed": 1000}
    # Each run's saved folder and outputs name where it lies now.
    for run, data in ((out, s), (aside, stuck)):
        assert json.loads((run / "train_config.json").read_text())["output_dir"] == str(run)
        assert data["config"]["output_dir"] == str(run)
        assert all(v.startswith(str(run) + os.sep) for v in data["outputs"].values())
        assert all((run / "adapter").iterdir())
    shown = [f"{100 * a['validation_accuracy']:.1f}%" for a in attempts]
    assert lines == [
        "restart 1 of 1: the run never left a one-class prediction; training it again with seed 1000 (the same "
        "options and data split; --stuck-restarts 0 turns this off)",
        f"restarts: seed 0 {shown[0]} (stuck), seed 1000 {shown[1]} on validation; exported the run of seed 1000 "
        f"(now in {out}); the other attempts are kept in {out / RESTARTS_DIR}"]
    assert main(["eval", str(out), "--split", "validation", "--output", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["accuracy"] == s["exported"]["validation"]


def test_a_run_that_learns_is_not_restarted(assets, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    s = train_with_restarts(config(assets, out, lr=3e-2, seed=1000), 3, run_training, say=lines.append)
    assert s["collapse"] is None and "restarts" not in s and not (out / RESTARTS_DIR).exists() and lines == []


def test_the_command_line_restarts_a_stuck_run_and_keeps_the_better(assets, tmp_path):
    """Through ``lora-tsd train``: lr 1.0 stays stuck in both attempts; the better on validation is exported (the
    first on a tie), the other is a complete run folder under restarts/; ``--stuck-restarts 0`` trains once."""
    out = tmp_path / "cli"
    cmd = ["lora-tsd", "train", "--model", str(assets["model"]), "--task", f"jsonl:{assets['task']}",
           "--output-dir", str(out), "--no-progress", "--lr", "1", "--method", "tsd", "--rank", "4",
           "--dash-directions", "2", "--prelaunch-steps", "5", "--steps", str(STEPS), "--batch-size", "8",
           "--warmup-steps", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(out)
    attempts = s["restarts"]["attempts"]
    assert [a["seed"] for a in attempts] == [0, 1000] and all(a["collapse"] == "stuck" for a in attempts)
    first, restart = (a["validation_accuracy"] for a in attempts)
    chosen = 1000 if restart > first else 0
    assert s["restarts"]["exported_seed"] == chosen == s["config"]["seed"]
    other = out / RESTARTS_DIR / f"seed-{1000 - chosen}"
    assert summary(other)["config"]["seed"] == 1000 - chosen and (other / "adapter").is_dir()
    assert ("restart 1 of 1: the run never left a one-class prediction; training it again with seed 1000"
            in proc.stdout)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("restarts: seed 0 ")
    once = subprocess.run([*cmd[:7], str(tmp_path / "once"), *cmd[8:], "--stuck-restarts", "0"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert once.returncode == 0, once.stderr[-3000:]
    assert is_stuck(summary(tmp_path / "once")) and not (tmp_path / "once" / RESTARTS_DIR).exists()
    bad = subprocess.run([*cmd, "--stuck-restarts", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "lora-tsd train: error: --stuck-restarts must be an integer ≥ 0, got -1")
