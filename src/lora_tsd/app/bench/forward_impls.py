"""Candidate forward implementations of the adapter layer (``--only impl``, not run by default): the current
forward (``torch.addmm``; with a dash term the fused autograd node of :mod:`lora_tsd.fused`), the same without
the fused node (``unfused``), the previous two-step forward and an in-place ``addmm_``, compared in a training
step of lora and dash layers (time, peak memory, output difference). The GPU bench compares the same candidates."""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from lora_tsd.inject import adapted_layers
from lora_tsd.layer import TSDLinear

from .layer_cases import tsd_one_layer
from .report import Report, mib
from .settings import Settings
from .steps import compare_steps, layer_step


class _CandidateTSDLinear(TSDLinear):
    """What every candidate forward shares: the base output, then the adapter's update added by :meth:`add_update`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._merged:
            return result
        B, A = self.factors()
        return self.add_update(result, self.dropout(x.to(A.dtype)), B, A)

    def add_update(self, result: torch.Tensor, h: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``result (…, out)`` plus ``B' (A' h)`` for the dropped-out input ``h (…, in)``."""
        raise NotImplementedError


class TwoStepTSDLinear(_CandidateTSDLinear):
    """The previous ``TSDLinear`` forward, kept for comparison: ``result + B' (A' drop(x))``.

    The current forward accumulates with ``torch.addmm(result, A' drop(x), B'ᵀ)`` instead: one ``(tokens, out)``
    temporary and one elementwise pass fewer, where the base output and the adapter share a dtype (fp32
    models) and autocast is off.
    """

    def add_update(self, result: torch.Tensor, h: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return result + torch.nn.functional.linear(torch.nn.functional.linear(h, A), B).to(result.dtype)


class InplaceAddmmTSDLinear(_CandidateTSDLinear):
    """Candidate forward: as the current ``torch.addmm`` forward but accumulating into the base output in place.

    No ``(tokens, out)`` temporary at all. Valid because ``nn.Linear`` / ``Conv1D`` do not save their output
    for backward; a base layer that did would make autograd raise at backward (never a silent error).
    """

    def add_update(self, result: torch.Tensor, h: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.linear(h, A)
        if result.dtype == A.dtype and not torch.is_autocast_enabled(h.device.type) and result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), B.T)
            return result
        return result + torch.nn.functional.linear(z, B).to(result.dtype)


class UnfusedTSDLinear(TSDLinear):
    """The current forward without the fused autograd node: the update traced op by op by autograd (a lora layer,
    which has no dash term to fuse, runs the same forward as the current one)."""

    fused = False


IMPLS: dict[str, type[TSDLinear]] = {"current": TSDLinear, "unfused": UnfusedTSDLinear, "two-step": TwoStepTSDLinear,
                                     "addmm_": InplaceAddmmTSDLinear}


def with_impl(model: nn.Module, impl: str) -> nn.Module:
    """Swap the forward of every adapter of ``model`` to the candidate ``impl`` (state untouched)."""
    for _, layer in adapted_layers(model):
        layer.__class__ = IMPLS[impl]
    return model


def run_impl(st: Settings) -> str:
    """Forward implementations (current / unfused / previous two-step / in-place addmm) for lora and dash, per layer."""
    lines = [f"Candidate adapter forwards (training step, {st.tokens} tokens, fp32; median s, peak MiB = static "
             "+ step, torch allocator; max |Δy| vs the current forward)", "",
             "| layer | method | impl | median s | min s | peak MiB | time / current | peak / current | max |Δy| |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, m in st.layer_shapes:
        gen = torch.Generator().manual_seed(n + m)
        x = torch.randn(st.tokens, m, generator=gen).requires_grad_(st.input_grad)
        g = torch.randn(st.tokens, n, generator=gen)
        cases, ref_out = [], {}
        for method in ("lora", "dash"):
            g_state = gen.get_state()
            for impl in IMPLS:
                gen.set_state(g_state)  # same weights and adapters for every impl of a method
                torch.manual_seed(n * 31 + m)  # nn.Linear's own initialization draws from the global generator
                model = with_impl(tsd_one_layer(n, m, method, st, gen), impl)
                with torch.no_grad():
                    y = model(x.detach())
                if impl == "current":
                    ref_out[method] = y
                diff = float((y - ref_out[method]).abs().max())
                cases.append((method, impl, diff, layer_step(f"{method}/{impl}", model, x, g, tsd=True)))
                del y
        res = compare_steps(Report(st), f"impl {n}×{m}", [c for *_, c in cases], st)
        for method, impl, diff, case in cases:
            r, c = res[case.name], res[f"{method}/current"]
            lines.append(f"| {n}×{m} | {method} | {impl} | {r.median:.4f} | {min(r.seconds):.4f} | {mib(r.peak)} | "
                         f"{r.median / c.median:.3f} | {(r.peak or 0) / (c.peak or 1):.3f} | {diff:.2e} |")
        del cases, res
        gc.collect()
    return "\n".join(lines)
