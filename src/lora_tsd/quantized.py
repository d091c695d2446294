"""Quantized base layers (bitsandbytes ``Linear4bit`` nf4/fp4 and ``Linear8bitLt`` int8), by duck typing.

The core never imports bitsandbytes at import time: the layers are recognised by class name and defining
package (as :mod:`lora_tsd.base_layers` recognises ``Conv1D``), an int8 weight is dequantized from its own
``CB``/``SCB`` tensors, and only 4-bit dequantization and re-quantization import ``bitsandbytes`` lazily (a
model holding such layers has it installed).

What the adapter needs from a quantized base (method.md §3–5, docs/performance.md "Issue 20 / scale plan"):

- the SVD and change rates use the dequantized fp32 weight ``(out, in)`` (:func:`dequantized_weight`);
- an Init-style switch either keeps the quantized base and carries ``−U_T Σ_T V_Tᵀ`` as an extra rank-r_init
  adapter term (``requantize_residual=False``: outputs and the stock-PEFT export are exact), or re-quantizes
  the residual ``W − U_T Σ_T V_Tᵀ`` into the base (``True``, as QPiSSA and LoftQ do), reporting the residual's
  relative quantization error (:func:`requantize`).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

#: bitsandbytes' quantized linear classes and the kind each stores.
_CLASSES = {"Linear4bit": "4bit", "Linear8bitLt": "int8"}


def quantization_kind(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes quantized linear layer, else ``None``."""
    for cls in type(module).__mro__:
        kind = _CLASSES.get(cls.__name__)
        if kind and cls.__module__.startswith("bitsandbytes."):
            return getattr(module.weight, "quant_type", "nf4") if kind == "4bit" else kind
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (without importing bitsandbytes)."""
    return quantization_kind(module) is not None


def keep_trainable_layout(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight for its CPU inference kernel, and undo a repacking.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight in place at its first eval-mode forward and
    from then on runs a kernel that has no backward (gradients to earlier layers are silently dropped, also in
    training mode). An adapted layer is trained, so its base keeps the standard layout and the differentiable
    dequantize-and-matmul path (the same one PEFT's LoRA uses on GPUs)."""
    if quantization_kind(module) not in ("nf4", "fp4"):
        return
    module.support_avx512bf16_for_cpu = False
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        functional = importlib.import_module("bitsandbytes.functional")
        module.weight.data, module.weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(
            module.weight.data, state)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense fp32 ``(out, in)`` tensor (a new tensor; the layer is unchanged)."""
    kind = quantization_kind(module)
    keep_trainable_layout(module)
    weight = module.weight
    if kind == "int8":
        scales = getattr(weight, "SCB", None)
        if scales is None:  # not quantized yet (has_fp16_weights, or before .to(device))
            return weight.detach().float().clone()
        return weight.detach().float() * (scales.float()[:, None] / 127.0)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear layer")
    if getattr(weight, "quant_state", None) is None:  # a Params4bit not quantized yet holds the dense weight
        return weight.detach().float().clone()
    functional = importlib.import_module("bitsandbytes.functional")
    return functional.dequantize_4bit(weight.data, weight.quant_state).float()


def requantize(module: nn.Module, weight: torch.Tensor) -> float:
    """Replace the layer's quantized weight with ``weight`` ``(out, in)`` quantized the same way (kind, block
    size, nested statistics). Returns the relative quantization error ``‖Q(W) − W‖_F / ‖W‖_F``."""
    kind = quantization_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear layer")
    bnb_nn = importlib.import_module("bitsandbytes.nn")
    old = module.weight
    device = old.device
    if kind == "int8":
        dense = weight.detach().to(torch.float16).cpu()
        module.weight = bnb_nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        state = old.quant_state
        dense = weight.detach().to(state.dtype).cpu()
        module.weight = bnb_nn.Params4bit(dense, requires_grad=False, quant_type=old.quant_type,
                                          blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                          quant_storage=old.quant_storage).to(device)
    return quantization_error(module, weight)


def quantization_error(module: nn.Module, weight: torch.Tensor) -> float:
    """``‖deq(module) − weight‖_F / ‖weight‖_F``: how far the stored quantized weight is from ``weight``."""
    target = weight.detach().float()
    return float((dequantized_weight(module).to(target.device) - target).norm() / target.norm().clamp_min(1e-30))


def dense_copy(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` ``(out, in)`` and the quantized layer's bias (a merged export is
    dense: bitsandbytes cannot hold ``W + ΔW`` without re-quantizing it). Its dtype is the one the weight was
    quantized from (4-bit), else the bias's, else fp32."""
    state = getattr(module.weight, "quant_state", None)
    bias = getattr(module, "bias", None)
    dtype = state.dtype if state is not None else (bias.dtype if bias is not None else torch.float32)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.requires_grad_(False)
    return dense
