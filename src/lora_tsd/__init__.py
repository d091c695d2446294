"""lora-tsd: task-specific-direction fine-tuning (LoRA-Dash, LoRA-Init, LoRA-TSD) for any PyTorch model.

Quick use::

    import lora_tsd
    model = lora_tsd.attach(model, lora_tsd.TSDConfig(method="tsd", r=8))
    ...  # after every optimizer.step():
    lora_tsd.step(model, optimizer)
    lora_tsd.export_peft(model, "out/peft")  # a plain LoRA adapter for PEFT / vLLM
"""

__version__ = "0.2.0"

from .adapter_io import load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .config import METHODS, TSDConfig  # noqa: E402
from .directions import (  # noqa: E402
    change_rates,
    overlap,
    projections,
    select_directions,
    thin_svd,
    tsd_accuracy,
    tsd_recall,
)
from .errors import (  # noqa: E402
    AdapterFormatError,
    BaseMismatchError,
    ConfigError,
    NonFiniteError,
    TargetError,
    TSDError,
)
from .layer import TSDLinear  # noqa: E402
from .model import adapted_layers, attach, merge, merge_in_place, trainable_parameters, unmerge  # noqa: E402
from .peft_export import export_peft  # noqa: E402
from .schedule import gradient_probe, step, switch  # noqa: E402


def __getattr__(name: str):  # the Trainer callback imports transformers' Trainer machinery lazily
    if name == "TSDCallback":
        from .callbacks import TSDCallback

        return TSDCallback
    raise AttributeError(f"module 'lora_tsd' has no attribute {name!r}")


__all__ = [
    "METHODS", "AdapterFormatError", "BaseMismatchError", "ConfigError", "NonFiniteError", "TSDCallback",
    "TSDConfig", "TSDError", "TSDLinear", "TargetError", "adapted_layers", "attach", "change_rates",
    "export_peft", "gradient_probe", "load_adapter", "merge", "merge_in_place", "overlap", "projections",
    "read_adapter_config", "save_adapter", "select_directions", "step", "switch", "thin_svd",
    "trainable_parameters", "tsd_accuracy", "tsd_recall", "unmerge",
]
