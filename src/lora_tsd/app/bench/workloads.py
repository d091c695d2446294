"""The models the benchmarks time: a one-layer model, the authors' dense-dash layer, our adapters and PEFT's LoRA
attached with random values, and a snapshot that returns a model to its pre-launch phase between switches.

Weights and adapter values are random: the costs measured do not depend on the values. Imports only torch and the
core :mod:`lora_tsd` (peft on use), so the GPU bench script can use it where the application's other
dependencies are missing.
"""

from __future__ import annotations

import gc
from typing import Literal

import torch
from torch import nn

from lora_tsd.attaching import attach
from lora_tsd.config import TSDConfig
from lora_tsd.directions import ThinSVD
from lora_tsd.inject import adapted_layers
from lora_tsd.layer import TSDLinear
from lora_tsd.switching import switch


class OneLayer(nn.Module):
    """A model with one bias-free ``(out, in)`` linear layer named ``proj`` (what the adapters wrap)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DenseDashLinear(nn.Module):
    """The authors' LoRA-Dash pattern (Subspace-Tuning): PEFT-style LoRA plus a dash term built densely.

    ``y = W x + (α/r)·lora_B(lora_A(x)) + x @ (U_s diag(c) V_sᵀ)ᵀ``: the ``(out, in)`` dash matrix is
    rebuilt every forward and kept for backward (its gradient is a weight-sized ``(out, in)`` tensor).
    """

    def __init__(self, base: nn.Linear, r: int, s: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        n, m = base.weight.shape
        self.base = base
        self.lora_A = nn.Linear(m, r, bias=False)
        self.lora_B = nn.Linear(r, n, bias=False)
        self.scaling = alpha / r
        U, V = orthonormal(n, s, gen), orthonormal(m, s, gen)
        self.register_buffer("U_s", U)  # (out, s)
        self.register_buffer("Vh_s", V.T.contiguous())  # (s, in)
        self.c = nn.Parameter(torch.zeros(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in the authors' layer: in-place adds onto the base output; the dense (out, in) product every call.
        result = self.base(x)
        h = x.to(self.lora_A.weight.dtype)
        result += (((h @ self.lora_A.weight.T) @ self.lora_B.weight.T) * self.scaling).to(result.dtype)
        dense = self.U_s @ torch.diag(self.c) @ self.Vh_s  # (out, in)
        result += (x @ dense.to(x.dtype).T).to(result.dtype)
        return result


def orthonormal(n: int, s: int, gen: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, s)`` random orthonormal columns (drawn on the CPU from ``gen``, then moved to ``device``)."""
    q, _ = torch.linalg.qr(torch.randn(n, s, generator=gen))
    return q.contiguous().to(device)


def randomize_adapters(model: nn.Module, gen: torch.Generator) -> None:
    """Give B and the dash coefficients small random values (they start at zero; the costs are the same).

    Covers our adapters (``lora_B``, ``dash_c``), PEFT's (``lora_B``) and :class:`DenseDashLinear` (``c``).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "dash_c" in name or name.endswith(".c") or name == "c"):
                p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.device, p.dtype))


def set_dash_directions(layer: TSDLinear, U: torch.Tensor, V: torch.Tensor) -> None:
    """Switch ``layer`` to its dash phase with the given directions ``U (out, s)``, ``V (in, s)`` (no SVD)."""
    s = U.shape[1]
    ranked = ThinSVD(U, torch.ones(s, device=U.device), V.T.contiguous())
    layer.apply_switch(ranked, torch.arange(s, device=U.device), 0, 0, s)


def attach_adapters(model: nn.Module, method: str, targets: list[str], r: int, s: int, gen: torch.Generator,
                    dash_phase: Literal["random", "switch"] | None = "random") -> nn.Module:
    """Attach our adapters (rank ``r``, ``s`` dash directions) to ``targets`` of ``model``, with random B (and c).

    Args:
        dash_phase: for ``method="dash"``: ``"random"`` moves every layer to its dash phase with random
            orthonormal directions (no SVD: the switch is measured on its own); ``"switch"`` runs the real
            switch (an SVD of every target, ranked by the random ``B A``); ``None`` stays in the pre-launch.

    Returns:
        ``model``, adapted in place.
    """
    cfg = TSDConfig(method=method, r=r, dash_directions=s, target_modules=targets,
                    prelaunch_steps=1 if method == "dash" else None)
    attach(model, cfg)
    if method == "dash" and dash_phase == "random":
        for _, layer in adapted_layers(model):
            device = layer.lora_A.device
            set_dash_directions(layer, orthonormal(layer.out_features, s, gen, device),
                                orthonormal(layer.in_features, s, gen, device))
    randomize_adapters(model, gen)
    if method == "dash" and dash_phase == "switch":
        switch(model)
        randomize_adapters(model, gen)  # c ≠ 0
    return model


def peft_lora(model: nn.Module, targets: list[str], r: int, gen: torch.Generator) -> nn.Module:
    """PEFT's LoRA (rank ``r``, α = 2r, no dropout, no bias) on ``targets`` of ``model``, with random B."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, bias="none")
    model = get_peft_model(model, cfg)
    randomize_adapters(model, gen)
    return model


def dense_dash_layer(n: int, m: int, r: int, s: int, gen: torch.Generator, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> DenseDashLinear:
    """A frozen ``(n, m)`` base in ``dtype`` with the authors' dense-dash adapter (fp32, random B and c)."""
    base = nn.Linear(m, n, bias=False).to(device, dtype).requires_grad_(False)
    model = DenseDashLinear(base, r, s, 2.0 * r, gen).to(device)
    model.base.to(dtype)
    randomize_adapters(model, gen)
    return model


class PrelaunchSnapshot:
    """Every adapter's own state while still in the pre-launch phase, to switch the same model repeatedly.

    A benchmark helper (a real run switches once): :meth:`restore` loads the saved tensors back through
    ``load_state_dict``, which also refreshes the layers' Python mirrors of their buffers (writing only the
    ``phase`` buffer would leave a layer that believes it has switched). The base weights are not saved: only
    methods whose switch leaves them alone (dash, lora) are accepted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = adapted_layers(model)
        self.states: list[dict[str, torch.Tensor]] = []
        for name, layer in self.layers:
            if layer.config.init_size or layer.is_switched:
                raise ValueError(f"{name}: a pre-launch snapshot needs an unswitched adapter without LoRA-Init")
            self.states.append({k: v.detach().clone() for k, v in layer.state_dict().items()
                                if not k.startswith("base_layer.")})

    def restore(self) -> None:
        """Put every adapter back as it was at the snapshot (phase, directions, A, B, c, step count)."""
        for (name, layer), state in zip(self.layers, self.states, strict=True):
            result = layer.load_state_dict(state, strict=False)
            if result.unexpected_keys or any(not k.startswith("base_layer.") for k in result.missing_keys):
                raise RuntimeError(f"{name}: the snapshot no longer matches the layer ({result})")


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on CUDA, hand the cached blocks back (between sections)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
