"""Insert TSD adapters into a model, find them again, and take them out.

:func:`insert_adapters` wraps every targeted ``nn.Linear`` / ``Conv1D`` in place with a :class:`TSDLinear` and
freezes everything else; it never switches (that is :mod:`lora_tsd.switch`'s business, and
:func:`lora_tsd.attach` composes the two). :class:`AdapterSet` is the read-only view of a model's adapters that
every other module uses to reach their shared state (config, phase, optimizer-step count).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .base_layers import base_shape, is_adaptable
from .config import TSDConfig
from .errors import ConfigError, TargetError
from .layer import PHASE_NAMES, TSDLinear

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


@dataclass(frozen=True)
class AdapterSet:
    """The adapters of one model (``(name, layer)`` in module order) and the state all of them share.

    Every layer of a model is attached with the same config and switches at the same optimizer step, so the
    model-wide state is read from the first layer, in this one place.
    """

    layers: tuple[tuple[str, TSDLinear], ...]

    def __iter__(self) -> Iterator[tuple[str, TSDLinear]]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def first(self) -> TSDLinear:
        return self.layers[0][1]

    @property
    def config(self) -> TSDConfig:
        return self.first.config

    @property
    def is_switched(self) -> bool:
        return self.first.is_switched

    @property
    def phase_name(self) -> str:
        """``prelaunch`` or ``switched``."""
        return PHASE_NAMES[int(self.first.phase)]

    @property
    def optimizer_step(self) -> int:
        return self.first.optimizer_step

    @property
    def any_merged(self) -> bool:
        return any(layer._merged for _, layer in self.layers)


def require_adapters(model: nn.Module, what: str) -> AdapterSet:
    """The model's :class:`AdapterSet`; a clear error naming ``what`` when it has no adapters."""
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError(f"{what} needs a model with TSD adapters; call lora_tsd.attach(model, config) first")
    return AdapterSet(tuple(layers))


def model_config(model: nn.Module) -> TSDConfig:
    """The :class:`TSDConfig` the model's adapters were attached with."""
    return require_adapters(model, "model_config").config


def matches(name: str, targets: list[str] | str) -> bool:
    """Whether module ``name`` is selected by ``targets``: a full-match regex, or a list of name suffixes."""
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
    names = [name for name, m in model.named_modules() if name and matches(name, targets)]
    if not names:
        raise TargetError(f"no module matches target_modules={targets!r}. " + _candidate_summary(model))
    bad = [n for n in names if not is_adaptable(model.get_submodule(n))]
    if bad:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in bad})
        raise TargetError(f"target_modules={targets!r} matches modules that are not nn.Linear/Conv1D "
                          f"({', '.join(kinds)}), e.g. {bad[0]!r}. " + _candidate_summary(model))
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (a dotted path) of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def insert_adapters(model: nn.Module, config: TSDConfig) -> None:
    """Wrap the targets of ``config`` in place and freeze everything but the adapters and ``modules_to_save``.

    No switch happens here (shared by :func:`lora_tsd.attach` and :func:`lora_tsd.load_adapter`).
    """
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
        layer = TSDLinear(model.get_submodule(name), config, layer_seed=config.seed * 1_000_003 + index)
        layer.record_base_fingerprint()
        replace_module(model, name, layer)
    for _, module in saved_modules(model, config):
        for p in module.parameters():
            p.requires_grad_(True)


def remove_adapters(model: nn.Module) -> None:
    """Put every adapter's base layer back in its place (the adapters' own state is dropped)."""
    for name, layer in adapted_layers(model):
        replace_module(model, name, layer.base_layer)


def saved_modules(model: nn.Module, config: TSDConfig) -> list[tuple[str, nn.Module]]:
    """Modules trained in full and saved with the adapter (``config.modules_to_save``)."""
    if not config.modules_to_save:
        return []
    return [(n, m) for n, m in model.named_modules()
            if n and matches(n, config.modules_to_save) and not isinstance(m, TSDLinear)
            and ".base_layer" not in n]


def _check_modules_to_save(model: nn.Module, config: TSDConfig) -> None:
    for target in config.modules_to_save:
        if not any(n and matches(n, [target]) for n, _ in model.named_modules()):
            raise TargetError(f"modules_to_save entry {target!r} matches no module of the model")


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (what ``requires_grad`` says)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
