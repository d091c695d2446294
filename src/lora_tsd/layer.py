"""One adapted layer: :class:`TSDLinear` wraps a base ``nn.Linear`` or HF ``Conv1D`` (composition, like PEFT's
``base_layer``) and adds the LoRA product and the LoRA-Dash term.

Forward (method.md §3)::

    y = base(x) + (α/r)·B A drop(x) + U_s diag(c) V_sᵀ drop(x)

computed as one rank-(r+s) pair ``[(α/r)B, U_s·c] @ [A drop₁(x); V_sᵀ drop₂(x)]``: thin matmuls, never an
``(out, in)`` matrix. Before the switch ``U_s`` and ``V_s`` are zero, so the dash term is exactly zero and
``c`` receives a zero gradient; ``c`` exists from the start so it sits in the optimizer from step 0, and the
switch resets its optimizer state (method.md §3), so its Adam step count starts at the switch as in the
authors' code. The two dropout masks are independent after the switch (as in the authors' code); before it
the dash term is absent, so no second mask is drawn and a LoRA-Dash run is LoRA exactly, RNG stream included.

All state that decides behaviour (phase, optimizer-step count, selected indices, dash directions, the
components LoRA-Init moved out of the base weight, whether the layer is merged, the fingerprint of the
original base weight) lives in parameters or registered buffers, so ``state_dict`` round-trips it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base_layers import base_shape, is_conv1d
from .config import TSDConfig
from .directions import ThinSVD
from .errors import ConfigError
from .fingerprint import FINGERPRINT_BYTES, fingerprint_tensor, weight_fingerprint
from .fused import FusedAdapterUpdate, add_update, concat_factors, project
from .quantized import dense_copy, dequantized_weight, keep_trainable_layout, quantization_kind, requantize
from .sharding import assign, full, is_sharded

PHASE_PRELAUNCH = 0
PHASE_SWITCHED = 1
PHASE_NAMES = {PHASE_PRELAUNCH: "prelaunch", PHASE_SWITCHED: "switched"}


class TSDLinear(nn.Module):
    """A base linear layer with a LoRA / LoRA-Dash / LoRA-Init adapter.

    Args:
        base_layer: ``nn.Linear`` (weight ``(out, in)``) or HF ``Conv1D`` (weight ``(in, out)``).
        config: the adapter's :class:`TSDConfig` (static hyper-parameters, shared by all layers).
        layer_seed: seeds this layer's initialization of A, so attach is deterministic per layer.
    """

    #: Run the update of a layer with a dash term as one autograd node (:mod:`lora_tsd.fused`) where that is the
    #: same computation (:meth:`_fuses`). Not behavioural state: set it on the class or on one layer to compare.
    fused: bool = True

    def __init__(self, base_layer: nn.Module, config: TSDConfig, layer_seed: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.layer_seed = layer_seed
        self.out_features, self.in_features = base_shape(base_layer)
        r, s, ri = config.r, config.dash_size, config.init_size
        device = base_layer.weight.device
        # Adapter tensors stay fp32 whatever the base dtype (as PEFT's autocast_adapter_dtype), so small
        # updates are not rounded away in bf16/fp16 models.
        self.lora_A = nn.Parameter(self._fresh_A(r, device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.dash_c = nn.Parameter(torch.zeros(s, device=device)) if s else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

        self.register_buffer("phase", torch.tensor(PHASE_PRELAUNCH, dtype=torch.int64, device=device))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("merged", torch.tensor(False, device=device))
        self.register_buffer("base_fingerprint", torch.zeros(FINGERPRINT_BYTES, dtype=torch.uint8))
        if s:
            self.register_buffer("dash_U", torch.zeros(self.out_features, s, device=device))
            self.register_buffer("dash_V", torch.zeros(self.in_features, s, device=device))
            self.register_buffer("dash_idx", torch.full((s,), -1, dtype=torch.int64, device=device))
        if ri:
            self.register_buffer("init_idx", torch.full((ri,), -1, dtype=torch.int64, device=device))
            self.register_buffer("init_B0", torch.zeros(self.out_features, ri, device=device))
            self.register_buffer("init_A0", torch.zeros(ri, self.in_features, device=device))
        # Forward-time mirrors of the ``merged`` and ``phase`` buffers: reading a GPU buffer in every forward
        # would force a device sync. They are derived state, refreshed wherever the buffers change.
        self._merged = False
        self._switched = False
        #: ``nf4`` / ``fp4`` / ``int8`` for a bitsandbytes base, else None (quantized.py).
        self.quantization = quantization_kind(base_layer)
        keep_trainable_layout(base_layer)
        #: After an Init switch on a quantized base: ‖Q(W_res) − W_res‖/‖W_res‖ when the residual was
        #: re-quantized (requantize_residual), else None.
        self.residual_quant_error: float | None = None

    # ---------------------------------------------------------------------------------------- helpers

    def _fresh_A(self, rows: int, device: torch.device) -> torch.Tensor:
        """Kaiming-uniform rows of A (as ``nn.Linear``/PEFT), from this layer's own seeded generator."""
        gen = torch.Generator().manual_seed(self.layer_seed)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on an (r, in) matrix
        return (torch.rand(rows, self.in_features, generator=gen) * 2 - 1).mul_(bound).to(device)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight parameter (its own storage layout), for code that expects ``.weight``."""
        return self.base_layer.weight

    def weight_view(self) -> torch.Tensor:
        """The base weight as an ``(out, in)`` view sharing storage (in-place edits reach the base layer)."""
        if self.quantization:
            raise ConfigError(f"the {self.quantization} base weight has no dense view; use full_weight()")
        w = self.base_layer.weight
        return w.T if is_conv1d(self.base_layer) else w

    def full_weight(self) -> torch.Tensor:
        """The whole ``(out, in)`` base weight, also when FSDP2 has sharded it (collective then)."""
        if self.quantization:
            return dequantized_weight(self.base_layer)
        w = full(self.base_layer.weight)
        return w.T if is_conv1d(self.base_layer) else w

    def _set_weight(self, value: torch.Tensor) -> None:
        """Write a whole ``(out, in)`` base weight (each rank keeps its shard under FSDP2; a quantized base is
        re-quantized, its relative error kept in ``residual_quant_error``)."""
        if self.quantization:
            self.residual_quant_error = requantize(self.base_layer, value)
            return
        assign(self.base_layer.weight, value.T if is_conv1d(self.base_layer) else value)

    @property
    def is_switched(self) -> bool:
        return int(self.phase) == PHASE_SWITCHED

    @property
    def optimizer_step(self) -> int:
        """Optimizer steps counted by :func:`lora_tsd.step` (kept in the ``step`` buffer, whose name is a key of the
        adapter file format)."""
        return int(self.step)

    def record_base_fingerprint(self) -> None:
        """Store the fingerprint of the (original, pretrained) base weight in its buffer."""
        stored = self.base_layer.weight if self.quantization else self.weight_view()  # packed bytes if quantized
        self.base_fingerprint.copy_(fingerprint_tensor(weight_fingerprint(stored)))

    # ---------------------------------------------------------------------------------------- forward

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B' (out, r+s), A' (r+s, in))`` with ``B' A'`` = the adapter's update of the *current* base weight."""
        return concat_factors(self.lora_A, self.lora_B, self.scaling, self.dash_c, self._buffer("dash_U"),
                              self._buffer("dash_V"))

    def full_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`factors` from whole tensors, outside a forward pass (all-gathers FSDP2 shards)."""
        c = None if self.dash_c is None else full(self.dash_c)
        return concat_factors(full(self.lora_A), full(self.lora_B), self.scaling, c, self._buffer("dash_U"),
                              self._buffer("dash_V"))

    def _buffer(self, name: str) -> torch.Tensor | None:
        """The registered buffer ``name``, or ``None`` when this layer has none (no dash term)."""
        return self._buffers.get(name)

    def original_delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of the total change relative to the *original* pretrained weight (rank r+s+r_init).

        For init-style methods the switch moved ``(α/r)·B₀A₀`` out of the base weight, so the change is
        ``(α/r)(BA − B₀A₀) + dash``: the extra pair ``[−(α/r)B₀], [A₀]`` is appended.
        """
        B, A = self.full_factors()
        if self.config.init_size and self.is_switched:
            B = torch.cat([B, -self.scaling * self.init_B0], dim=1)
            A = torch.cat([A, self.init_A0], dim=0)
        return B, A

    @property
    def carries_init(self) -> bool:
        """Whether the base still holds the components an Init switch selected, and the adapter subtracts them
        (a quantized base without ``requantize_residual``: W_res = Q(W) − U_T Σ_T V_Tᵀ exactly)."""
        return (self._switched and bool(self.quantization) and bool(self.config.init_size)
                and not self.config.requantize_residual)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._merged:
            return result
        x = x.to(self.lora_A.dtype)
        if self.carries_init:  # part of the (residual) base: no dropout
            result = result - F.linear(F.linear(x, self.init_A0), self.scaling * self.init_B0).to(result.dtype)
        h = self.dropout(x)
        # After the switch, in training with dropout, the dash term reads its own, independent mask (as the
        # authors' code draws two); otherwise both terms share h and z = A' h is one gemm.
        independent = (self._switched and self.dash_c is not None and isinstance(self.dropout, nn.Dropout)
                       and self.dropout.training)
        h_dash = self.dropout(x) if independent else None
        if self._fuses():
            return FusedAdapterUpdate.apply(result, h, h_dash, self.lora_A, self.lora_B, self.dash_c, self.dash_U,
                                            self.dash_V, self.scaling)
        B, A = self.factors()
        return add_update(result, project(h, h_dash, A, self.config.r), B)

    def _fuses(self) -> bool:
        """Whether this forward runs the update as one autograd node (:class:`~lora_tsd.fused.FusedAdapterUpdate`).

        Only where it is the same computation: a dash term to fuse, gradients recorded (in ``no_grad`` the
        plain forward is the same ops without the node) and no DTensor parameters (tensor parallelism: the
        plain forward lets DTensor dispatch each op). Under autocast the node replays autocast's dtypes.
        """
        return (self.fused and self.dash_c is not None and torch.is_grad_enabled() and not is_sharded(self.lora_A)
                and not is_sharded(self.dash_c))

    # ---------------------------------------------------------------------------------------- switch

    def apply_switch(self, ranked: ThinSVD, indices: torch.Tensor, init_count: int, dash_start: int,
                     dash_count: int) -> None:
        """Move to the post-switch phase with the selected directions of the *current* base weight.

        Args:
            ranked: the selected directions only, most important first: ``U (out, K)``, ``S (K,)``,
                ``Vh (K, in)`` (fp32), where K = the number of directions the method needs.
            indices: ``(K,)`` their indices in the weight's descending-σ order (recorded in buffers).
            init_count: the first ``init_count`` directions move into A, B (init-style methods; else 0).
            dash_start, dash_count: directions ``dash_start .. dash_start+dash_count`` get a dash coefficient.
        """
        U, S, Vh = ranked
        with torch.no_grad():
            if dash_count:
                sel = slice(dash_start, dash_start + dash_count)
                self.dash_U.copy_(U[:, sel])
                self.dash_V.copy_(Vh[sel].T)
                self.dash_idx.copy_(indices[sel])
                assign(self.dash_c, torch.zeros(dash_count, device=U.device))
            if init_count:
                root = torch.sqrt(S[:init_count] / self.scaling)  # (α/r)·B₀A₀ = U_T diag(σ_T) V_Tᵀ
                self.init_B0.copy_(U[:, :init_count] * root)
                self.init_A0.copy_(root[:, None] * Vh[:init_count])
                self.init_idx.copy_(indices[:init_count])
                # The probe's A, B are discarded (method.md §4); rank slots beyond r_init restart as LoRA.
                B = torch.zeros(self.out_features, self.config.r, device=U.device)
                B[:, :init_count] = self.init_B0
                A = self._fresh_A(self.config.r, U.device)
                A[:init_count] = self.init_A0
                assign(self.lora_B, B)
                assign(self.lora_A, A)
                self.remove_init_components()
            self.phase.fill_(PHASE_SWITCHED)
        self._switched = True

    def init_component(self) -> torch.Tensor:
        """``(α/r)·B₀A₀ = U_T diag(σ_T) V_Tᵀ`` ``(out, in)`` fp32: what LoRA-Init moves out of the base weight."""
        return (self.scaling * self.init_B0) @ self.init_A0

    def remove_init_components(self) -> None:
        """``W ← W − U_T diag(σ_T) V_Tᵀ``: the one place the base weight is residualized (switch and load).

        A quantized base is re-quantized only with ``requantize_residual``; else it stays and the forward
        subtracts the components (:attr:`carries_init`)."""
        if self.quantization and not self.config.requantize_residual:
            return
        w = self.full_weight()
        self._set_weight(w - self.init_component().to(device=w.device, dtype=w.dtype))

    def restore_init_components(self) -> None:
        """``W ← W + U_T diag(σ_T) V_Tᵀ``: undo :meth:`remove_init_components` (restoring a pre-switch state)."""
        w = self.full_weight()
        self._set_weight(w + self.init_component().to(device=w.device, dtype=w.dtype))

    # ---------------------------------------------------------------------------------------- merge

    def delta_weight(self) -> torch.Tensor:
        """The adapter's dense ``(out, in)`` fp32 update of the current base weight (for merging only)."""
        B, A = self.full_factors()
        return B @ A

    def merge(self) -> None:
        """Fold the adapter into the base weight in place; the forward then skips the adapter. A quantized base
        is first replaced by a dense ``nn.Linear`` of its dequantized (residual) weight: merged is dense."""
        if self._merged:
            return
        if self.quantization:
            self.dequantize_base()
        w = self.weight_view()
        with torch.no_grad():
            w.add_(self.delta_weight().to(device=w.device, dtype=w.dtype))
        self.merged.fill_(True)
        self._merged = True

    def dequantize_base(self) -> None:
        """Replace a quantized base layer by a dense ``nn.Linear`` of the weight it stands for (fp32 math);
        a carried Init component is subtracted into it, so the outputs stay the same."""
        with torch.no_grad():
            dense = self.full_weight()
            if self.carries_init:
                dense = dense - self.init_component().to(dense.device)
        self.base_layer = dense_copy(self.base_layer, dense)
        self.quantization = None

    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to the base dtype's rounding)."""
        if not self._merged:
            return
        w = self.weight_view()
        with torch.no_grad():
            w.sub_(self.delta_weight().to(device=w.device, dtype=w.dtype))
        self.merged.fill_(False)
        self._merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._merged = bool(self.merged)
        self._switched = int(self.phase) == PHASE_SWITCHED

    def extra_repr(self) -> str:
        return (f"method={self.config.method}, r={self.config.r}, alpha={self.config.alpha}, "
                f"dash={self.config.dash_size}, init={self.config.init_size}")
