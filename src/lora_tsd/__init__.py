"""lora-tsd: task-specific-direction fine-tuning (LoRA-Dash, LoRA-Init, LoRA-TSD) for any PyTorch model.

This package is the core library: it needs only torch, safetensors and numpy. The command-line application
lives in :mod:`lora_tsd.app`, which builds on the core and is never imported by it.

Quick use::

    import lora_tsd
    model = lora_tsd.attach(model, lora_tsd.TSDConfig(method="tsd", r=8))
    ...  # after every optimizer.step():
    lora_tsd.step(model, optimizer)
    lora_tsd.export_peft(model, "out/peft")  # a plain LoRA adapter for PEFT / vLLM
"""

from ._version import __version__
from .adapter_io import load_adapter, read_adapter_config, save_adapter
from .attaching import attach
from .config import METHODS, TSDConfig
from .directions import (
    change_rates,
    overlap,
    projections,
    select_directions,
    thin_svd,
    tsd_accuracy,
    tsd_recall,
)
from .errors import (
    AdapterFormatError,
    BaseMismatchError,
    ConfigError,
    NonFiniteError,
    TargetError,
    TSDError,
)
from .inject import adapted_layers, trainable_parameters
from .layer import TSDLinear
from .merge import merge, merge_in_place, unmerge
from .peft_export import export_peft
from .probe import gradient_probe
from .switching import step, switch


def __getattr__(name: str):  # the Trainer callback needs transformers: imported on first use only
    if name == "TSDCallback":
        from .trainer_callback import TSDCallback

        return TSDCallback
    raise AttributeError(f"module 'lora_tsd' has no attribute {name!r}")


__all__ = [
    "METHODS", "AdapterFormatError", "BaseMismatchError", "ConfigError", "NonFiniteError", "TSDCallback",
    "TSDConfig", "TSDError", "TSDLinear", "TargetError", "__version__", "adapted_layers", "attach",
    "change_rates", "export_peft", "gradient_probe", "load_adapter", "merge", "merge_in_place", "overlap",
    "projections", "read_adapter_config", "save_adapter", "select_directions", "step", "switch", "thin_svd",
    "trainable_parameters", "tsd_accuracy", "tsd_recall", "unmerge",
]
