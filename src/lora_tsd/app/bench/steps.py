"""One training step of a benchmarked model (forward, backward, AdamW, ``lora_tsd.step``), and the CPU comparison
of several such steps: interleaved timing, then each one's peak memory.

:class:`TrainStep`, :func:`layer_step` and :func:`model_step` import only torch and the core :mod:`lora_tsd`
(the GPU bench script uses them too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lora_tsd.switching import step as count_optimizer_step

from .measure import Measure, interleaved, measure_memory, static_bytes
from .report import Report, log
from .settings import Settings


class TrainStep:
    """One training step of ``model``: ``forward()`` → backward → AdamW step (→ :func:`lora_tsd.step`).

    Args:
        name: the variant's name in the tables.
        model: its trainable parameters get an AdamW optimizer (lr 1e-4).
        forward: computes the output to back-propagate: a scalar loss, or an output whose gradient is ``grad``.
        grad: the output gradient (as from the layers above a single layer); ``None`` for a scalar loss.
        tsd: also count the optimizer step for our adapters (``lora_tsd.step``; a no-op phase-wise here).
        inputs: the tensors (or dicts of tensors) the step reads, counted in :meth:`static_bytes`.
        autocast: a device type (``"cuda"``, ``"cpu"``) to run the forward under bf16 autocast there.
    """

    def __init__(self, name: str, model: nn.Module, forward: Callable[[], torch.Tensor], grad: torch.Tensor | None,
                 tsd: bool, inputs: Sequence[Any], autocast: str | None = None) -> None:
        self.name, self.model, self.forward, self.grad, self.tsd = name, model, forward, grad, tsd
        self.inputs, self.autocast = list(inputs), autocast
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self) -> None:
        ctx = (torch.autocast(self.autocast, dtype=torch.bfloat16) if self.autocast is not None
               else contextlib.nullcontext())
        with ctx:
            out = self.forward()
        if self.grad is None:
            out.backward()
        else:
            out.backward(self.grad)
        self.optimizer.step()
        if self.tsd:
            count_optimizer_step(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def static_bytes(self) -> int:
        """Bytes alive before the step: parameters, buffers, gradients, optimizer state, inputs."""
        return static_bytes(self.model, self.optimizer, self.inputs)


def layer_step(name: str, model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, tsd: bool,
               autocast: str | None = None) -> TrainStep:
    """Forward of ``x (tokens, in)``, backward of a given ``grad_out (tokens, out)``, AdamW step."""
    return TrainStep(name, model, lambda: model(x), grad_out, tsd, [x, grad_out], autocast)


def model_step(name: str, model: nn.Module, batch: dict[str, torch.Tensor], tsd: bool,
               autocast: str | None = None) -> TrainStep:
    """A whole model in training mode: forward of ``batch`` (with labels), backward of its loss, AdamW step."""
    model.train()
    return TrainStep(name, model, lambda: model(**batch).loss, None, tsd, [batch], autocast)


def compare_steps(report: Report, group: str, steps: list[TrainStep], st: Settings, memory: bool = True,
                  fewer: dict[str, int] | None = None) -> dict[str, Measure]:
    """Time the steps interleaved, then measure each one's peak memory; returns the measurements by name.

    With ``memory`` the measurements are also added to ``report`` under ``group``.
    """
    log(f"{group}: timing {', '.join(s.name for s in steps)} ({st.reps} reps)")
    times = interleaved({s.name: s for s in steps}, st.reps, st.warmup, fewer)
    out = {s.name: Measure(s.name, times[s.name]) for s in steps}
    if memory:
        for s in steps:
            measure_memory(out[s.name], s, s.static_bytes())
        report.add(group, *out.values())
    return out
