"""lora-tsd train on a quantized base (--quantize), compiled (--compile) and with gradient checkpointing
(--gradient-checkpointing), on tiny models on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import choice_rows, make_decoder, write_jsonl

from lora_tsd.app.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel-assets")
    return {"decoder": make_decoder(root / "tiny-llama-64", hidden_size=64, intermediate_size=128),
            "mc": write_jsonl(root / "colors.jsonl", choice_rows(80))}


def train(tmp_path, assets, name, *extra):
    out = tmp_path / name
    code = main(["train", "--model", str(assets["decoder"]), "--task", f"jsonl:{assets['mc']}", "--output-dir",
                 str(out), "--no-progress", "--eval-batch-size", "16", "--batch-size", "8", "--steps", "4",
                 "--warmup-steps", "1", "--r", "4", "--dash-directions", "2", "--probe-batches", "2",
                 "--max-eval", "16", "--dropout", "0", "--no-best-checkpoint", *extra])
    assert code == 0
    return out


def adapter(out):
    return load_file(str(out / "adapter" / "tsd_adapter.safetensors"))


@pytest.mark.parametrize("method, extra", [("dash", ["--prelaunch-steps", "2"]), ("init", []), ("tsd", []),
                                           ("tsd", ["--init-estimator", "prelaunch", "--prelaunch-steps", "2"]),
                                           ("pissa", []), ("milora", [])])
def test_train_on_an_nf4_base(tmp_path, assets, method, extra):
    pytest.importorskip("bitsandbytes")
    out = train(tmp_path, assets, method, "--method", method, "--quantize", "nf4", *extra)
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["quantize"] == "nf4"
    q = s["quantization"]
    assert q["kind"] == "nf4" and q["quantized_adapted_layers"] == s["model"]["adapted_layers"] > 0
    assert q["requantize_residual"] is False and q["residual_quant_error_max"] is None
    assert s["phase"] == "switched"
    tensors = adapter(out)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert all(v == v for v in s["metrics_after"]["test"].values())  # finite metrics (no NaN)


def test_requantized_residual_reports_its_error(tmp_path, assets):
    pytest.importorskip("bitsandbytes")
    out = train(tmp_path, assets, "rq", "--method", "tsd", "--quantize", "nf4", "--requantize-residual")
    q = json.loads((out / "summary.json").read_text())["quantization"]
    assert q["requantize_residual"] is True
    assert 0 < q["residual_quant_error_mean"] <= q["residual_quant_error_max"] < 0.2


@pytest.mark.parametrize("flag", ["--gradient-checkpointing", "--compile"])
def test_compile_and_checkpointing_match_eager_training(tmp_path, assets, flag):
    eager = adapter(train(tmp_path, assets, "eager", "--method", "tsd"))
    other = adapter(train(tmp_path, assets, flag.strip("-"), "--method", "tsd", flag))
    assert eager.keys() == other.keys()
    for k in eager:
        assert torch.allclose(eager[k].float(), other[k].float(), rtol=0, atol=1e-5), k
    assert any((eager[k].float() != 0).any() for k in eager if "lora_B" in k)  # it trained


def test_a_bad_quantize_value_is_a_clear_error(tmp_path, assets, capsys):
    code = main(["train", "--model", str(assets["decoder"]), "--task", f"jsonl:{assets['mc']}", "--output-dir",
                 str(tmp_path / "bad"), "--quantize", "int4"])
    assert code != 0
    assert "quantize must be one of nf4, fp4, int8, got 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
