"""Merge ≡ unmerged adapter; unmerge restores; the PEFT export loads in stock peft with the documented ranks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import METHODS, MODEL_FACTORIES, logits, token_batch, trained_tiny
from peft import PeftModel

import lora_tsd

EXPORT_RANK = {"lora": 4, "dash": 4 + 3, "init": 2 * 4, "pissa": 2 * 4, "milora": 2 * 4, "tsd": 2 * 4 + 3}


def trained_model(kind: str, method: str, steps: int = 5):
    """A tiny model trained past its switch (t = 2), so A, B, c and the residual are all non-trivial."""
    return trained_tiny(kind, method, steps, prelaunch_steps=2 if method in ("dash", "init", "tsd") else None)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_unmerge_restores(model_kind, method):
    model = trained_model(model_kind, method)
    ids = token_batch(7)
    adapted = logits(model, ids)
    weights = {n: layer.weight.detach().clone() for n, layer in lora_tsd.adapted_layers(model)}
    lora_tsd.merge_in_place(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    lora_tsd.unmerge(model)
    for name, layer in lora_tsd.adapted_layers(model):
        assert (layer.weight - weights[name]).abs().max() <= 1e-6
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    plain = lora_tsd.merge(model)
    assert not lora_tsd.adapted_layers(plain)
    assert (logits(plain, ids) - adapted).abs().max() <= 1e-5


def test_merged_state_round_trips_through_state_dict(model_kind):
    model = trained_model(model_kind, "dash")
    ids = token_batch(3)
    lora_tsd.merge_in_place(model)
    merged = logits(model, ids)
    clone = trained_model(model_kind, "dash", steps=0)
    clone.load_state_dict(model.state_dict())
    assert all(layer._merged for _, layer in lora_tsd.adapted_layers(clone))
    assert torch.equal(logits(clone, ids), merged)


@pytest.mark.parametrize("method", METHODS)
def test_export_peft_loads_in_stock_peft(tmp_path, model_kind, method):
    model = trained_model(model_kind, method)
    ids = token_batch(11)
    expected = logits(model, ids)
    lora_tsd.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == EXPORT_RANK[method]
    fresh_base = MODEL_FACTORIES[model_kind]()  # the original pretrained weights
    peft_model = PeftModel.from_pretrained(fresh_base, tmp_path / "peft").eval()
    assert (logits(peft_model, ids) - expected).abs().max() <= 1e-5
    # and PEFT's own merge agrees as well
    merged = peft_model.merge_and_unload()
    assert (logits(merged, ids) - expected).abs().max() <= 1e-5


def test_merge_requires_adapters():
    with pytest.raises(lora_tsd.ConfigError, match="attach"):
        lora_tsd.merge(MODEL_FACTORIES["llama"]())
