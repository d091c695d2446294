"""LoRA-Init's gradient estimator (method.md §4): rank the directions by the full-weight gradient of a few
batches, then switch, before the first optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, NonFiniteError
from .inject import require_adapters
from .sharding import rank_and_world
from .switching import apply_selections, intra_op_threads, require_unmerged, select_for_layer, switch, switch_workers


def gradient_probe(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    group_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA-Init's gradient estimator (method.md §4): rank by the accumulated full-weight gradient, switch.

    Runs forward/backward on ``batches`` (no optimizer step, no parameter changes), accumulating for every
    adapted layer ``G = Σ gᵀ x`` ``(out, in)`` from the layer's input ``x`` and output gradient ``g``, then
    switches with the change rates ``|u_iᵀ G v_i| / (σ_i + ε)``.

    Args:
        batches: any iterable; each item is passed to ``loss_fn(model, batch)``, which returns a scalar loss.
        group_size: accumulate ``G`` for this many layers at a time, replaying ``batches`` once per group
            and keeping only each group's selected directions, so the probe's peak memory holds one group's
            fp32 gradients instead of every adapted weight's (about the model's size in fp32). Every layer's
            ``G`` is the same sum in the same order as with all layers at once, so the selected directions
            are exactly the same (the random generators are rewound for each replay, so dropout draws the same
            masks); the cost is one pass over ``batches`` per group. ``None``: one group.

    Returns:
        The accumulated gradients per layer name with ``group_size=None``; ``{}`` with groups (they are freed
        group by group, which is the point).
    """
    adapters = require_adapters(model, "gradient_probe")
    config = adapters.config
    if not config.spec.has_init or config.selector != "tsd":
        raise ConfigError("gradient_probe ranks TSDs for init-style methods with selector 'tsd'")
    require_unmerged(adapters, "gradient_probe")
    layers = adapters.layers
    if group_size is None:
        grads = _accumulate(model, layers, batches, loss_fn)
        switch(model, optimizer, estimates=grads)
        return grads
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer or None, got {group_size!r}")
    batches = list(batches)  # replayed once per group
    world = rank_and_world()[1]
    workers = switch_workers(adapters.first)
    selections = []
    rng = _rng_state()
    for start in range(0, len(layers), group_size):
        group = layers[start:start + group_size]
        _set_rng_state(rng)  # each replay draws the first pass's dropout masks; the last leaves the RNG as one pass
        grads = _accumulate(model, group, batches, loss_fn)
        # The switch's thread layout (workers × threads each), so the SVDs' last bits are the full probe's too.
        with intra_op_threads(max(1, torch.get_num_threads() // workers)), \
                ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(select_for_layer, name, layer, start + j, grads[name])
                    for j, (name, layer) in enumerate(group)]
            group_selections = [job.result() for job in jobs]
        del grads
        for ranked, indices in group_selections:
            if world > 1:  # every rank selects from the same all-reduced G; rank 0's choice is authoritative
                for t in (*ranked, indices):
                    torch.distributed.broadcast(t, src=0)
            selections.append((ranked, indices))
    apply_selections(adapters, selections, optimizer)
    return {}


def _accumulate(model: nn.Module, layers: tuple[tuple[str, Any], ...] | list, batches: Iterable[Any],
                loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``G = Σ gᵀ x`` ``(out, in)`` fp32 for each of ``layers`` over ``batches`` (all-reduced over ranks)."""
    grads = {name: torch.zeros(layer.out_features, layer.in_features, device=layer.lora_A.device)
             for name, layer in layers}
    handles = [layer.register_forward_hook(_gradient_hook(grads[name])) for name, layer in layers]
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


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The CPU generator's state and, when CUDA is initialized, every CUDA device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
