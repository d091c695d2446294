"""Adapter back ends of the training workflow: this library's methods, and PEFT's DoRA as an external anchor.

The loop talks to one object: attach the adapter, count an optimizer step, report the phase, save, load and
export. ``TSDBackend`` drives lora/dash/init/tsd/pissa/milora; ``PeftDoraBackend`` runs PEFT's DoRA
(``use_dora=True``) through the same loop so comparisons share data, schedule and evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_tsd.adapter_io import CONFIG_FILE, adapter_state_dict, load_adapter, restore_adapter_state, save_adapter
from lora_tsd.app.workflow.export_card import base_reference
from lora_tsd.attaching import attach
from lora_tsd.config import TSDConfig
from lora_tsd.errors import AdapterFormatError, ConfigError
from lora_tsd.inject import require_adapters, resolve_targets, trainable_parameters
from lora_tsd.peft_export import export_peft
from lora_tsd.probe import gradient_probe
from lora_tsd.sharding import is_writer
from lora_tsd.switching import step as tsd_step


class TSDBackend:
    """lora-tsd's own adapters (every method of :data:`lora_tsd.METHODS`)."""

    def __init__(self, config: TSDConfig, svd_cache: Path | None = None) -> None:
        self.config = config
        self.svd_cache = svd_cache

    def attach(self, model: nn.Module) -> nn.Module:
        return attach(model, self.config)

    def step(self, core: nn.Module, optimizer: Any) -> bool:
        return tsd_step(core, optimizer, svd_cache=self.svd_cache)

    @property
    def needs_probe(self) -> bool:
        """Whether the method switches before training, on a gradient probe (``init_estimator='gradient'``)."""
        return self.config.switches_on_probe

    def probe(self, model: nn.Module, batches: Any, loss_fn: Any, optimizer: Any, groups: int = 1) -> None:
        """The gradient probe over ``groups`` groups of layers (1: all at once)."""
        n_layers = len(require_adapters(model, "probe"))
        group_size = None if groups == 1 else -(-n_layers // groups)
        gradient_probe(model, batches, loss_fn, optimizer, group_size=group_size)

    def phase(self, core: nn.Module) -> str:
        return require_adapters(core, "phase").phase_name

    def describe(self, core: nn.Module) -> dict[str, Any]:
        adapters = require_adapters(core, "describe")
        config = adapters.config
        return {"adapted_layers": len(adapters), "trainable_parameters": trainable_parameters(core),
                "switch_step": config.prelaunch_steps if config.spec.has_switch else None}

    def outputs(self, out: Path) -> dict[str, str]:
        return {"adapter": str(out / "adapter"), "peft": str(out / "peft")}

    def save(self, core: nn.Module, out: Path, model_name: str, task_type: str) -> None:
        save_adapter(core, out / "adapter", base_model_name=model_name)
        # The PEFT export names the real base (stock loaders resolve it offline), not the alias.
        export_peft(core, out / "peft", base_model_name=base_reference(model_name).name_or_path, task_type=task_type)

    def save_checkpoint_adapter(self, core: nn.Module, directory: Path, model_name: str) -> None:
        save_adapter(core, directory, base_model_name=model_name)

    def load_checkpoint_adapter(self, model: nn.Module, directory: Path) -> nn.Module:
        """The base model with the checkpoint's adapter (phase, step and directions included)."""
        return load_adapter(model, directory)

    def trained_state(self, core: nn.Module) -> dict[str, torch.Tensor] | None:
        """Everything training changed (adapter tensors, buffers, head), for the best validation checkpoint."""
        return {k: v.detach().cpu().clone() for k, v in adapter_state_dict(core).items()}

    def restore_trained_state(self, core: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        restore_adapter_state(core, tensors)


class PeftDoraBackend:
    """PEFT's DoRA (weight-decomposed LoRA) with the same r, α, dropout and targets; no switch."""

    def __init__(self, config: TSDConfig, svd_cache: Path | None = None) -> None:
        self.config = config

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = resolve_targets(model, self.config)
        peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                                 target_modules=targets, use_dora=True,
                                 modules_to_save=self.config.modules_to_save or None)
        return get_peft_model(model, peft_config)

    needs_probe = False

    def step(self, core: nn.Module, optimizer: Any) -> bool:
        return False

    def phase(self, core: nn.Module) -> str:
        return "dora"

    def describe(self, core: nn.Module) -> dict[str, Any]:
        return {"adapted_layers": len(core.peft_config["default"].target_modules),
                "trainable_parameters": trainable_parameters(core), "switch_step": None}

    def outputs(self, out: Path) -> dict[str, str]:
        return {"adapter": str(out / "adapter"), "peft": str(out / "peft")}

    def save(self, core: nn.Module, out: Path, model_name: str, task_type: str) -> None:
        if is_writer():
            core.save_pretrained(out / "peft")
            (out / "adapter").symlink_to("peft", target_is_directory=True)

    def save_checkpoint_adapter(self, core: nn.Module, directory: Path, model_name: str) -> None:
        if is_writer():
            core.save_pretrained(directory)

    def load_checkpoint_adapter(self, model: nn.Module, directory: Path) -> nn.Module:
        """The base model wrapped by PEFT with the checkpoint's DoRA weights, trainable as after ``attach``."""
        from peft import PeftModel

        from lora_tsd.app.assets.model_files import check_adapter_folder

        check_adapter_folder(directory)
        return PeftModel.from_pretrained(model, directory, is_trainable=True)

    def trained_state(self, core: nn.Module) -> dict[str, torch.Tensor] | None:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(core).items()}

    def restore_trained_state(self, core: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(core, tensors)


class FullFineTuneBackend:
    """Every parameter trains, no adapter (the reference full fine-tune of ``lora-tsd analyze capture``); the caller
    keeps the trained model (a loop callback), so nothing is written but the run's log and summary."""

    needs_probe = False
    config = None

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def step(self, core: nn.Module, optimizer: Any) -> bool:
        return False

    def phase(self, core: nn.Module) -> str:
        return "full"

    def describe(self, core: nn.Module) -> dict[str, Any]:
        return {"adapted_layers": 0, "trainable_parameters": trainable_parameters(core), "switch_step": None}

    def outputs(self, out: Path) -> dict[str, str]:
        return {}

    def save(self, core: nn.Module, out: Path, model_name: str, task_type: str) -> None:
        return None

    def save_checkpoint_adapter(self, core: nn.Module, directory: Path, model_name: str) -> None:
        raise ConfigError("a full fine-tune run has no adapter checkpoints")

    def load_checkpoint_adapter(self, model: nn.Module, directory: Path) -> nn.Module:
        raise ConfigError("a full fine-tune run cannot be resumed")

    def trained_state(self, core: nn.Module) -> dict[str, torch.Tensor] | None:
        return None  # the caller keeps the trained model itself: no best checkpoint

    def restore_trained_state(self, core: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        raise ConfigError("a full fine-tune run has no best checkpoint")


def make_backend(method: str, config: TSDConfig, svd_cache: Path | None = None) -> TSDBackend | PeftDoraBackend:
    return (PeftDoraBackend if method == "dora" else TSDBackend)(config, svd_cache)


def load_any_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a lora-tsd adapter, or a stock PEFT adapter folder (e.g. the DoRA baseline), onto ``model``."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return load_adapter(model, directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        from lora_tsd.app.assets.model_files import check_adapter_folder

        check_adapter_folder(directory)
        return PeftModel.from_pretrained(model, directory)
    raise AdapterFormatError(f"{directory} holds neither a lora-tsd adapter ({CONFIG_FILE}) nor a PEFT adapter "
                             "(adapter_config.json)")
