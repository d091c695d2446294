"""When each method does what: the pre-launch → switch transition, counted in optimizer steps.

Call :func:`step` once after every ``optimizer.step()``. Forward calls (evaluation, ``no_grad``,
gradient-accumulation micro-batches, ``generate``) never count: the authors' code counts forward calls,
which shifts its switch whenever anything but a training step runs a forward pass.

At the switch, for every adapted layer: SVD of the current base weight in fp32, change rates of the
pre-launch update ``(α/r)·BA`` (or of a probed gradient), ranking, then the method's move: dash directions
(the coefficients' optimizer state reset) and/or LoRA-Init (A, B re-initialized, the base weight residualized,
their optimizer state reset). Base weights change only here and in :func:`lora_tsd.load_adapter`, through
``TSDLinear.remove_init_components``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .config import TSDConfig
from .directions import ThinSVD, change_rates, select_directions
from .errors import ConfigError, NonFiniteError
from .inject import AdapterSet, require_adapters
from .layer import TSDLinear
from .sharding import full, rank_and_world
from .svd_cache import cached_thin_svd


def step(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         svd_cache: str | os.PathLike | None = None) -> bool:
    """Count one optimizer step; perform the method's switch when the pre-launch is over.

    Args:
        model: a model with TSD adapters.
        optimizer: the optimizer that holds the adapter parameters; needed by every method with a switch,
            which resets the optimizer state of the tensors it re-initializes (A and B for init-style methods,
            the dash coefficients c, method.md §3).
        svd_cache: folder of the content-keyed SVD cache (:mod:`lora_tsd.svd_cache`); ``None``: no cache.

    Returns:
        True if the switch happened in this call.
    """
    adapters = require_adapters(model, "lora_tsd.step")
    for _, layer in adapters:
        layer.step.add_(1)
    config = adapters.config
    if not config.spec.has_switch or adapters.is_switched:
        return False
    if config.switches_on_probe:
        raise ConfigError("init_estimator='gradient' (the default of init/tsd since lora-tsd 0.2) switches before "
                          "training: call lora_tsd.gradient_probe(model, batches, loss_fn, optimizer) before the "
                          "first step, or give the config prelaunch_steps=t for the paper's pre-launch")
    if adapters.optimizer_step < config.prelaunch_steps:
        return False
    switch(model, optimizer, svd_cache=svd_cache)
    return True


def switch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    estimates: dict[str, torch.Tensor] | None = None,
    svd_cache: str | os.PathLike | None = None,
    workers: int | None = None,
) -> None:
    """Select directions and apply the method's switch in every adapted layer now.

    On CPU the layers are decomposed ``workers`` at a time (default: torch's intra-op thread count), each SVD
    with ``threads // workers`` intra-op threads: LAPACK's SVD of LLM-sized matrices scales poorly over
    threads (most of its time goes to serial panel factorizations and OpenMP barriers), while independent
    matrices scale with the cores. On a GPU the layers go one at a time (the device parallelizes each SVD).

    In a distributed run (``torch.distributed`` initialized) the layers are also split across the ranks:
    each rank decomposes and ranks its share, then the owners broadcast the selected directions, so every
    rank applies exactly the same ones. At most ``workers`` full SVDs are alive at a time per process.

    Args:
        model: a model with TSD adapters, still in the pre-launch phase.
        optimizer: reset for A and B when the method re-initializes them.
        estimates: per layer name, a dense ``(out, in)`` change to rank by (e.g. a probed gradient); by
            default the layer's own pre-launch update ``(α/r)·B A``.
        svd_cache: folder of the content-keyed on-disk SVD cache; a second run on the same base weights
            (another seed or method, a resume) reads the decompositions instead of recomputing them.
        workers: how many layers one process decomposes at once (CPU); 1 runs them serially, each SVD
            with all threads. The SVD's thread count can change its last bits, and with them near-tied
            rankings, so keep it fixed when comparing runs bit for bit.
    """
    adapters = require_adapters(model, "switch")
    config: TSDConfig = adapters.config
    if any(layer.is_switched for _, layer in adapters):
        raise ConfigError("the adapters have already switched")
    require_unmerged(adapters, "switch")
    if optimizer is None and adapters.optimizer_step > 0:
        what = "A and B" if config.spec.has_init else "the dash coefficients c"
        raise ConfigError(f"method {config.method!r} resets the optimizer state of {what} at the switch: pass the "
                          "optimizer to lora_tsd.step(model, optimizer)")
    rank, world = rank_and_world()
    workers = switch_workers(adapters.first, workers)
    layers = adapters.layers
    ri, s = config.init_size, config.dash_size
    dash_start = ri if (ri and s and config.dash_placement == "next") else 0
    # Rounds of world × workers layers: rank j takes layers j, j + world, … of the round (decomposed by its
    # worker pool), then the owners broadcast the selected directions. Gathering sharded (FSDP2) tensors is
    # collective, so every rank gathers every layer's inputs in the same order, keeping only its own.
    per_round = world * workers
    with intra_op_threads(max(1, torch.get_num_threads() // workers)), \
            (ThreadPoolExecutor(workers) if workers > 1 else _InlineExecutor()) as pool:
        for start in range(0, len(layers), per_round):
            round_layers = layers[start:start + per_round]
            jobs = {}
            for j, (name, layer) in enumerate(round_layers):
                inputs = _switch_inputs(layer)
                if j % world == rank:
                    jobs[j] = pool.submit(_select_for_layer, name, layer, config, start + j, estimates, inputs,
                                          svd_cache)
            for j, (_, layer) in enumerate(round_layers):
                ranked, indices = jobs[j].result() if j in jobs else _empty_selection(layer, config)
                if world > 1:
                    for t in (*ranked, indices):
                        torch.distributed.broadcast(t, src=j % world)
                layer.apply_switch(ranked, indices, ri, dash_start, s)
    if optimizer is not None:
        reset_optimizer_state(optimizer, switched_parameters(adapters))


def select_for_layer(name: str, layer: TSDLinear, index: int, estimate: torch.Tensor | None = None,
                     svd_cache: str | os.PathLike | None = None) -> tuple[ThinSVD, torch.Tensor]:
    """The directions :func:`switch` would select for one layer (whole tensors; no collective, no change).

    Args:
        name: the layer's name in the model (for errors).
        index: the layer's position among the adapted layers (seeds the random selector).
        estimate: a dense ``(out, in)`` change to rank by; ``None``: the layer's pre-launch update.

    Returns:
        ``(ranked, indices)``: the needed directions most important first, ``U (out, K)``, ``S (K,)``,
        ``Vh (K, in)``, and their ``(K,)`` indices in descending-σ order.
    """
    estimates = None if estimate is None else {name: estimate}
    return _select_for_layer(name, layer, layer.config, index, estimates, _switch_inputs(layer), svd_cache)


def apply_selections(adapters: AdapterSet, selections: list[tuple[ThinSVD, torch.Tensor]],
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    """Switch every layer to its precomputed selection (from :func:`select_for_layer`, in layer order)."""
    config = adapters.config
    if any(layer.is_switched for _, layer in adapters):
        raise ConfigError("the adapters have already switched")
    ri, s = config.init_size, config.dash_size
    dash_start = ri if (ri and s and config.dash_placement == "next") else 0
    for (_, layer), (ranked, indices) in zip(adapters, selections, strict=True):
        layer.apply_switch(ranked, indices, ri, dash_start, s)
    if optimizer is not None:
        reset_optimizer_state(optimizer, switched_parameters(adapters))


def switched_parameters(adapters: AdapterSet) -> list[nn.Parameter]:
    """The parameters a switch re-initializes, whose optimizer state it resets: A and B for init-style methods
    (their pre-launch moments belong to discarded values), and the dash coefficients c. c sits in the optimizer
    from step 0 with an exactly zero gradient, so without the reset its Adam step count would already be t at
    the switch and the bias correction would make its first updates larger than the authors' code, whose c has
    no optimizer state until the switch (method.md §3)."""
    params: list[nn.Parameter] = []
    for _, layer in adapters:
        if layer.config.init_size:
            params += [layer.lora_A, layer.lora_B]
        if layer.dash_c is not None:
            params.append(layer.dash_c)
    return params


def require_unmerged(adapters: AdapterSet, what: str) -> None:
    """Refuse ``what`` on merged adapters: the base weight then holds W + ΔW, and decomposing it would rank the
    directions of the fine-tuned weight instead of the pretrained one."""
    if adapters.any_merged:
        raise ConfigError(f"{what} on a merged model: its base weights hold W + ΔW, not the pretrained W; call "
                          "lora_tsd.unmerge(model) first")


class _InlineExecutor(contextlib.AbstractContextManager):
    """``submit`` runs the call at once in this thread (a serial switch needs no thread pool)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # re-raised by .result(), as from a pool
            future.set_exception(err)
        return future

    def __exit__(self, *exc: object) -> None:
        return None


def switch_workers(layer: TSDLinear, requested: int | None = None) -> int:
    """How many layers one process decomposes at once in :func:`switch`.

    Args:
        layer: any adapted layer of the model (its device decides the default).
        requested: the caller's ``workers``; ``None`` for the default.

    Returns:
        ``requested`` when given (a positive integer, else :class:`ConfigError`); by default 1 on accelerators
        (the device parallelizes each SVD) and torch's intra-op thread count on CPU.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"workers must be a positive integer, got {requested!r}")
        return requested
    return 1 if layer.lora_A.device.type != "cpu" else max(1, torch.get_num_threads())


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Torch's (and MKL's / OpenMP's) intra-op thread count set to ``n`` for the duration."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def _switch_inputs(layer: TSDLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole ``(W (out, in), B (out, r), A (r, in))`` of a layer (all-gathered if sharded)."""
    return layer.full_weight(), full(layer.lora_B), full(layer.lora_A)


def _empty_selection(layer: TSDLinear, config: TSDConfig) -> tuple[ThinSVD, torch.Tensor]:
    """Receive buffers for a layer another rank decomposes."""
    k, device = config.directions_needed(), layer.lora_A.device
    ranked = ThinSVD(torch.empty(layer.out_features, k, device=device), torch.empty(k, device=device),
                     torch.empty(k, layer.in_features, device=device))
    return ranked, torch.empty(k, dtype=torch.int64, device=device)


def _select_for_layer(
    name: str,
    layer: TSDLinear,
    config: TSDConfig,
    index: int,
    estimates: dict[str, torch.Tensor] | None,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    svd_cache: str | os.PathLike | None = None,
) -> tuple[ThinSVD, torch.Tensor]:
    """Rank this layer's core directions; return the needed ones (most important first) and their indices."""
    weight, lora_B, lora_A = inputs
    try:
        svd = cached_thin_svd(weight, svd_cache)
    except NonFiniteError as err:
        raise NonFiniteError(f"layer {name!r}: base {err}") from None
    needed = config.directions_needed()
    if config.selector == "tsd":
        delta = estimates[name] if estimates is not None else (lora_B * layer.scaling, lora_A)
        for what, t in (("lora_B", lora_B), ("lora_A", lora_A), ("estimate", delta)):
            if isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
                raise NonFiniteError(f"layer {name!r}: {what} contains NaN or inf at the switch")
        ranking = select_directions(change_rates(weight, delta, config.eps, svd=svd), needed)
    else:
        ranking = select_directions(svd.S, needed, config.selector, seed=config.seed * 1_000_003 + index)
    idx = ranking.to(svd.U.device)
    ranked = ThinSVD(svd.U[:, idx].contiguous(), svd.S[idx].contiguous(), svd.Vh[idx].contiguous())
    return ranked, idx


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Forget the optimizer state (moments, step counts) of ``params``; it restarts lazily at their next step."""
    inner = optimizer
    while hasattr(inner, "optimizer") and not hasattr(inner, "param_groups"):
        inner = inner.optimizer  # wrappers such as accelerate's AcceleratedOptimizer
    state = inner.state if hasattr(inner, "state") else optimizer.state
    for p in params:
        state.pop(p, None)
