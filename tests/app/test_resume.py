"""Kill at random optimizer steps (before the switch, after it, during a checkpoint write), resume, and get a
final adapter bit-identical to an uninterrupted run; corrupt checkpoints are detected and skipped."""

from __future__ import annotations

import json
import os
import random
import subprocess

import fault_injection
import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

T, STEPS = 4, 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"model": make_encoder(root / "enc"), "task": write_jsonl(root / "s.jsonl", sentiment_rows(100)),
            "root": root}


METHOD_ARGS = ["--method", "tsd", "--dash-directions", "2", "--prelaunch-steps", str(T)]


def cli(setup, out, *extra, fault=None, check=True, method_args=METHOD_ARGS):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [*fault_injection.command(fault), "train", "--model", str(setup["model"]), "--task",
           f"jsonl:{setup['task']}", "--output-dir", str(out), "--no-progress", *method_args, "--rank", "4",
           "--steps", str(STEPS), "--batch-size", "8", "--lr", "1e-2", "--dropout", "0.1", "--checkpoint-every", "1",
           "--eval-every", "3", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(setup):
    out = setup["root"] / "uninterrupted"
    cli(setup, out)
    return out


def tensors(run):
    return load_file(str(run / "adapter" / "tsd_adapter.safetensors"))


RNG = random.Random()  # random kill points; the chosen step is part of the test id printed on failure
# Always: killed right after the switch (the newest checkpoint is the switch step's, where A and B have no
# optimizer state yet), and during the write of the checkpoint after it. Plus random points before and after.
# The random write point avoids T + 1 so no two cases share an id or an output folder.
KILLS = [("step", T + 1), ("checkpoint-write", T + 1), ("step", RNG.randint(2, T)),
         ("step", RNG.randint(T + 2, STEPS)),
         ("checkpoint-write", RNG.choice([s for s in range(2, STEPS) if s != T + 1]))]


@pytest.mark.parametrize("point, step", KILLS, ids=[f"{p}-{s}" for p, s in KILLS])
def test_kill_and_resume_is_bit_identical(setup, reference, point, step):
    out = setup["root"] / f"killed-{point}-{step}"
    killed = cli(setup, out, fault=f"{point}:{step}", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL
    assert not (out / "summary.json").exists()
    resumed = cli(setup, out, "--resume")
    assert "resuming" in resumed.stdout
    expected, got = tensors(reference), tensors(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    ref_summary = json.loads((reference / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics_after"] == ref_summary["metrics_after"]
    assert summary["validation_history"] == ref_summary["validation_history"]
    # The best validation state travels in the checkpoints: the resumed run exports the same step's state.
    assert summary["exported"] == ref_summary["exported"] and summary["collapse"] == ref_summary["collapse"]
    best, ref_best = (load_file(str(run / "best_state.safetensors")) for run in (out, reference))
    assert best.keys() == ref_best.keys() and all(torch.equal(best[k], ref_best[k]) for k in best)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps == list(range(1, STEPS + 1))  # replayed steps are not logged twice


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(setup):
    out = setup["root"] / "corrupt"
    cli(setup, out, fault=f"step:{T + 3}", check=False)
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"step-{T + 1:07d}", f"step-{T + 2:07d}"]  # the newest two kept
    state = checkpoints[-1] / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:-100])  # truncate the newest
    proc = cli(setup, out, "--resume")
    assert "skipping corrupt checkpoint" in proc.stderr and "does not match its checksum" in proc.stderr
    assert f"from step-{T + 1:07d}" in proc.stdout


def test_resume_without_checkpoints_is_an_error(setup):
    out = setup["root"] / "nockpt"
    # steps > T: a pre-launch as long as the run is refused (issue 18); --resume repeats the run's options
    short = ("--checkpoint-every", "0", "--steps", str(T + 1))
    cli(setup, out, *short)
    proc = cli(setup, out, *short, "--resume", check=False)
    assert proc.returncode == 2 and "no checkpoint to resume from" in proc.stderr


def test_dora_baseline_kill_and_resume_is_bit_identical(setup):
    """The external PEFT DoRA baseline checkpoints in PEFT's format and resumes bit-exactly too."""
    dora = ["--method", "dora"]
    reference = setup["root"] / "dora-reference"
    cli(setup, reference, method_args=dora)
    out = setup["root"] / "dora-killed"
    killed = cli(setup, out, fault="step:6", check=False, method_args=dora)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoints" / "step-0000005" / "adapter" / "adapter_config.json").is_file()
    resumed = cli(setup, out, "--resume", method_args=dora)
    assert "resuming" in resumed.stdout
    expected = load_file(str(reference / "peft" / "adapter_model.safetensors"))
    got = load_file(str(out / "peft" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert json.loads((out / "summary.json").read_text())["metrics_after"] == \
        json.loads((reference / "summary.json").read_text())["metrics_after"]
