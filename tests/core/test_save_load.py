"""save_adapter → load_adapter reproduces the model bit for bit, in a fresh process, before and after the switch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MODEL_FACTORIES, logits, token_batch, trained_tiny
from safetensors.torch import load_file, save_file

import lora_tsd

T = 3

FRESH_PROCESS = textwrap.dedent(
    """
    import sys, json, torch
    sys.path.insert(0, {tests!r})
    torch.manual_seed(12345)  # another global seed than the training process
    from conftest import MODEL_FACTORIES, logits, make_optimizer, token_batch, train_step
    import lora_tsd
    from safetensors.torch import save_file
    model = lora_tsd.load_adapter(MODEL_FACTORIES[{kind!r}](), {adapter!r})
    out = {{"logits": logits(model, token_batch(5))}}
    layer = lora_tsd.adapted_layers(model)[0][1]
    info = {{"phase": int(layer.phase), "step": int(layer.step), "switched_at": None}}
    opt = make_optimizer(model)
    for n in range({more_steps}):
        train_step(model, opt, seed=100 + n)
        if lora_tsd.step(model, opt):
            info["switched_at"] = int(layer.step)
    info["final_phase"] = int(layer.phase)
    save_file(out, {result!r})
    print(json.dumps(info))
    """
)


def run_fresh(tmp_path, kind: str, adapter, more_steps: int = 0) -> tuple[torch.Tensor, dict]:
    result = tmp_path / "fresh.safetensors"
    code = FRESH_PROCESS.format(tests=os.path.dirname(os.path.dirname(__file__)), kind=kind, adapter=str(adapter),
                                result=str(result), more_steps=more_steps)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(result))["logits"], json.loads(proc.stdout.strip().splitlines()[-1])


def build(kind: str, method: str, steps: int):
    return trained_tiny(kind, method, steps, prelaunch_steps=T)


@pytest.mark.parametrize("method", ["tsd"])  # tsd has both a dash term and an init residual
@pytest.mark.parametrize("steps", [1, T + 2], ids=["before-switch", "after-switch"])
def test_save_load_in_fresh_process_is_bit_exact(tmp_path, model_kind, method, steps):
    model = build(model_kind, method, steps)
    expected = logits(model, token_batch(5))
    lora_tsd.save_adapter(model, tmp_path / "adapter")
    more = T + 1 - steps if steps < T else 1
    got, info = run_fresh(tmp_path, model_kind, tmp_path / "adapter", more_steps=more)
    assert torch.equal(got, expected)
    assert info["step"] == steps
    assert info["phase"] == (1 if steps >= T else 0)
    if steps < T:  # training continues with the same phase: the switch lands at step t, counted across the save
        assert info["switched_at"] == T
    assert info["final_phase"] == 1


def test_adapter_config_json_records_phase_directions_and_fingerprints(tmp_path):
    model = build("llama", "tsd", T + 1)
    lora_tsd.save_adapter(model, tmp_path / "a")
    meta = lora_tsd.read_adapter_config(tmp_path / "a")
    assert meta["phase"] == "switched" and meta["optimizer_step"] == T + 1
    assert meta["config"]["method"] == "tsd"
    for name, layer in lora_tsd.adapted_layers(model):
        entry = meta["layers"][name]
        assert entry["dash_directions"] == layer.dash_idx.tolist()
        assert entry["init_directions"] == layer.init_idx.tolist()
        assert len(entry["base_fingerprint"]) == 64


def test_load_onto_different_base_weights_fails_clearly(tmp_path):
    model = build("llama", "dash", 1)
    lora_tsd.save_adapter(model, tmp_path / "a")
    other = MODEL_FACTORIES["llama"](seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(lora_tsd.BaseMismatchError, match=r"differ .* in 10 of 10 layers \(e.g. model.layers.0"):
        lora_tsd.load_adapter(other, tmp_path / "a")
    assert not lora_tsd.adapted_layers(other)  # the model is left as it was given
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_load_detects_a_single_changed_layer(tmp_path):
    model = build("gpt2", "tsd", T + 1)
    lora_tsd.save_adapter(model, tmp_path / "a")
    other = MODEL_FACTORIES["gpt2"]()
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    with pytest.raises(lora_tsd.BaseMismatchError, match=r"1 of 8 layers \(e.g. transformer.h.1.mlp.c_fc\)"):
        lora_tsd.load_adapter(other, tmp_path / "a")


def test_tampered_or_truncated_adapter_files_are_rejected(tmp_path):
    model = build("llama", "dash", 1)
    lora_tsd.save_adapter(model, tmp_path / "a")
    tensors = tmp_path / "a" / "tsd_adapter.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(lora_tsd.AdapterFormatError, match="checksum"):
        lora_tsd.load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "a")
    (tmp_path / "a" / "tsd_config.json").write_text("{ truncated")
    with pytest.raises(lora_tsd.AdapterFormatError, match="not valid JSON"):
        lora_tsd.load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "a")
    with pytest.raises(lora_tsd.AdapterFormatError, match="does not exist"):
        lora_tsd.load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "nowhere")


def test_wrong_shapes_are_rejected(tmp_path):
    model = build("llama", "dash", 1)
    lora_tsd.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "tsd_adapter.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key] = torch.zeros(5, tensors[key].shape[1])
    save_file(tensors, str(path))
    meta = json.loads((tmp_path / "a" / "tsd_config.json").read_text())
    # a hand-edited adapter whose checksum was updated (a missing checksum is refused by itself)
    meta["tensors_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "a" / "tsd_config.json").write_text(json.dumps(meta))
    with pytest.raises(lora_tsd.AdapterFormatError, match=r"lora_A has shape \(5, \d+\), the model expects \(4, \d+\)"):
        lora_tsd.load_adapter(MODEL_FACTORIES["llama"](), tmp_path / "a")


def test_save_refuses_a_merged_model(tmp_path):
    model = build("llama", "dash", 1)
    lora_tsd.merge_in_place(model)
    with pytest.raises(lora_tsd.ConfigError, match="unmerge"):
        lora_tsd.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def _tampered_adapter(tmp_path, edit, rehash: bool = True):
    model = build("llama", "dash", 1)
    lora_tsd.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "tsd_adapter.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    meta = json.loads((tmp_path / "a" / "tsd_config.json").read_text())
    if rehash:
        meta["tensors_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        meta.pop("tensors_sha256")
    (tmp_path / "a" / "tsd_config.json").write_text(json.dumps(meta))
    return tmp_path / "a"


def _first(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


STRICT_CASES = [
    ("integer-dtype", lambda t: t.__setitem__(_first(t, "lora_A"), t[_first(t, "lora_A")].to(torch.int32)),
     r"lora_A has dtype torch.int32, the model expects torch.float32"),
    ("nan-values", lambda t: t[_first(t, "lora_B")].fill_(float("nan")), r"lora_B holds NaN or infinite values"),
    ("inf-values", lambda t: t[_first(t, "lora_A")].fill_(float("inf")), r"lora_A holds NaN or infinite values"),
    ("extra-tensor", lambda t: t.__setitem__("payload.extra", torch.zeros(3)),
     r"does not hold exactly this model's adapter tensors: unexpected \['payload.extra'\]; missing none"),
    ("missing-tensor", lambda t: t.pop(_first(t, "lora_B")), r"unexpected none; missing \['.*lora_B'\]"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in STRICT_CASES], ids=[c[0] for c in STRICT_CASES])
def test_adapters_load_strictly(tmp_path, edit, message):
    """Issue 18: integer dtypes, NaN values and extra tensors were accepted; each is refused, and the model is
    given back unchanged."""
    folder = _tampered_adapter(tmp_path, edit)
    base = MODEL_FACTORIES["llama"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(lora_tsd.AdapterFormatError, match=message):
        lora_tsd.load_adapter(base, folder)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_adapter_without_its_checksum_is_refused(tmp_path):
    folder = _tampered_adapter(tmp_path, lambda t: None, rehash=False)
    with pytest.raises(lora_tsd.AdapterFormatError, match="has no tensors_sha256; the adapter cannot be verified"):
        lora_tsd.load_adapter(MODEL_FACTORIES["llama"](), folder)


def test_a_non_finite_adapter_is_never_written(tmp_path):
    """Issue 18: a NaN adapter was written as a finished run; save_adapter refuses it and writes nothing."""
    model = build("llama", "dash", 1)
    layer = lora_tsd.adapted_layers(model)[0][1]
    with torch.no_grad():
        layer.lora_B.fill_(float("nan"))
    message = r"lora_B holds NaN or infinite values .*; the adapter was not saved"
    with pytest.raises(lora_tsd.NonFiniteError, match=message):
        lora_tsd.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
