"""The first runs a new user tries: default run folders that never collide, and warnings for options that will not
do what they say."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.cli import main
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.app.workflow.preflight import data_warnings, option_warnings


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"encoder": make_encoder(root / "tiny-bert"), "cls": write_jsonl(root / "reviews.jsonl",
                                                                              sentiment_rows(60))}


def run_default_folder(assets, capsys, *extra):
    """``lora-tsd train`` without --output-dir; returns the folder it announced at start and its console."""
    code = main(["train", "--model", str(assets["encoder"]), "--task", f"jsonl:{assets['cls']}", "--steps", "2",
                 "--warmup-steps", "0", "--batch-size", "8", "--max-eval", "8", "--no-progress", *extra])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    announced = re.search(r"^run folder: (.+)$", printed.out, re.M).group(1)
    return announced, printed


def test_three_different_runs_get_their_own_default_folders(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = [run_default_folder(assets, capsys, *extra)[0]
               for extra in ([], ["--method", "dash", "--prelaunch-steps", "1"], ["--method", "lora", "--r", "4"])]
    assert folders == ["runs/tiny-bert-reviews-tsd-r8", "runs/tiny-bert-reviews-dash-r8",
                       "runs/tiny-bert-reviews-lora-r4"]
    for folder in folders:
        assert (tmp_path / folder / "summary.json").is_file()


def test_identical_runs_get_numbered_folders(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [run_default_folder(assets, capsys, "--method", "lora") for _ in range(3)]
    folders = [folder for folder, _ in runs]
    assert folders == ["runs/tiny-bert-reviews-lora-r8", "runs/tiny-bert-reviews-lora-r8-2",
                       "runs/tiny-bert-reviews-lora-r8-3"]
    for folder, printed in runs:
        assert (tmp_path / folder / "summary.json").is_file()
        assert f"outputs in {folder}:" in printed.out  # where the outputs went, at the end


def test_run_files_are_written_with_the_mode_of_any_new_file(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        folder, _ = run_default_folder(assets, capsys, "--checkpoint-every", "1")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert len(files) > 8
    assert {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {str(p.relative_to(tmp_path)): "0o644" for p in files}


def test_resume_without_a_folder_is_refused(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--model", str(assets["encoder"]), "--task", f"jsonl:{assets['cls']}", "--resume"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "lora-tsd train: error: --resume needs --output-dir: the run folder " \
                                              "to continue"
    assert not (tmp_path / "runs").exists()


def config(**options):
    return TrainConfig.from_dict({"model": "m", "task": "jsonl:x.jsonl", **options})


@pytest.mark.parametrize("options, expected", [
    ({"steps": 20},
     "--warmup-steps 25 is not below --steps 20: the learning rate never decays (the run ends during the warm-up); "
     "lower --warmup-steps below 20 (e.g. 2)"),
    ({"steps": 50, "eval_every": 80},
     "--eval-every 80 is beyond --steps 50: no validation during training, only at the end; lower --eval-every to "
     "at most 50 or leave it unset (every steps//10)"),
    ({"steps": 50, "checkpoint_every": 60},
     "--checkpoint-every 60 is beyond --steps 50: no checkpoint is ever saved, so --resume has nothing to resume; "
     "lower --checkpoint-every to at most 50"),
    ({"max_train": 10, "batch_size": 16},
     "--max-train 10 is smaller than --batch-size 16: every batch repeats examples; raise --max-train or lower "
     "--batch-size to at most 10"),
])
def test_each_surprising_option_is_named_with_its_fix(options, expected):
    assert option_warnings(config(**options)) == [expected]


def test_the_default_options_warn_about_nothing():
    assert option_warnings(TrainConfig()) == []
    assert option_warnings(config(method="dash", steps=101, warmup_steps=10)) == []
    assert option_warnings(config(method="lora", steps=60, warmup_steps=6)) == []  # no switch to miss


def test_small_splits_are_named_with_their_fix():
    cfg = config(batch_size=16, eval_every=5)
    assert data_warnings(cfg, 12, 0) == [
        "the validation split is empty, so --eval-every 5 has nothing to score; give more data or a validation "
        "file, or pass --eval-every 0"]
    assert data_warnings(cfg, 100, 10) == []


def test_a_run_that_would_never_switch_is_refused_with_the_fix(tmp_path, assets, capsys):
    """Issue 22 asked for a warning, issue 18 for no silent acceptance: a method that would never switch is refused
    before anything is written, and the message names both options and the fix."""
    out = tmp_path / "run"
    code = main(["train", "--model", str(assets["encoder"]), "--task", f"jsonl:{assets['cls']}", "--method", "dash",
                 "--steps", "60", "--no-progress", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert err.strip().splitlines()[-1] == (
        "lora-tsd train: error: prelaunch_steps (t) = 100 must be less than steps = 60: dash switches after t steps "
        "and would never switch; raise --steps above 100 or lower --prelaunch-steps below 60")


# ------------------------------------------------------------------------------------------- quiet console

OUR_LINES = re.compile(r"^(run folder: |untrained |gradient probe |trained |outputs in |lora-tsd train: warning: |"
                       r"tsd r=8: |step \d+: validation accuracy |restored the best validation checkpoint: |"
                       r"warning: (step \d+: validation (collapsed|has not left)|this run (collapsed|never left))|"
                       r"the collapse warned about |restart \d+ of \d+: the run never left |restarts: seed )")


def console_of(assets, tmp_path, *extra):
    """stdout + stderr of a ``lora-tsd train`` process (logging and warnings filters are per process)."""
    command = [sys.executable, "-m", "lora_tsd.app.cli", "train", "--model", str(assets["encoder"]), "--task",
               f"jsonl:{assets['cls']}", "--steps", "2", "--warmup-steps", "0", "--batch-size", "8", "--max-eval",
               "8", "--output-dir", str(tmp_path / "run"), *extra]
    # What an earlier in-process `main()` of the quiet console put into this process's environment must not reach
    # the command: each run decides for itself.
    leaked = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
              "LORA_TSD_VERBOSE")
    env = {k: v for k, v in os.environ.items() if k not in leaked}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "PYTHONWARNINGS": "default"},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_the_default_console_has_only_our_lines_and_verbose_restores_the_rest(tmp_path, assets):
    quiet = console_of(assets, tmp_path / "quiet")
    lines = [line for line in re.split(r"[\r\n]+", quiet) if line.strip()]
    assert [line for line in lines if not OUR_LINES.match(line)] == []
    for noise in ("LOAD REPORT", "Consider training on your downstream task", "Loading weights",
                  "Writing model shards", "Warning", "warn("):
        assert noise not in quiet
    verbose = console_of(assets, tmp_path / "verbose", "--verbose")
    assert "LOAD REPORT" in verbose and "Consider training on your downstream task" in verbose
    assert "Loading weights" in verbose


def test_pip_output_is_kept_back_unless_verbose(capsys, monkeypatch):
    from lora_tsd.app.assets.download_cache import _run_streaming

    command = [sys.executable, "-c", "print('Looking in indexes: mirror'); print('Saved ./x.whl')"]
    monkeypatch.delenv("LORA_TSD_VERBOSE", raising=False)
    assert _run_streaming(command) == (0, ["Looking in indexes: mirror", "Saved ./x.whl"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LORA_TSD_VERBOSE", "1")
    assert _run_streaming(command)[0] == 0
    assert capsys.readouterr().err == "Looking in indexes: mirror\nSaved ./x.whl\n"
