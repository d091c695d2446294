"""Hardening catalogue, folders, concurrency and checkpoints (issue 18): lora-tsd deletes only folders it created
(never the run an export reads), one process writes a run folder at a time, eval never overwrites a file
unasked, and checkpoint manifests cannot name files outside their checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from catalogue import check_case, snapshot
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.cli import main
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.app.workflow.ownership import OWNER_MARKER
from lora_tsd.app.workflow.run_folder import LOCK_FILE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    enc = make_encoder(root / "enc")
    task = write_jsonl(root / "s.jsonl", sentiment_rows(40))
    run = root / "run"
    assert main(["train", "--model", str(enc), "--task", f"jsonl:{task}", "--output-dir", str(run), "--no-progress",
                 "--method", "lora", "--rank", "2", "--steps", "4", "--batch-size", "4",
                 "--checkpoint-every", "2"]) == 0
    return {"root": root, "enc": enc, "task": task, "run": run}


def _copy(world, name: str) -> Path:
    dst = world["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(world["run"], dst, symlinks=True)
    return dst


def _train(world, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(world["enc"]), "--task", f"jsonl:{world['task']}", "--output-dir", str(out),
            "--no-progress", "--steps", "1", "--batch-size", "4", *extra]


def _user_folder(tmp: Path, name: str = "mine") -> Path:
    folder = tmp / name
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


# ---------------------------------------------------------------------------------------- ownership: export


def test_run_and_export_folders_carry_the_owner_marker(world, tmp_path) -> None:
    assert json.loads((world["run"] / OWNER_MARKER).read_text())["kind"] == "run"
    assert main(["export", str(world["run"]), "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / OWNER_MARKER).read_text())["kind"] == "export"
    assert (tmp_path / "exp" / "adapter_model.safetensors").is_file()
    # lora-tsd's own export folder may be replaced
    assert main(["export", str(world["run"]), "--out", str(tmp_path / "exp"), "--overwrite"]) == 0


EXPORT_CASES = [
    ("export-over-user-folder", lambda w, t: str(_user_folder(t)),
     r"--overwrite refuses to delete .*mine'. it is not a lora-tsd export folder"),
    ("export-over-the-run-itself", lambda w, t: "{run}", r"it is, is inside or contains the run"),
    ("export-over-the-run-adapter", lambda w, t: "{run}/adapter", r"it is, is inside or contains the run"),
    ("export-over-an-ancestor-of-the-run", lambda w, t: "{parent}", r"it is, is inside or contains the run"),
    ("export-to-a-symlink", lambda w, t: str(_symlink(t)), r"is a file or a symbolic link"),
    ("export-to-a-file", lambda w, t: str(_file(t)), r"is a file or a symbolic link"),
    ("export-partial-is-a-user-folder", lambda w, t: str(_user_folder(t, "x.partial").with_name("x")),
     r"export refuses to delete .*x.partial'. it is not a lora-tsd export folder"),
]


def _symlink(tmp: Path) -> Path:
    target = _user_folder(tmp, "target")
    (tmp / "link").symlink_to(target, target_is_directory=True)
    return tmp / "link"


def _file(tmp: Path) -> Path:
    (tmp / "f.txt").write_text("mine")
    return tmp / "f.txt"


@pytest.mark.parametrize(("make_out", "message"), [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_export_overwrite_deletes_only_its_own_folders(world, tmp_path, capsys, make_out, message) -> None:
    """Issue 18: `export RUN --out DIR --overwrite` deleted a user's folder, the run folder or its adapter."""
    holder = tmp_path / "holder"
    holder.mkdir()
    run = shutil.copytree(world["run"], holder / "run", symlinks=True)
    out = make_out(world, tmp_path).format(run=run, parent=holder)
    check_case(["export", str(run), "--out", out, "--overwrite"], 2, message, capsys, watched=(tmp_path,))


# ------------------------------------------------------------------------------------- ownership: train/eval


def test_overwrite_refuses_a_run_folder_lora_tsd_did_not_create(world, tmp_path, capsys) -> None:
    fake = _user_folder(tmp_path)
    (fake / "train_config.json").write_text("{}")  # looks like a run, but lora-tsd did not make it
    check_case(_train(world, fake, "--overwrite"), 2, r"it is not a lora-tsd run folder", capsys, watched=(fake,))


