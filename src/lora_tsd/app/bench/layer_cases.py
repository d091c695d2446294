"""Targets 1 and 2 per layer (``--only layers``): a training step of one LLaMA-7B-shaped linear layer with our
dash, our lora, the authors' dense dash and PEFT's LoRA, and target 4's unmerged forward overhead per layer."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn

from .measure import Measure, interleaved
from .report import Report
from .settings import Settings
from .steps import compare_steps, layer_step
from .workloads import OneLayer, attach_adapters, dense_dash_layer, peft_lora


def tsd_one_layer(n: int, m: int, method: str, st: Settings, gen: torch.Generator) -> nn.Module:
    """:class:`OneLayer` ``(n, m)`` with our adapter; ``dash`` is in its dash phase with random directions."""
    return attach_adapters(OneLayer(n, m), method, ["proj"], st.rank, st.dash, gen)


def dense_one_layer(n: int, m: int, st: Settings, gen: torch.Generator) -> nn.Module:
    """An ``(n, m)`` layer with the authors' dense-dash adapter (rank and dash size of ``st``)."""
    return dense_dash_layer(n, m, st.rank, st.dash, gen)


def run_layers(report: Report, st: Settings, peft_ok: bool) -> None:
    """Targets 1 and 2 per layer, and target 4's layer-level forward overhead."""
    keys = [("T1.1", "T1.2", "T1.3", "T1.4", "T2.1", "T2.2", "T4.5"),
            ("T1.5", "T1.6", "T1.7", "T1.8", "T2.3", "T2.4", "T4.6")]
    for (n, m), (k_t, k_m, k_dt, k_dm, k_pt, k_pm, k_inf) in zip(st.layer_shapes, keys, strict=True):
        shape = f"{n}×{m}, {st.tokens} tok"
        gen = torch.Generator().manual_seed(n * 7 + m)
        x = torch.randn(st.tokens, m, generator=gen).requires_grad_(st.input_grad)
        g = torch.randn(st.tokens, n, generator=gen)
        steps = [
            layer_step("lora", tsd_one_layer(n, m, "lora", st, gen), x, g, tsd=True),
            layer_step("dash", tsd_one_layer(n, m, "dash", st, gen), x, g, tsd=True),
            layer_step("dense-dash", dense_one_layer(n, m, st, gen), x, g, tsd=False),
        ]
        if peft_ok:
            steps.append(layer_step("peft-lora", peft_lora(OneLayer(n, m), ["proj"], st.rank, gen), x, g, tsd=False))
        # The dense pattern is 2-3× slower and only needs to show that it is: fewer repetitions.
        res = compare_steps(report, f"layer step {n}×{m}", steps, st, fewer={"dense-dash": 3})
        report.ratio(k_t, res["dash"], res["lora"], shape)
        report.ratio(k_m, res["dash"], res["lora"], shape, memory=True)
        report.ratio(k_dt, res["dense-dash"], res["lora"], shape)
        report.ratio(k_dm, res["dense-dash"], res["lora"], shape, memory=True)
        if peft_ok:
            report.ratio(k_pt, res["lora"], res["peft-lora"], shape)
            report.ratio(k_pm, res["lora"], res["peft-lora"], shape, memory=True)
        else:
            report.skip([k_pt, k_pm], "peft not installed")
        # Target 4 at layer level: inference forward of the unmerged dash layer vs the plain base layer.
        dash_model = steps[1].model
        base = dash_model.proj.base_layer
        x_inf = x.detach()

        def fwd(mod: nn.Module, inp: torch.Tensor = x_inf) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    mod(inp)
            return run

        times = interleaved({"base": fwd(base), "dash (unmerged)": fwd(dash_model)}, min(st.reps, 3), st.warmup)
        mb = Measure("base linear forward", times["base"])
        md = Measure("dash unmerged forward", times["dash (unmerged)"])
        report.add(f"layer forward {n}×{m}", mb, md)
        report.ratio(k_inf, md, mb, shape)
        del steps, res, dash_model, base
        gc.collect()
