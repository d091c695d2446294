"""bf16 / fp16 base weights: the SVD runs in fp32; attach, switch and merge work; outputs stay finite."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, TARGETS, token_batch

import lora_tsd
from lora_tsd import directions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["dash", "tsd", "pissa"])
def test_half_precision_base(model_kind, dtype, method, monkeypatch):
    seen = []
    real_svd = directions.thin_svd

    def spy(weight):
        out = real_svd(weight)
        seen.append((weight.dtype, out.U.dtype, out.S.dtype, out.Vh.dtype))
        return out

    monkeypatch.setattr("lora_tsd.svd_cache.thin_svd", spy)
    model = MODEL_FACTORIES[model_kind](dtype=dtype)
    cfg = lora_tsd.TSDConfig(method=method, r=4, dash_directions=3, target_modules=TARGETS[model_kind],
                             prelaunch_steps=2 if method != "pissa" else None)
    lora_tsd.attach(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = token_batch(0)
    model.train()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        lora_tsd.step(model, opt)
    model.eval()
    assert seen and all(w == dtype and u == s == v == torch.float32 for w, u, s, v in seen)
    for _, layer in lora_tsd.adapted_layers(model):
        assert layer.is_switched
        assert layer.weight.dtype == dtype and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        out = model(ids).logits
        assert out.dtype == dtype and torch.isfinite(out).all()
        merged = lora_tsd.merge(model)(ids).logits
    assert torch.isfinite(merged).all()
    # merged vs unmerged agree up to the half-precision rounding of the merged weights
    assert (merged.float() - out.float()).abs().max() < 0.1 * out.float().abs().max()
