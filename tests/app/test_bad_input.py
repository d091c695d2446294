"""The bad-input catalogue: every case gets its specific message, CLI misuse exits 2, bad data or files exit 1,
and no existing output is overwritten or deleted (a run that fails before its first checkpoint leaves no
folder behind)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_assets import make_decoder, make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    enc = make_encoder(root / "enc")
    other = make_encoder(root / "other")
    # "other" has the same architecture but different weights: adapters trained on enc must not load onto it
    from transformers import BertModel

    m = BertModel.from_pretrained(other)
    m.encoder.layer[0].attention.self.query.weight.data += 0.01
    m.save_pretrained(other)
    task = write_jsonl(root / "s.jsonl", sentiment_rows(60))
    run = root / "run"
    assert main(["train", "--model", str(enc), "--task", f"jsonl:{task}", "--output-dir", str(run), "--no-progress",
                 "--method", "dash", "--rank", "2", "--dash-directions", "2", "--prelaunch-steps", "2", "--steps",
                 "4", "--batch-size", "4", "--checkpoint-every", "2"]) == 0
    return {"root": root, "enc": enc, "other": other, "task": task, "run": run, "dec": make_decoder(root / "dec")}


def snapshot(folder: Path) -> dict[str, str]:
    """Content hash of every file below ``folder`` (to prove nothing was overwritten or deleted)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(world, name: str) -> Path:
    dst = world["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(world["run"], dst, symlinks=True)
    return dst


def _train(world, out, *extra, task=None):
    return ["train", "--model", str(world["enc"]), "--task", f"jsonl:{task or world['task']}", "--output-dir",
            str(out), "--no-progress", "--steps", "1", "--batch-size", "4", *extra]


def _jsonl(world, name, text):
    path = world["root"] / name
    path.write_text(text)
    return path


def _yaml(world, name, text):
    path = world["root"] / name
    path.write_text(text)
    return path


def _edit_tensors(run: Path, edit) -> None:
    path = run / "adapter" / "tsd_adapter.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _drop_checksum(run: Path) -> None:
    """Record the edited file's checksum, as a hand-editor would (a missing checksum is refused by itself)."""
    meta_path = run / "adapter" / "tsd_config.json"
    meta = json.loads(meta_path.read_text())
    meta["tensors_sha256"] = hashlib.sha256((run / "adapter" / "tsd_adapter.safetensors").read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


# (id, build argv from world and tmp dir, expected exit code, message fragment)
CASES = [
    # ---- command line and config files: misuse, exit 2
    ("unknown-flag", lambda w, t: _train(w, t / "o", "--rnak", "4"), 2, "unrecognized arguments: --rnak"),
    ("unknown-subcommand", lambda w, t: ["fit"], 2, "invalid choice: 'fit'"),
    ("bad-int", lambda w, t: _train(w, t / "o", "--steps", "many"), 2, "invalid int value: 'many'"),
    ("unknown-config-key", lambda w, t: ["train", "--config", str(_yaml(w, "k.yaml", "rank: 4\n"))], 2,
     "unknown key(s) in"),
    ("config-not-mapping", lambda w, t: ["train", "--config", str(_yaml(w, "l.yaml", "- 1\n- 2\n"))], 2,
     "must hold a mapping"),
    ("config-invalid-yaml", lambda w, t: ["train", "--config", str(_yaml(w, "b.yaml", "r: [1,\n"))], 2,
     "is not valid YAML/JSON"),
    ("config-missing", lambda w, t: ["train", "--config", str(t / "nope.yaml")], 2, "does not exist"),
    ("r-zero", lambda w, t: _train(w, t / "o", "--r", "0"), 2, "r must be a positive integer"),
    ("unknown-method", lambda w, t: _train(w, t / "o", "--method", "qlora"), 2, "unknown method 'qlora'"),
    ("unknown-selector", lambda w, t: _train(w, t / "o", "--method", "dash", "--selector", "best"), 2,
     "unknown selector 'best'"),
    ("negative-t", lambda w, t: _train(w, t / "o", "--method", "dash", "--prelaunch-steps", "-1"), 2,
     "prelaunch_steps (t) must be an integer ≥ 0"),
    ("s-exceeds-k", lambda w, t: _train(w, t / "o", "--method", "dash", "--dash-directions", "40", "--steps", "300"),
     2,
     "has 32 directions, fewer than the 40"),
    ("lr-zero", lambda w, t: _train(w, t / "o", "--lr", "0"), 2, "lr must be positive"),
    ("unknown-model-alias", lambda w, t: ["train", "--model", "minilmm", "--output-dir", str(t / "o")], 2,
     "unknown model 'minilmm'"),
    ("missing-model-folder", lambda w, t: ["train", "--model", str(t / "no-model"), "--output-dir", str(t / "o")],
     2, "does not exist"),
    ("unknown-task-source", lambda w, t: _train(w, t / "o") [:3] + ["--task", "kaggle:x", "--output-dir",
                                                                    str(t / "o")], 2, "must start with one of"),
    ("encoder-on-generation", lambda w, t: _train(w, t / "o", task=_jsonl(w, "g.jsonl", '{"prompt": "a", '
                                                                           '"completion": "b"}\n' * 20)), 2,
     "encoder models train classification tasks only"),
    ("eval-bad-split", lambda w, t: ["eval", str(w["run"]), "--split", "dev"], 2, "invalid choice: 'dev'"),
    ("eval-not-a-run", lambda w, t: ["eval", str(t)], 2, "is not a lora-tsd run folder"),
    ("resume-no-checkpoint", lambda w, t: ["train", "--output-dir", str(t / "none"), "--resume"], 2,
     "is not a lora-tsd run folder"),
    # ---- data files: exit 1, message names file and line
    ("malformed-jsonl", lambda w, t: _train(w, t / "o", task=_jsonl(w, "m.jsonl", '{"text": "a", "label": 0}\n'
                                                                      '{"text": "b", "label"\n')), 1,
     "m.jsonl:2: malformed JSON"),
    ("missing-key", lambda w, t: _train(w, t / "o", task=_jsonl(w, "k.jsonl", '{"text": "a", "label": 0}\n'
                                                                  '{"text": "b"}\n')), 1, "k.jsonl:2"),
    ("mc-label-out-of-range", lambda w, t: _train(w, t / "o", task=_jsonl(
        w, "r.jsonl", '{"input": "q", "choices": ["a", "b"], "label": 1}\n' * 9
        + '{"input": "q", "choices": ["a", "b"], "label": 2}\n')), 1, "r.jsonl:10"),
    ("empty-data-file", lambda w, t: _train(w, t / "o", task=_jsonl(w, "e.jsonl", "")), 1, "e.jsonl"),
    ("mixed-schemas", lambda w, t: _train(w, t / "o", task=_jsonl(w, "x.jsonl", '{"text": "a", "label": 0}\n'
                                                                  '{"prompt": "p", "completion": "c"}\n')), 1,
     "x.jsonl:2"),
    # ---- adapter and checkpoint files: exit 1
    ("adapter-truncated", "truncate", 1, "does not match the checksum"),
    ("adapter-tampered", "tamper", 1, "does not match the checksum"),
    ("adapter-wrong-shape", "shape", 1, "has shape (3, 32), the model expects (2, 32)"),
    ("adapter-config-corrupt", "config", 1, "is not valid JSON"),
    ("adapter-wrong-base", "base", 1, "differ from the ones the adapter was trained on"),
    ("adapter-folder-empty", "empty", 1, "holds neither a lora-tsd adapter"),
    ("checkpoint-tampered", "checkpoint", 1, "does not match its checksum"),
]


def _file_case(kind: str, world, tmp: Path) -> list[str]:
    run = copy_run(world, f"run-{kind}")
    tensors = run / "adapter" / "tsd_adapter.safetensors"
    if kind == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:200])
    elif kind == "tamper":
        _flip_byte(tensors)
    elif kind == "shape":
        import torch

        def widen(t):
            key = next(k for k in sorted(t) if k.endswith("lora_A"))
            t[key] = torch.zeros(3, t[key].shape[1])

        _edit_tensors(run, widen)
        _drop_checksum(run)
    elif kind == "config":
        (run / "adapter" / "tsd_config.json").write_text('{"format": "lora-tsd-adapter", ')
    elif kind == "base":
        return ["eval", str(run), "--model", str(world["other"])]
    elif kind == "empty":
        (tmp / "empty").mkdir()
        return ["eval", str(run), "--adapter", str(tmp / "empty")]
    elif kind == "checkpoint":
        ckpt = sorted((run / "checkpoints").iterdir())[-1]
        _flip_byte(ckpt / "trainer_state.safetensors")
        return ["train", "--output-dir", str(run), "--resume", str(ckpt)]
    return ["eval", str(run)]


def test_catalogue_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case_id, build, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, capsys, case_id, build, code, message):
    argv = _file_case(build, world, tmp_path) if isinstance(build, str) else build(world, tmp_path)
    watched = {p: snapshot(p) for p in (world["run"], world["enc"], world["root"] / "run-checkpoint")
               if p.exists()}
    try:
        result = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        result = exit_.code
    err = capsys.readouterr().err
    assert result == code, err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # a failed run leaves no half-written output folder
    for path, before in watched.items():
        assert snapshot(path) == before, f"{path} changed"


def test_existing_outputs_are_never_overwritten(world, tmp_path, capsys):
    before = snapshot(world["run"])
    assert main(_train(world, world["run"])) == 2
    assert "already exists" in capsys.readouterr().err
    export_target = tmp_path / "export"
    export_target.mkdir()
    (export_target / "keep.txt").write_text("mine")
    assert main(["export", str(world["run"]), "--out", str(export_target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (export_target / "keep.txt").read_text() == "mine"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.txt").write_text("mine")
    assert main(_train(world, plain, "--overwrite")) == 2
    assert "not a lora-tsd run folder" in capsys.readouterr().err
    assert (plain / "data.txt").read_text() == "mine"
    assert snapshot(world["run"]) == before
