"""The adapter's update as pure functions, and the same update as one autograd node (issue 20).

The update of a :class:`~lora_tsd.layer.TSDLinear` (method.md §3) is ``y = result + B' z`` with the rank-(r+s)
pair ``B' = [(α/r)B, U_s·c] (out, r+s)``, ``A' = [A; V_sᵀ] (r+s, in)`` and ``z = A' h (…, r+s)`` for the
dropped-out input ``h``; after the switch in training with dropout the dash columns of ``z`` read a second,
independent mask: ``z = [A h; V_sᵀ h_dash]``. Each piece is written once here: :func:`concat_factors`,
:func:`project` and :func:`add_update`, used by the layer's plain (autograd-traced) forward and by
:class:`FusedAdapterUpdate`.

:class:`FusedAdapterUpdate` runs the same forward math as one node with a hand-written backward, so autograd
records one node instead of about ten (two scalings, two concatenations, a transpose, the gemms, a cast) and
the backward:

- computes no gradient for the frozen buffers ``U_s``, ``V_s`` (autograd computes the whole ``(r+s, in)``
  gradient of ``A'`` and then drops its dash rows; here only the LoRA rows are computed: ``grad A = (∂z)[:, :r]ᵀ h``);
- reads ``∂B' = gᵀ z`` once for both ``grad B = (α/r)·∂B'[:, :r]`` and ``grad c = Σ_out ∂B'[:, r:] ⊙ U_s``.

The gradients are those of the plain forward (up to the float rounding of differently blocked gemms, ≤ 1e-6 in
fp32: ``tests/core/test_fused.py``). The frozen buffers get no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def concat_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dash_c: torch.Tensor | None,
                   dash_U: torch.Tensor | None, dash_V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B' (out, r+s), A' (r+s, in))``: ``B' = [(α/r)B, U_s·c]``, ``A' = [A; V_sᵀ]`` (``(α/r)B``, ``A`` without c).

    Args:
        lora_A: ``(r, in)``; lora_B: ``(out, r)``; scaling: α/r.
        dash_c: ``(s,)`` or ``None`` (no dash term); dash_U: ``(out, s)``; dash_V: ``(in, s)``.
    """
    B = lora_B * scaling
    A = lora_A
    if dash_c is not None:
        B = torch.cat([B, dash_U * dash_c], dim=1)
        A = torch.cat([A, dash_V.T], dim=0)
    return B, A


def project(h: torch.Tensor, h_dash: torch.Tensor | None, A: torch.Tensor, rank: int) -> torch.Tensor:
    """``z (…, r+s)``: ``A' h`` in one gemm, or ``[A h; V_sᵀ h_dash]`` when the dash term has its own input.

    Args:
        h: the dropped-out input ``(…, in)``; h_dash: the dash term's own dropped-out input, or ``None``.
        A: ``A' (r+s, in)`` of :func:`concat_factors`; rank: r (the LoRA rows of ``A'``).
    """
    if h_dash is None:
        return F.linear(h, A)
    return torch.cat([F.linear(h, A[:rank]), F.linear(h_dash, A[rank:])], dim=-1)


