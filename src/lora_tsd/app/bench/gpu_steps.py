"""The GPU bench's training-step sections (``bench/gpu_bench.py``): one LLaMA-7B-shaped layer (dash, lora, the
authors' dense dash, PEFT's LoRA), the candidate adapter forwards, and whole LLaMA-7B-shaped models; the results
those sections and :mod:`.gpu_svd`'s collect.

Each section takes the script's parsed options (``args``: ``shapes``, ``tokens``, ``rank``, ``dash``, ``reps``,
``warmup``, ``llama``, ``llama_layers``, ``model_batch``, ``model_reps``) and a precision ``mode``:
``autocast`` (fp32 weights, the step under bf16 autocast) or ``bf16`` (bf16 base weights, fp32 adapters).
Imports only torch and the core :mod:`lora_tsd` (transformers and peft on use).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .forward_impls import IMPLS, with_impl
from .measure import Clock, MiB, cuda_peak_extra, interleaved
from .model_cases import LLAMA_TARGETS, random_llama
from .steps import TrainStep, layer_step, model_step
from .workloads import OneLayer, attach_adapters, dense_dash_layer, free_memory, peft_lora


class GpuResults:
    """Every row, error and fact of one GPU bench run, as written to its JSON file."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.info: dict[str, Any] = {}
        self.wall_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"rows", "errors", "info"}`` and, once the run is over, ``"wall_s"``."""
        out: dict[str, Any] = {"rows": self.rows, "errors": self.errors, "info": self.info}
        if self.wall_s is not None:
            out["wall_s"] = self.wall_s
        return out

    def write(self, path: Path) -> None:
        """The results so far as JSON at ``path`` (rewritten after every section: a crash keeps what ran)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1, default=str) + "\n")

    def print_section(self, title: str) -> None:
        """Print the rows of section ``title``: one line a variant (times, peak), one line a ratio."""
        for row in self.rows:
            if row["section"] != title:
                continue
            if "variant" in row:
                peak = "" if row["peak_MiB"] is None else f"{row['peak_MiB']:.0f} MiB"
                print(f"  {title:<38} {row['variant']:<16} {row['median_ms']:9.3f} ms (min {row['min_ms']:.3f}) "
                      f"{peak}")
            else:
                mem = f", memory {row['memory']:.3f}" if "memory" in row else ""
                print(f"  {title:<38} {row['ratio']:<28} time {row['time']:.3f}{mem}  (target {row['target']})")
        sys.stdout.flush()

    def print_summary(self) -> None:
        """The closing table: every ratio row, every switch row, then the errors as notes."""
        print(f"\n== summary ({self.wall_s or 0:.0f} s)")
        for row in self.rows:
            if "ratio" in row:
                mem = f"{row['memory']:.3f}" if "memory" in row else "-"
                print(f"| {row['section']} | {row['ratio']} | {row['time']:.3f} | {mem} | {row['target']} |")
        for row in self.rows:
            if "cold_s" in row:
                print("| " + " | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                      + " |")
        for e in self.errors:
            print("note:", e)


def weight_dtype(mode: str) -> torch.dtype:
    """The base weights' dtype of a precision mode: fp32 under ``autocast``, else bf16."""
    return torch.float32 if mode == "autocast" else torch.bfloat16


def autocast_device(mode: str, device: torch.device) -> str | None:
    """The device type to run the forward under bf16 autocast on (``autocast`` mode), else ``None``."""
    return device.type if mode == "autocast" else None


def layer_inputs(args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> Iterator[tuple[int, int, int, torch.Generator, torch.Tensor, torch.Tensor]]:
    """Each ``(out, in)`` shape × token count of the layer sections: ``(n, m, tokens, gen, x, g)``.

    ``x (tokens, m)`` is the input and ``g (tokens, n)`` the output gradient, in ``dtype`` on ``device``; ``gen``
    (seeded per case) goes on to draw the adapters.
    """
    for n, m in args.shapes:
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(n + m + tokens)
            x = torch.randn(tokens, m, generator=gen).to(device, dtype)
            g = torch.randn(tokens, n, generator=gen).to(device, dtype)
            yield n, m, tokens, gen, x, g


def compare(results: GpuResults, title: str, steps: list[TrainStep], clock: Clock, device: torch.device, reps: int,
            warmup: int, pairs: list[tuple[str, str, str, str]]) -> None:
    """Time ``steps`` interleaved, measure their peak memory, record the ratio rows named in ``pairs``.

    ``pairs`` holds ``(row name, numerator step, denominator step, target text)``; a pair whose steps did not run
    (PEFT missing) is left out.
    """
    by_name = {s.name: s for s in steps}
    times = interleaved(by_name, reps, warmup, clock=clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem: dict[str, int | None] = {}
    for k, s in by_name.items():
        extra = cuda_peak_extra(device, s)
        mem[k] = None if extra is None else s.static_bytes() + extra
    for k in by_name:
        results.rows.append({"section": title, "variant": k, "median_ms": med[k] * 1e3, "min_ms": min(times[k]) * 1e3,
                             "peak_MiB": None if mem[k] is None else mem[k] / MiB})
    for key, a, b, target in pairs:
        if a in med and b in med:
            row = {"section": title, "ratio": key, "time": med[a] / med[b], "target": target}
            if mem[a] and mem[b]:
                row["memory"] = mem[a] / mem[b]
            results.rows.append(row)
    results.print_section(title)


def layer_section(results: GpuResults, args: argparse.Namespace, device: torch.device, clock: Clock, mode: str,
                  peft_ok: bool) -> None:
    """Targets 1 and 2 per layer: dash (fused update, the default), dash with the unfused update, lora, dense dash and
    PEFT's LoRA, each shape and token count (in both modes: under ``autocast`` the fused node replays autocast's
    dtypes)."""
    wdtype, autocast = weight_dtype(mode), autocast_device(mode, device)
    for n, m, tokens, gen, x, g in layer_inputs(args, device, wdtype):
        def one(method: str, n: int = n, m: int = m, gen: torch.Generator = gen) -> torch.nn.Module:
            return attach_adapters(OneLayer(n, m).to(device, wdtype), method, ["proj"], args.rank, args.dash, gen)

        steps = [layer_step("lora", one("lora"), x, g, True, autocast),
                 layer_step("dash", one("dash"), x, g, True, autocast),
                 layer_step("dash-unfused", with_impl(one("dash"), "unfused"), x, g, True, autocast),
                 layer_step("dense-dash", dense_dash_layer(n, m, args.rank, args.dash, gen, device, wdtype), x, g,
                            False, autocast)]
        if peft_ok:
            peft = peft_lora(OneLayer(n, m).to(device, wdtype), ["proj"], args.rank, gen)
            steps.append(layer_step("peft-lora", peft, x, g, False, autocast))
        compare(results, f"{mode} layer {n}x{m} {tokens}tok", steps, clock, device, args.reps, args.warmup,
                [("T1 dash/lora", "dash", "lora", "<=1.03 time, <=1.02 mem"),
                 ("T1 dash-unfused/lora", "dash-unfused", "lora", "report (before the fused node)"),
                 ("dash fused/unfused", "dash", "dash-unfused", "report (<1: the fused node helps)"),
                 ("T1 dense-dash/lora", "dense-dash", "lora", ">>1 expected"),
                 ("T2 ours/peft lora", "lora", "peft-lora", "<=1.02")])
        del steps
        free_memory(device)


def impl_section(results: GpuResults, args: argparse.Namespace, device: torch.device, clock: Clock,
                 mode: str) -> None:
    """Candidate adapter forwards (:data:`.forward_impls.IMPLS`: current, unfused, two-step, in-place addmm), lora
    and dash."""
    wdtype, autocast = weight_dtype(mode), autocast_device(mode, device)
    for n, m, tokens, gen, x, g in layer_inputs(args, device, wdtype):
        steps: list[TrainStep] = []
        for method in ("lora", "dash"):
            for impl in IMPLS:
                gen.manual_seed(n + m)  # the same weights and adapters for every candidate
                torch.manual_seed(n + m)
                model = attach_adapters(OneLayer(n, m).to(device, wdtype), method, ["proj"], args.rank,
                                        args.dash, gen)
                steps.append(layer_step(f"{method}/{impl}", with_impl(model, impl), x, g, True, autocast))
        pairs = [(f"{meth}: {impl}/current", f"{meth}/{impl}", f"{meth}/current", "report")
                 for meth in ("lora", "dash") for impl in IMPLS if impl != "current"]
        pairs += [(f"dash/lora ({impl})", f"dash/{impl}", f"lora/{impl}", "<=1.03") for impl in IMPLS]
        compare(results, f"{mode} impl {n}x{m} {tokens}tok", steps, clock, device, args.reps, args.warmup, pairs)
        del steps
        free_memory(device)


def model_section(results: GpuResults, args: argparse.Namespace, device: torch.device, clock: Clock, mode: str,
                  peft_ok: bool) -> None:
    """Whole LLaMA-7B-shaped models (``args.llama_layers`` decoder layers): ours dash and lora, PEFT's LoRA."""
    wdtype, autocast = weight_dtype(mode), autocast_device(mode, device)
    h, inter, heads, vocab = args.llama
    config = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=args.llama_layers,
                  num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)
    gen = torch.Generator().manual_seed(1)
    b, t = args.model_batch
    ids = torch.randint(3, vocab, (b, t), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}

    def build(kind: str) -> TrainStep:
        model = random_llama(config, 0, device).to(wdtype)
        if kind == "peft-lora":
            model = peft_lora(model, LLAMA_TARGETS, args.rank, gen)
        else:
            model = attach_adapters(model, kind, LLAMA_TARGETS, args.rank, args.dash, gen)
        return model_step(kind, model, batch, kind != "peft-lora", autocast)

    steps = [build(k) for k in ["lora", "dash"] + (["peft-lora"] if peft_ok else [])]
    compare(results, f"{mode} LLaMA-7B-shaped {args.llama_layers}-layer model {b}x{t}tok", steps, clock, device,
            args.model_reps or args.reps, args.warmup,
            [("T1 dash/lora (model)", "dash", "lora", "<=1.05"),
             ("T2 ours/peft lora (model)", "lora", "peft-lora", "<=1.02")])
    del steps
    free_memory(device)
