"""Export to a stock PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Every method is exactly a plain LoRA relative to the *original* base weights (method.md §3–5):

- lora: rank r; dash: rank r+s, ``B' = [(α/r)B, U_s diag(c)]``, ``A' = [A; V_sᵀ]``;
- init / pissa / milora: rank 2r, ``B' = [(α/r)B, −(α/r)B₀]``, ``A' = [A; A₀]``; tsd: rank 2r+s.

The exported scale is folded into B' and ``lora_alpha = r'`` so PEFT's ``lora_alpha / r`` is 1. The PEFT
format is written here directly, so exporting needs no ``peft`` install; loading it needs only stock PEFT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write, atomic_write_json
from .base_layers import is_conv1d
from .errors import ConfigError
from .inject import require_adapters, saved_modules
from .sharding import full, is_writer

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"


def peft_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted layer, ``(B' (out, r'), A' (r', in))`` of the total change from the original weights."""
    out = {}
    for name, layer in require_adapters(model, "export_peft"):
        B, A = layer.original_delta_factors()
        out[name] = (B.detach().float().contiguous().cpu(), A.detach().float().contiguous().cpu())
    return out


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``model``'s adapter as a stock PEFT LoRA adapter loadable by ``PeftModel.from_pretrained``.

    Args:
        directory: output folder (files replaced atomically).
        base_model_name: recorded as ``base_model_name_or_path``; default the model's ``name_or_path``.
        task_type: PEFT task type (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``); ``None`` loads as a plain PeftModel.
    Returns:
        The directory.
    """
    adapters = require_adapters(model, "export_peft")
    config = adapters.config
    if adapters.any_merged:
        raise ConfigError("the model is merged; call lora_tsd.unmerge(model) before export_peft")
    factors = peft_factors(model)
    ranks = {A.shape[0] for _, A in factors.values()}
    if len(ranks) != 1:  # pragma: no cover - every layer has r + s + r_init by construction
        raise ConfigError(f"layers export with different ranks {sorted(ranks)}")
    rank = ranks.pop()
    tensors: dict[str, torch.Tensor] = {}
    for name, (B, A) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    saved = saved_modules(model, config)
    for name, module in saved:
        for key, value in module.state_dict().items():
            # PEFT stores modules_to_save weights under the module's plain key.
            tensors[f"base_model.model.{name}.{key}"] = full(value).contiguous().cpu()
    directory = Path(directory)
    if not is_writer():  # every rank gathered (collective); rank 0 writes
        return directory
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    name_or_path = base_model_name or getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": name_or_path or None,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": config.dropout,
        "target_modules": sorted(factors),
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for _, layer in adapters),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": [name for name, _ in saved] or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    atomic_write_json(directory / PEFT_CONFIG_FILE, peft_config)
    return directory