def test_a_string_false_never_means_overwrite(world, tmp_path, capsys) -> None:
    """Issue 18: `"overwrite": "false"` counted as true and deleted a run with its checkpoints."""
    run = _copy(world, "run-string-false")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"overwrite": "false"}))
    check_case([*_train(world, run), "--config", str(config)], 2, r"overwrite must be true/false, got 'false'",
               capsys, watched=(run,))


OUTPUT_DIR_CASES = [
    ("output-dir-is-a-file", lambda t: _file(t), (), r"output directory .* is a file"),
    ("output-dir-under-proc", lambda t: Path("/proc/lora-tsd-run"), (), r"cannot create output directory"),
    ("output-dir-symlink-overwrite", lambda t: _symlink(t), ("--overwrite",), r"it is a symbolic link"),
]


@pytest.mark.parametrize(("make_out", "extra", "message"), [c[1:] for c in OUTPUT_DIR_CASES],
                         ids=[c[0] for c in OUTPUT_DIR_CASES])
def test_bad_output_dirs(world, tmp_path, capsys, make_out, extra, message) -> None:
    out = make_out(tmp_path)
    check_case(_train(world, out, *extra), 2, message, capsys, watched=(tmp_path,))


def test_eval_output_never_overwrites_unasked(world, tmp_path, capsys) -> None:
    existing = _file(tmp_path)
    check_case(["eval", str(world["run"]), "--output", str(existing)], 2,
               r"--output file .* already exists; pass --overwrite", capsys, watched=(tmp_path, world["run"]))
    check_case(["eval", str(world["run"]), "--output", str(tmp_path)], 2, r"--output .* is a folder", capsys,
               watched=(tmp_path,))
    assert main(["eval", str(world["run"]), "--output", str(existing), "--overwrite"]) == 0
    assert json.loads(existing.read_text())["split"] == "test"


# ------------------------------------------------------------------------------------------------ concurrency


def _hold_lock(folder: Path):
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - closed by the test
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.seek(0)
    handle.truncate()
    handle.write("424242\n")
    handle.flush()
    return handle


@pytest.mark.parametrize("extra", [("--overwrite",), ("--resume",)], ids=["overwrite", "resume"])
def test_a_second_writer_of_a_run_folder_is_refused(world, capsys, extra) -> None:
    """Issue 18: --overwrite deleted a running run's folder; two --resume interleaved metrics.jsonl."""
    run = _copy(world, f"run-locked-{extra[0][2:]}")
    handle = _hold_lock(run)
    try:
        argv = _train(world, run, *extra) if extra[0] == "--overwrite" else ["train", "--output-dir", str(run),
                                                                              "--resume"]
        check_case(argv, 2, r"is in use by another lora-tsd process \(pid 424242\)", capsys, watched=(run,))
    finally:
        handle.close()
    # once the holder is gone (a killed run's lock dies with it), --resume proceeds
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0


# ------------------------------------------------------------------------------------------------ checkpoints


def _edit_manifest(ckpt: Path, edit) -> None:
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


