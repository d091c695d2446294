"""Targets 1 and 2 on whole models (``--only models``): training steps of a MiniLM-shaped BERT (our dash and lora,
PEFT's LoRA) and a SmolLM2-shaped Llama (our lora vs PEFT's), random weights; the random-model builders.

transformers (and peft) are imported on use: the GPU bench script builds its LLaMA-7B-shaped model here too.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from .report import Report, log
from .settings import Settings
from .steps import compare_steps, model_step
from .workloads import attach_adapters, peft_lora

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def random_bert(config: dict[str, int], seed: int) -> nn.Module:
    """A randomly initialized ``BertForSequenceClassification`` (3 labels) of the given sizes."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**config, max_position_embeddings=512, num_labels=3))


def random_llama(config: dict[str, Any], seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """A randomly initialized ``LlamaForCausalLM`` with ``LlamaConfig(**config)``, built directly on ``device``.

    Initializing on the device takes seconds where a 7B-shaped layer stack takes a minute on the host.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**config, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def bert(st: Settings, seed: int) -> nn.Module:
    """The MiniLM-shaped BERT (all-MiniLM-L6-v2's sizes in ``st.minilm``)."""
    return random_bert(st.minilm, seed)


def smol(st: Settings, seed: int) -> nn.Module:
    """The SmolLM2-135M-shaped Llama (sizes in ``st.smol``; tied embeddings as the real model)."""
    return random_llama({**st.smol, "max_position_embeddings": 2048, "tie_word_embeddings": True,
                         "rms_norm_eps": 1e-5, "rope_theta": 100000.0}, seed)


def bert_batch(st: Settings, vocab: int) -> dict[str, torch.Tensor]:
    """A random classification batch of ``st.minilm_batch`` (batch, sequence) tokens with labels."""
    b, t = st.minilm_batch
    gen = torch.Generator().manual_seed(11)
    return {"input_ids": torch.randint(5, vocab, (b, t), generator=gen),
            "attention_mask": torch.ones(b, t, dtype=torch.int64),
            "labels": torch.randint(0, 3, (b,), generator=gen)}


def smol_batch(st: Settings, vocab: int) -> dict[str, torch.Tensor]:
    """A random language-modelling batch of ``st.smol_batch`` (batch, sequence) tokens."""
    b, t = st.smol_batch
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(3, vocab, (b, t), generator=gen)
    return {"input_ids": ids, "labels": ids}


def ours(model: nn.Module, method: str, targets: list[str], st: Settings, gen: torch.Generator) -> nn.Module:
    """Our adapters on ``targets``; ``dash`` goes through the real switch (SVD of every target)."""
    return attach_adapters(model, method, targets, st.rank, st.dash, gen, dash_phase="switch")


def run_models(report: Report, st: Settings, peft_ok: bool, hf_ok: bool) -> None:
    """Whole-model training steps: MiniLM dash vs lora vs PEFT; SmolLM2 ours vs PEFT."""
    if not hf_ok:
        report.skip(["T1.9", "T1.10", "T2.5", "T2.6", "T2.7", "T2.8"], "transformers not installed")
        return
    gen = torch.Generator().manual_seed(5)
    b, t = st.minilm_batch
    case = f"{st.minilm['num_hidden_layers']} layers, {b}×{t} tok"
    batch = bert_batch(st, st.minilm["vocab_size"])
    steps = [model_step("lora", ours(bert(st, 0), "lora", BERT_TARGETS, st, gen), batch, True),
             model_step("dash", ours(bert(st, 0), "dash", BERT_TARGETS, st, gen), batch, True)]
    if peft_ok:
        steps.append(model_step("peft-lora", peft_lora(bert(st, 0), BERT_TARGETS, st.rank, gen), batch, False))
    res = compare_steps(report, "MiniLM step", steps, st)
    report.ratio("T1.9", res["dash"], res["lora"], case)
    report.ratio("T1.10", res["dash"], res["lora"], case, memory=True)
    if peft_ok:
        report.ratio("T2.5", res["lora"], res["peft-lora"], case)
        report.ratio("T2.6", res["lora"], res["peft-lora"], case, memory=True)
    else:
        report.skip(["T2.5", "T2.6"], "peft not installed")
    del steps, res
    gc.collect()

    if not peft_ok:
        report.skip(["T2.7", "T2.8"], "peft not installed")
        return
    b, t = st.smol_batch
    case = f"{st.smol['num_hidden_layers']} layers, {b}×{t} tok"
    batch = smol_batch(st, st.smol["vocab_size"])
    log("SmolLM2: building two random models")
    steps = [model_step("lora", ours(smol(st, 0), "lora", LLAMA_TARGETS, st, gen), batch, True),
             model_step("peft-lora", peft_lora(smol(st, 0), LLAMA_TARGETS, st.rank, gen), batch, False)]
    res = compare_steps(report, "SmolLM2 step", steps, st)
    report.ratio("T2.7", res["lora"], res["peft-lora"], case)
    report.ratio("T2.8", res["lora"], res["peft-lora"], case, memory=True)
    del steps, res
    gc.collect()
