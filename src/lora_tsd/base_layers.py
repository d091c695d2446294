"""The base layers an adapter can wrap, and their ``(out, in)`` geometry whatever their storage layout.

``nn.Linear`` stores its weight ``(out, in)``; Hugging Face's GPT-2-style ``Conv1D`` stores it ``(in, out)`` and
computes ``x @ W + b``. ``Conv1D`` is recognised by its class (name and defining module), so the core never
imports transformers.
"""

from __future__ import annotations

from torch import nn

from .quantized import is_quantized

#: Where transformers defines ``Conv1D`` (a class of that name defined elsewhere is not taken for it).
_CONV1D_MODULE = "transformers.pytorch_utils"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) transformers' ``Conv1D``, without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__ == _CONV1D_MODULE for cls in type(module).__mro__)


def is_adaptable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer type :class:`~lora_tsd.layer.TSDLinear` can wrap (bitsandbytes' quantized
    linear layers included)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized(module)


def base_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of an adaptable layer, whatever its storage layout (a packed 4-bit weight included)."""
    if is_quantized(module):
        return module.out_features, module.in_features
    n_rows, n_cols = module.weight.shape
    return (n_cols, n_rows) if is_conv1d(module) else (n_rows, n_cols)