MANIFEST_CASES = [
    ("manifest-parent-path", lambda m: m.__setitem__("../../../../../../etc/hostname", "0" * 64),
     r"manifest.json names '../../../../../../etc/hostname', which is not a file inside the checkpoint"),
    ("manifest-absolute-existing", lambda m: m.__setitem__("/etc/hostname", "0" * 64),
     r"manifest.json names '/etc/hostname', which is not a file inside the checkpoint"),
    ("manifest-absolute-missing", lambda m: m.__setitem__("/etc/no-such-file-x", "0" * 64),
     r"manifest.json names '/etc/no-such-file-x', which is not a file inside the checkpoint"),
    ("manifest-empty", lambda m: m.clear(), r"manifest.json does not list trainer_state.json"),
    ("manifest-no-digest", lambda m: m.__setitem__("trainer_state.json", None),
     r"manifest.json must map file names to SHA-256 digests"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_checkpoint_manifest_is_confined(world, capsys, edit, message) -> None:
    """Issue 18: a manifest could name ../../etc/hostname, and /etc/shadow answered whether it exists. The
    message is the same whether the outside file exists or not."""
    run = _copy(world, "run-manifest")
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    _edit_manifest(ckpt, edit)
    check_case(["train", "--output-dir", str(run), "--resume", str(ckpt)], 1, message, capsys, watched=(run,))


def test_a_bad_newest_checkpoint_falls_back_to_the_older_one(world, capsys) -> None:
    run = _copy(world, "run-fallback")
    older, newest = sorted((run / "checkpoints").iterdir())
    _edit_manifest(newest, lambda m: m.clear())
    (newest / "trainer_state.safetensors").write_bytes(b"corrupt")
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"skipping corrupt checkpoint: checkpoint {newest}: manifest.json does not list" in err
    assert "Traceback" not in err
    assert (run / "adapter" / "tsd_adapter.safetensors").is_file()


def test_lock_file_holds_the_writer_pid_after_a_run(world) -> None:
    assert (world["run"] / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert snapshot(world["run"])  # the run folder is not empty


# ------------------------------------------------------------------------------------------------ resume


RESUME_CASES = [
    ("resume-changed-lr", ("--lr", "0.5"),
     rf"--resume continues .* these would be ignored: lr=0.5 \(saved: {TrainConfig().lr}\)"),  # the default lr
    ("resume-changed-rank", ("--rank", "4"), r"these would be ignored: r=4 \(saved: 2\)"),
    ("resume-changed-method", ("--method", "dash"), r"these would be ignored: method='dash' \(saved: 'lora'\)"),
    ("resume-changed-steps", ("--steps", "9"), r"these would be ignored: steps=9 \(saved: 4\)"),
]


@pytest.mark.parametrize(("extra", "message"), [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resume_refuses_changed_options(world, capsys, extra, message) -> None:
    """Issue 18: --resume ignored changed flags without a word."""
    run = _copy(world, "run-resume-changed")
    check_case(["train", "--output-dir", str(run), "--resume", *extra], 2, message, capsys, watched=(run,))


def test_resume_accepts_the_saved_options_repeated(world) -> None:
    run = _copy(world, "run-resume-same")
    assert main(["train", "--output-dir", str(run), "--resume", "--method", "lora", "--rank", "2", "--steps", "4",
                 "--no-progress"]) == 0


@pytest.mark.parametrize(("flags", "field"), [(("--seed", "1"), "seed"), (("--rank", "4"), "r"),
                                              (("--method", "dash", "--prelaunch-steps", "1"), "method")],
                         ids=["other-seed", "other-rank", "other-method"])
def test_resume_refuses_another_runs_checkpoint(world, capsys, flags, field) -> None:
    """Issue 18: --resume CHECKPOINT accepted a checkpoint of another run (another seed, rank or method)."""
    other = world["root"] / f"other-{field}"
    if not other.exists():
        assert main(["train", "--model", str(world["enc"]), "--task", f"jsonl:{world['task']}", "--output-dir",
                     str(other), "--no-progress", "--method", "lora", "--rank", "2", "--steps", "4", "--batch-size",
                     "4", "--checkpoint-every", "2", *flags]) == 0
    foreign = sorted((other / "checkpoints").iterdir())[0]
    run = _copy(world, "run-foreign")
    check_case(["train", "--output-dir", str(run), "--resume", str(foreign)], 2,
               rf"checkpoint .* belongs to another run: its {field} is .*, this run's is", capsys,
               watched=(run, other))


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(world, tmp_path, capsys) -> None:
    """Issue 18: after a kill before the first checkpoint, --resume said "start the run again" and starting again
    was refused. The message now names --overwrite, which works because the folder is lora-tsd's."""
    run = tmp_path / "killed"
    assert main(_train(world, run)) == 0
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # as if killed before the first checkpoint
    check_case(["train", "--output-dir", str(run), "--resume"], 2,
               r"no checkpoint to resume from .*; start the run again with the same options and --overwrite", capsys,
               watched=(run,))
    assert main([*_train(world, run), "--overwrite"]) == 0
