"""Options that make a run fit or go faster without changing what it computes: a bitsandbytes-quantized base
(``--quantize``), ``torch.compile`` (``--compile``) and gradient checkpointing (``--gradient-checkpointing``).

The quantized base is chosen at load time (transformers' ``BitsAndBytesConfig``); the core adapts the
quantized layers (:mod:`lora_tsd.quantized`). Compilation and checkpointing are applied by :func:`prepare_model`
after the gradient probe (the probe's hooks must see each layer's forward exactly once).
"""

from __future__ import annotations

from typing import Any

import torch

from lora_tsd.errors import ConfigError
from lora_tsd.inject import adapted_layers

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


def quantization_config(quantize: str | None) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``nf4`` / ``fp4`` (4-bit, fp32 compute) or ``int8``; ``None``
    for a dense base."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--quantize needs bitsandbytes: pip install 'lora-tsd[quantized]'") from None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                              bnb_4bit_compute_dtype=torch.float32)


def quantization_summary(model: torch.nn.Module, quantize: str | None) -> dict[str, Any] | None:
    """What ``summary.json`` records of a quantized base: the kind, how many adapted bases are quantized, and
    the residual's relative quantization error after an Init switch that re-quantized it (mean and max)."""
    if quantize is None:
        return None
    layers = adapted_layers(model)
    errors = [layer.residual_quant_error for _, layer in layers if layer.residual_quant_error is not None]
    requantized = bool(layers) and layers[0][1].config.requantize_residual
    return {"kind": quantize, "quantized_adapted_layers": sum(1 for _, layer in layers if layer.quantization),
            "requantize_residual": requantized,
            "residual_quant_error_mean": sum(errors) / len(errors) if errors else None,
            "residual_quant_error_max": max(errors) if errors else None}


def prepare_model(model: torch.nn.Module, compile: bool = False, gradient_checkpointing: bool = False
                  ) -> torch.nn.Module:
    """Turn on gradient checkpointing (Hugging Face models, non-reentrant: recomputes each decoder/encoder
    layer's activations in the backward) and/or compile the model's forward in place (``nn.Module.compile``:
    parameter names and ``state_dict`` keys stay the same, so checkpoints and exports are unchanged).
    Returns the model."""
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        model.compile()
    return model
