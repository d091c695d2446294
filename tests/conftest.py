"""Shared fixtures: tiny random Hugging Face models (a Llama with nn.Linear, a GPT-2 with Conv1D)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

VOCAB = 97
METHODS = ["lora", "dash", "init", "tsd", "pissa", "milora"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# target_modules per tiny model: both attention and MLP, so that square, tall and wide layers are covered.
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def token_batch(seed: int, batch: int = 4, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def make_optimizer(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int, accumulation: int = 1) -> None:
    """One optimizer step over ``accumulation`` micro-batches (no lora_tsd.step call)."""
    model.train()
    for micro in range(accumulation):
        ids = token_batch(seed * 100 + micro)
        loss = model(ids, labels=ids).loss / accumulation
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def trained_tiny(kind: str, method: str, steps: int, prelaunch_steps: int | None) -> nn.Module:
    """A tiny model with a ``method`` adapter (r=4, s=3) after ``steps`` optimizer steps and lora_tsd.step calls."""
    import lora_tsd

    model = MODEL_FACTORIES[kind]()
    cfg = lora_tsd.TSDConfig(method=method, r=4, dash_directions=3, target_modules=TARGETS[kind],
                             prelaunch_steps=prelaunch_steps)
    lora_tsd.attach(model, cfg)
    opt = make_optimizer(model)
    for n in range(steps):
        train_step(model, opt, seed=n)
        lora_tsd.step(model, opt)
    return model


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_kind(request: pytest.FixtureRequest) -> str:
    return request.param
