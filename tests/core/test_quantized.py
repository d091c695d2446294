"""Adapters on bitsandbytes-quantized bases (nf4 / fp4 / int8 on the CPU): every method trains with finite
outputs, attach and the switch keep the outputs, the stock-PEFT export on the same quantized base matches the
library model, and the merged model is dense. Needs bitsandbytes (the dev extra) and transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, VOCAB, logits, make_optimizer, tiny_llama, token_batch

import lora_tsd
from lora_tsd.quantized import dequantized_weight, is_quantized, keep_trainable_layout, quantization_kind, requantize

bnb = pytest.importorskip("bitsandbytes")  # listed in the dev extra; CI installs it
from peft import PeftModel  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

QUANT = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
         "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
         "int8": dict(load_in_8bit=True)}


def tiny_llama_128() -> torch.nn.Module:
    """conftest's tiny Llama with an MLP of 128: bitsandbytes' CPU 4-bit kernel needs every in-feature count to
    be a multiple of its block size (64)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama().config.__class__(**{**tiny_llama().config.to_dict(),
                                                             "intermediate_size": 128})).eval()


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_128().save_pretrained(path)
    return str(path)


def quantized_llama(path: str, kind: str = "nf4") -> torch.nn.Module:
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT[kind]),
                                             dtype=torch.float32, device_map="cpu")
    for module in model.modules():  # the same (differentiable) kernel on every CPU, adapted or not
        keep_trainable_layout(module)
    return model.eval()


def config(method: str, **extra) -> lora_tsd.TSDConfig:
    base = dict(method=method, r=4, dash_directions=2, target_modules=TARGETS["llama"])
    if method in ("dash",) or extra.pop("prelaunch", False):
        base["prelaunch_steps"] = 2
    return lora_tsd.TSDConfig(**{**base, **extra})


def train(model: torch.nn.Module, steps: int = 4) -> None:
    adapters = lora_tsd.adapted_layers(model)
    opt = make_optimizer(model)
    if adapters[0][1].config.switches_on_probe:
        lora_tsd.gradient_probe(model, [token_batch(s) for s in range(2)], lambda m, ids: m(ids, labels=ids).loss,
                                opt, group_size=2)
    for s in range(steps):
        model.train()
        ids = token_batch(10 + s)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lora_tsd.step(model, opt)


def test_the_quantized_layers_are_recognised_and_dequantized(saved_llama):
    dense = tiny_llama_128()
    for kind, tol in (("nf4", 0.15), ("fp4", 0.2), ("int8", 0.02)):
        model = quantized_llama(saved_llama, kind)
        q = model.model.layers[0].self_attn.q_proj
        assert is_quantized(q) and quantization_kind(q) == kind
        assert not is_quantized(dense.model.layers[0].self_attn.q_proj)
        w, ref = dequantized_weight(q), dense.model.layers[0].self_attn.q_proj.weight
        assert w.shape == ref.shape and w.dtype == torch.float32
        assert 0 < float((w - ref.detach()).norm() / ref.detach().norm()) < tol
        # The layer computes with that weight (bitsandbytes' CPU kernels round the input to bf16 / fp16).
        x = torch.randn(3, ref.shape[1])
        assert torch.allclose(q(x).float(), x @ w.T, atol=5e-3 if kind != "int8" else 2e-2)


def test_requantize_stores_a_new_weight_and_reports_its_error(saved_llama):
    model = quantized_llama(saved_llama, "nf4")
    q = model.model.layers[0].mlp.up_proj
    target = dequantized_weight(q) + 0.01 * torch.randn(q.out_features, q.in_features)
    err = requantize(q, target)
    assert quantization_kind(q) == "nf4" and 0 < err < 0.15
    assert abs(float((dequantized_weight(q) - target).norm() / target.norm()) - err) < 1e-6


@pytest.mark.parametrize("method, extra", [("lora", {}), ("dash", {}), ("init", {}), ("tsd", {}),
                                           ("tsd", {"prelaunch": True}), ("init", {"prelaunch": True}),
                                           ("pissa", {}), ("milora", {}),
                                           ("tsd", {"requantize_residual": True})])
def test_every_method_trains_on_nf4_and_its_peft_export_matches_on_the_same_base(saved_llama, tmp_path, method,
                                                                                  extra):
    model = quantized_llama(saved_llama)
    ids = token_batch(0)
    before = logits(model, ids)
    lora_tsd.attach(model, config(method, **extra))
    attached = logits(model, ids)
    if extra.get("requantize_residual") or method in ("pissa", "milora"):
        # pissa/milora switch at attach: the residual is subtracted exactly, or re-quantized (its error).
        tol = 1e-4 if not extra.get("requantize_residual") else 1.0
    else:
        tol = 1e-5
    assert (attached - before).abs().max() <= tol
    train(model)
    layers = lora_tsd.adapted_layers(model)
    assert all(layer.is_switched for _, layer in layers) or method == "lora"
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert (out - before).abs().max() > 1e-4  # it trained
    if extra.get("requantize_residual"):
        errs = [layer.residual_quant_error for _, layer in layers]
        assert all(e is not None and 0 < e < 0.2 for e in errs)
        return  # the exported adapter is relative to Q(W); this base holds Q(W_res) (docs: merge/export)
    assert all(layer.residual_quant_error is None for _, layer in layers)
    lora_tsd.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(quantized_llama(saved_llama), tmp_path / "peft").eval()
    assert (logits(peft_model, ids) - out).abs().max() <= 1e-4


def test_merging_a_quantized_base_gives_a_dense_model_with_the_same_outputs(saved_llama):
    model = quantized_llama(saved_llama)
    lora_tsd.attach(model, config("tsd"))
    train(model)
    ids = token_batch(3)
    out = logits(model, ids)
    names = [name for name, _ in lora_tsd.adapted_layers(model)]
    lora_tsd.merge(model)
    for name in names:  # each adapted base is now a dense nn.Linear (the others stay quantized)
        merged = model.get_submodule(name)
        assert type(merged) is torch.nn.Linear and not is_quantized(merged)
    assert is_quantized(model.model.layers[0].self_attn.o_proj)
    assert (logits(model, ids) - out).abs().max() <= 1e-4
    assert model.lm_head.out_features == VOCAB
