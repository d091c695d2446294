"""LoRA-Init's gradient estimator (method.md §4): rank the directions by the full-weight gradient of a few
batches, then switch, before the first optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, NonFiniteError
from .inject import require_adapters
from .sharding import rank_and_world
from .switching import require_unmerged, switch


def gradient_probe(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA-Init's gradient estimator (method.md §4): rank by the accumulated full-weight gradient, switch.

    Runs forward/backward on ``batches`` (no optimizer step, no parameter changes), accumulating for every
    adapted layer ``G = Σ gᵀ x`` ``(out, in)`` from the layer's input ``x`` and output gradient ``g``, then
    switches with the change rates ``|u_iᵀ G v_i| / (σ_i + ε)``. Returns the accumulated gradients.

    Args:
        batches: any iterable; each item is passed to ``loss_fn(model, batch)``, which returns a scalar loss.
    """
    adapters = require_adapters(model, "gradient_probe")
    config = adapters.config
    if not config.spec.has_init or config.selector != "tsd":
        raise ConfigError("gradient_probe ranks TSDs for init-style methods with selector 'tsd'")
    require_unmerged(adapters, "gradient_probe")
    layers = adapters.layers
    grads = {name: torch.zeros(layer.out_features, layer.in_features, device=layer.lora_A.device)
             for name, layer in layers}
    handles = []
    for name, layer in layers:
        handles.append(layer.register_forward_hook(_gradient_hook(grads[name])))
    n_batches = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss {float(loss)} in gradient probe batch {n_batches}")
            loss.backward()
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    if n_batches == 0:
        raise ConfigError("gradient_probe got no batches")
    if rank_and_world()[1] > 1:  # every rank probed its own data: rank by the gradient of all of it
        for g in grads.values():
            torch.distributed.all_reduce(g)
    switch(model, optimizer, estimates=grads)
    return grads


def _gradient_hook(accumulator: torch.Tensor) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        x = inputs[0].detach()

        def on_grad(g: torch.Tensor) -> None:
            accumulator.add_(g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float())

        output.register_hook(on_grad)

    return hook
