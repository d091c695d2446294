"""Target 4 on the whole MiniLM-shaped model (``--only inference``): the merged model against the base model
(same modules and shapes, same forward time) and the unmerged dash and lora forwards' overhead."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from lora_tsd.merge import merge

from .measure import Measure, interleaved
from .model_cases import BERT_TARGETS, bert, bert_batch, ours
from .report import Report, log
from .settings import Settings


def same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models have the same module names and types and the same parameter names, shapes and dtypes."""
    ta = [(n, type(m).__name__) for n, m in a.named_modules()]
    tb = [(n, type(m).__name__) for n, m in b.named_modules()]
    pa = [(n, tuple(p.shape), p.dtype) for n, p in a.named_parameters()]
    pb = [(n, tuple(p.shape), p.dtype) for n, p in b.named_parameters()]
    return ta == tb and pa == pb


def run_inference(report: Report, st: Settings, hf_ok: bool) -> None:
    """Target 4 on the whole MiniLM: merged vs base, unmerged dash and lora vs base (inference forward)."""
    if not hf_ok:
        report.skip(["T4.1", "T4.2", "T4.3", "T4.4"], "transformers not installed")
        return
    gen = torch.Generator().manual_seed(9)
    base = bert(st, 0).eval()
    dash = ours(copy.deepcopy(base), "dash", BERT_TARGETS, st, gen).eval()
    lora = ours(copy.deepcopy(base), "lora", BERT_TARGETS, st, gen).eval()
    merged = merge(ours(copy.deepcopy(base), "dash", BERT_TARGETS, st, gen)).eval()
    batch = {k: v for k, v in bert_batch(st, st.minilm["vocab_size"]).items() if k != "labels"}

    def fwd(mod: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                mod(**batch)
        return run

    b, t = st.minilm_batch
    case = f"{st.minilm['num_hidden_layers']} layers, {b}×{t} tok"
    log("inference: MiniLM base / merged / unmerged dash / unmerged lora")
    times = interleaved({"base": fwd(base), "merged dash": fwd(merged), "unmerged dash": fwd(dash),
                         "unmerged lora": fwd(lora)}, max(st.reps, 7), st.warmup + 1)
    ms = {k: Measure(f"{k} forward", v) for k, v in times.items()}
    report.add("MiniLM forward", *ms.values())
    report.ratio("T4.1", ms["merged dash"], ms["base"], case)
    report.value("T4.2", float(same_structure(base, merged)), case)
    report.ratio("T4.3", ms["unmerged dash"], ms["base"], case)
    report.ratio("T4.4", ms["unmerged lora"], ms["base"], case)