def add_update(result: torch.Tensor, z: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``result + z B'ᵀ``, in ``result``'s dtype.

    Where the base output and the adapter share a dtype and autocast is off, one gemm accumulates ``B' z`` into
    the base output: no ``(tokens, out)`` temporary, one pass fewer (docs/performance.md, "Candidate adapter
    forwards": CPU fp32 4-9 % faster, 14-16 % less step memory; under autocast on an H100 it gained nothing, so
    autocast keeps the two-step path, as does e.g. a bf16 base with fp32 adapters).
    """
    if result.dtype == B.dtype and not torch.is_autocast_enabled(z.device.type):
        n = result.shape[-1]
        return torch.addmm(result.reshape(-1, n), z.reshape(-1, z.shape[-1]), B.T).view(result.shape)
    return result + F.linear(z, B).to(result.dtype)


class FusedAdapterUpdate(torch.autograd.Function):
    """``result + B' z`` (:func:`add_update` of :func:`project`) as one autograd node, hand-written backward.

    ``apply(result, h, h_dash, lora_A, lora_B, dash_c, dash_U, dash_V, scaling)`` with the shapes of
    :func:`concat_factors`; ``h, h_dash (…, in)`` in the adapters' dtype (``h_dash`` ``None``: one shared input);
    ``result (…, out)`` in any dtype (the returned tensor has it). Gradients: ``result``, ``h``, ``h_dash``,
    ``lora_A``, ``lora_B``, ``dash_c``; none for the frozen ``dash_U``, ``dash_V``.

    Under autocast the forward runs the same ops with autocast on, as the plain forward does (the scalings and
    concatenations in the adapters' dtype, the gemms in autocast's dtype), and the backward runs under the
    forward's autocast state (what ``torch.amp.custom_bwd`` does, for any device type) with each gradient cast to
    its input's dtype, so the gemms of both passes run in the dtypes the plain forward's autograd would use;
    ``h`` is saved in autocast's dtype, as autocast's own cast for the gemm would be. Not for DTensor
    parameters (the layer keeps the plain forward for those).
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, h: torch.Tensor, h_dash: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, dash_c: torch.Tensor, dash_U: torch.Tensor, dash_V: torch.Tensor,
                scaling: float) -> torch.Tensor:
        B, A = concat_factors(lora_A, lora_B, scaling, dash_c, dash_U, dash_V)
        rank = lora_A.shape[0]
        z = project(h, h_dash, A, rank)
        device = h.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        ctx.input_dtypes = (h.dtype, None if h_dash is None else h_dash.dtype)
        if ctx.autocast is not None:  # what the gemms read: keep autocast's copies, not the wider inputs
            h = h.to(ctx.autocast[1])
            h_dash = None if h_dash is None else h_dash.to(ctx.autocast[1])
        ctx.save_for_backward(h, h_dash, z, A, B, dash_U)
        ctx.scaling, ctx.rank = scaling, rank
        return add_update(result, z, B)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.autocast is None:
            return FusedAdapterUpdate._backward(ctx, grad_y)
        device, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype):
            return FusedAdapterUpdate._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, h_dash, z, A, B, U = ctx.saved_tensors
        h_dtype, h_dash_dtype = ctx.input_dtypes
        r = ctx.rank
        need = ctx.needs_input_grad  # result, h, h_dash, lora_A, lora_B, dash_c, dash_U, dash_V, scaling
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(B.dtype)  # (N, out)
        grad_result = grad_y if need[0] else None
        grad_h = grad_h_dash = grad_A = grad_B = grad_c = None
        if need[1] or need[2] or need[3]:
            grad_z = g @ B  # (N, r+s)
            if h_dash is None:
                if need[1]:
                    grad_h = (grad_z @ A).view(h.shape).to(h_dtype)
            else:
                if need[1]:
                    grad_h = (grad_z[:, :r] @ A[:r]).view(h.shape).to(h_dtype)
                if need[2]:
                    grad_h_dash = (grad_z[:, r:] @ A[r:]).view(h_dash.shape).to(h_dash_dtype)
            if need[3]:  # only the LoRA rows of ∂A'
                grad_A = (grad_z[:, :r].T @ h.reshape(-1, h.shape[-1])).to(A.dtype)
        if need[4] or need[5]:
            grad_Bp = (g.T @ z.reshape(-1, z.shape[-1])).to(B.dtype)  # ∂B' (out, r+s)
            if need[4]:
                grad_B = grad_Bp[:, :r] * ctx.scaling
            if need[5]:
                grad_c = (grad_Bp[:, r:] * U).sum(0)
        return grad_result, grad_h, grad_h_dash, grad_A, grad_B, grad_c, None, None, None
