"""Attach TSD adapters to a model, enumerate them, and merge them away.

``attach`` wraps every targeted ``nn.Linear`` / ``Conv1D`` in place with a :class:`TSDLinear`, freezes
everything else, and (for selectors that need no training, e.g. PiSSA's ``top``) performs the switch at
once: data-dependent initialization always runs after the real weights are loaded.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from .config import TSDConfig
from .errors import ConfigError, TargetError
from .layer import TSDLinear, base_shape, is_adaptable

# Default targets per HF model_type: the authors' commonsense setup (q, k, v, up, down) for decoders, all
# attention and MLP projections for encoders.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"],
}


def adapted_layers(model: nn.Module) -> list[tuple[str, TSDLinear]]:
    """``(name, layer)`` for every :class:`TSDLinear` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TSDLinear)]


def require_adapters(model: nn.Module, what: str) -> list[tuple[str, TSDLinear]]:
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError(f"{what} needs a model with TSD adapters; call lora_tsd.attach(model, config) first")
    return layers


def model_config(model: nn.Module) -> TSDConfig:
    """The :class:`TSDConfig` the model's adapters were attached with."""
    return require_adapters(model, "model_config")[0][1].config


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _candidate_summary(model: nn.Module) -> str:
    counts = Counter(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_adaptable(m))
    if not counts:
        return "the model has no nn.Linear or Conv1D layers"
    return "adaptable layers (name suffix × count): " + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def resolve_targets(model: nn.Module, config: TSDConfig) -> list[str]:
    """Full names of the modules ``config.target_modules`` selects; a clear error when none match."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(f"no default target_modules for model type {model_type!r}; set target_modules. "
                              + _candidate_summary(model))
        targets = DEFAULT_TARGETS[model_type]
    names = [name for name, m in model.named_modules() if name and _matches(name, targets)]
    if not names:
        raise TargetError(f"no module matches target_modules={targets!r}. " + _candidate_summary(model))
    bad = [n for n in names if not is_adaptable(model.get_submodule(n))]
    if bad:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in bad})
        raise TargetError(f"target_modules={targets!r} matches modules that are not nn.Linear/Conv1D "
                          f"({', '.join(kinds)}), e.g. {bad[0]!r}. " + _candidate_summary(model))
    return names


def attach(model: nn.Module, config: TSDConfig) -> nn.Module:
    """Insert TSD adapters into ``model`` in place, freeze the base, and return the model.

    Every trainable parameter afterwards is an adapter tensor (A, B, dash coefficients) or belongs to a
    module named in ``config.modules_to_save``. Attaching leaves the model's outputs unchanged.
    """
    _attach_layers(model, config)
    if config.spec.has_switch and config.prelaunch_steps == 0 and config.init_estimator == "prelaunch":
        from .schedule import switch  # local import: schedule builds on this module

        switch(model)
    return model


def _attach_layers(model: nn.Module, config: TSDConfig) -> None:
    """Wrap the targets without any switch (shared by ``attach`` and ``load_adapter``)."""
    if not isinstance(config, TSDConfig):
        raise ConfigError(f"attach expects a TSDConfig, got {type(config).__name__}")
    if adapted_layers(model):
        raise ConfigError("the model already has TSD adapters; attach once (or start from a fresh base model)")
    names = resolve_targets(model, config)
    need = config.directions_needed()
    for name in names:
        n, m = base_shape(model.get_submodule(name))
        if config.r > min(n, m):
            raise ConfigError(f"r={config.r} exceeds min(out, in)={min(n, m)} of layer {name!r} ({n}×{m})")
        if need > min(n, m):
            raise ConfigError(f"layer {name!r} ({n}×{m}) has {min(n, m)} directions, fewer than the {need} "
                              f"the config selects (dash_directions={config.dash_directions}, "
                              f"init_directions={config.init_directions})")
    _check_modules_to_save(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = TSDLinear(getattr(parent, child), config, layer_seed=config.seed * 1_000_003 + index)
        layer.record_base_fingerprint()
        setattr(parent, child, layer)
    for _, module in saved_modules(model, config):
        for p in module.parameters():
            p.requires_grad_(True)


def saved_modules(model: nn.Module, config: TSDConfig) -> list[tuple[str, nn.Module]]:
    """Modules trained in full and saved with the adapter (``config.modules_to_save``)."""
    if not config.modules_to_save:
        return []
    return [(n, m) for n, m in model.named_modules()
            if n and _matches(n, config.modules_to_save) and not isinstance(m, TSDLinear)
            and ".base_layer" not in n]


def _check_modules_to_save(model: nn.Module, config: TSDConfig) -> None:
    for target in config.modules_to_save:
        if not any(n and _matches(n, [target]) for n, _ in model.named_modules()):
            raise TargetError(f"modules_to_save entry {target!r} matches no module of the model")


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (what ``requires_grad`` says)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layers back; returns the model.

    The result has no adapter modules left: it is an ordinary model (``save_pretrained`` works) whose
    weights are ``W + ΔW`` (for init-style methods ``W_res + ΔW``, i.e. the fine-tuned weight).
    """
    for name, layer in require_adapters(model, "merge"):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    return model


def merge_in_place(model: nn.Module) -> None:
    """Merge every adapter but keep the adapter modules (reversible with :func:`unmerge`)."""
    for _, layer in require_adapters(model, "merge_in_place"):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge_in_place`: restore the base weights (up to the dtype's rounding)."""
    for _, layer in require_adapters(model, "unmerge"):
        layer.unmerge()
