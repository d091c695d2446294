"""The library's own adapter format: ``tsd_adapter.safetensors`` + ``tsd_config.json``.

The tensors file holds every adapter parameter and buffer (A, B, c, dash directions, selected indices,
LoRA-Init components, phase, optimizer-step count, base fingerprint) plus the full weights of
``modules_to_save``. The JSON holds the config, a readable summary (phase, step, selected directions per
layer), the fingerprints of the base weights the adapter was trained on, and the tensors file's SHA-256.
Loading checks the checksum, the layer set, the shapes and the base fingerprints before touching the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .atomic import atomic_write, atomic_write_json, file_sha256
from .config import TSDConfig
from .errors import AdapterFormatError, BaseMismatchError, ConfigError, NonFiniteError, TSDError
from .fingerprint import fingerprint_hex
from .inject import insert_adapters, remove_adapters, require_adapters, saved_modules
from .layer import TSDLinear
from .sharding import full, is_writer

TENSORS_FILE = "tsd_adapter.safetensors"
CONFIG_FILE = "tsd_config.json"
FORMAT_NAME = "lora-tsd-adapter"
FORMAT_VERSION = 1
SAVED_PREFIX = "modules_to_save."


def _layer_state(layer: TSDLinear) -> dict[str, torch.Tensor]:
    """The layer's adapter tensors (everything but the base layer's own weights)."""
    return {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``model`` keyed ``<layer name>.<tensor>``, plus ``modules_to_save`` weights."""
    adapters = require_adapters(model, "adapter_state_dict")
    config = adapters.config
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapters:
        for key, value in _layer_state(layer).items():
            out[f"{name}.{key}"] = full(value)
    for name, module in saved_modules(model, config):
        for key, value in module.state_dict().items():
            out[f"{SAVED_PREFIX}{name}.{key}"] = full(value)
    return out


def restore_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put back a state taken by :func:`adapter_state_dict` of the same run, whatever phase either is in.

    Every adapter tensor and buffer comes back (A, B, c, directions, phase, step count, the head), and the base
    weight follows the phase: a LoRA-Init layer restored to a state from before its switch gets its removed
    components back, one restored past its switch has them removed again (the base weight changes only there).
    """
    adapters = require_adapters(model, "restore_adapter_state")
    with torch.no_grad():
        for name, layer in adapters:
            if layer.config.init_size and layer.is_switched:  # before the buffers holding the components change
                layer.restore_init_components()
            _load_layer(name, layer, tensors)
            if layer.config.init_size and layer.is_switched:
                layer.remove_init_components()
        _load_saved_modules(model, adapters.config, tensors, Path("<restored state>"))


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name: str | None = None) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed; files replaced atomically).

    Returns the directory. Refuses a merged model (its base weights no longer match the fingerprints).
    In a distributed run every rank must call it (sharded tensors are gathered); rank 0 writes.
    """
    adapters = require_adapters(model, "save_adapter")
    config: TSDConfig = adapters.config
    if adapters.any_merged:
        raise ConfigError("the model is merged; call lora_tsd.unmerge(model) before save_adapter")
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # an adapter that cannot be loaded back is never written (load_adapter refuses non-finite values)
        raise NonFiniteError(f"adapter tensor {bad[0]} holds NaN or infinite values ({len(bad)} tensors); the adapter "
                             "was not saved")
    if not is_writer():
        return directory
    atomic_write(directory / TENSORS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    summary: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lora_tsd_version": __version__,
        "base_model": base_model_name or _base_model_name(model),
        "config": config.to_dict(),
        "phase": adapters.phase_name,
        "optimizer_step": adapters.optimizer_step,
        "layers": {name: _layer_summary(layer) for name, layer in adapters},
        "modules_to_save": [name for name, _ in saved_modules(model, config)],
        "tensors_sha256": file_sha256(directory / TENSORS_FILE),
    }
    atomic_write_json(directory / CONFIG_FILE, summary)
    return directory


def _layer_summary(layer: TSDLinear) -> dict[str, Any]:
    info: dict[str, Any] = {
        "shape": [layer.out_features, layer.in_features],
        "base_type": type(layer.base_layer).__name__,
        "base_dtype": str(layer.base_layer.weight.dtype).removeprefix("torch."),
        "base_fingerprint": fingerprint_hex(layer.base_fingerprint),
    }
    if layer.config.dash_size:
        info["dash_directions"] = layer.dash_idx.tolist()
    if layer.config.init_size:
        info["init_directions"] = layer.init_idx.tolist()
    return info


def _base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``tsd_config.json`` of an adapter directory, with format checks."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise AdapterFormatError(f"adapter directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise AdapterFormatError(f"{path} is missing: {str(directory)!r} is not a lora-tsd adapter directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise AdapterFormatError(f"{path} is not a lora-tsd adapter config (format field missing or wrong)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{path} has format_version {meta.get('format_version')!r}; this lora-tsd "
                                 f"reads version {FORMAT_VERSION}")
    return meta


def load_adapter(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``base_model`` (in place) and return the model.

    The base model must carry the same weights the adapter was trained on (checked by fingerprint, before
    anything is modified); init-style adapters saved after their switch re-create the residual base
    weight. Training can continue: the phase, step count and selected directions come back with it.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    try:
        config = TSDConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ConfigError) as err:
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: invalid config: {err}") from None
    tensors = _read_tensors(directory, meta)
    requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
    insert_adapters(base_model, config)
    try:
        layers = dict(require_adapters(base_model, "load_adapter"))
        _check_layer_set(layers, meta, directory)
        _check_fingerprints(layers, meta, tensors)
        _check_tensor_set(base_model, tensors, directory)
        for name, layer in layers.items():
            _load_layer(name, layer, tensors)
        _load_saved_modules(base_model, config, tensors, directory)
    except TSDError:
        remove_adapters(base_model)  # leave the caller's model as it was given (base weights untouched so far)
        for name, p in base_model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
        raise
    # Only now, with every check passed, may base weights change.
    for layer in layers.values():
        if layer.config.init_size and layer.is_switched:
            layer.remove_init_components()
    return base_model


def _read_tensors(directory: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = directory / TENSORS_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{path} is missing")
    expected = meta.get("tensors_sha256")
    if not isinstance(expected, str):  # without it nothing would be checked: refuse rather than skip the check
        raise AdapterFormatError(f"{directory / CONFIG_FILE} has no tensors_sha256; the adapter cannot be verified "
                                 "(save it again with lora_tsd.save_adapter)")
    if file_sha256(path) != expected:
        raise AdapterFormatError(f"{path} does not match the checksum recorded in {CONFIG_FILE}: the file is "
                                 "truncated, corrupt or was modified")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{path} cannot be read as safetensors: {err}") from None


def _check_layer_set(layers: dict[str, TSDLinear], meta: dict[str, Any], directory: Path) -> None:
    saved = set(meta.get("layers", {}))
    missing, extra = sorted(saved - set(layers)), sorted(set(layers) - saved)
    if missing or extra:
        raise AdapterFormatError(
            f"the adapter in {directory} does not fit this model: adapter layers not in the model: "
            f"{missing[:5] or 'none'}; model layers not in the adapter: {extra[:5] or 'none'}")


def _check_tensor_set(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Exactly the tensors this model's adapter has, each of the right kind (float or not, as the model's own)
    and finite: an adapter with extra, integer-typed or NaN tensors is refused before anything is loaded."""
    expected = adapter_state_dict(model)
    extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if extra or missing:
        raise AdapterFormatError(f"the adapter in {directory} does not hold exactly this model's adapter tensors: "
                                 f"unexpected {extra[:5] or 'none'}; missing {missing[:5] or 'none'}")
    for name, value in tensors.items():
        ref = expected[name]
        if value.is_floating_point() != ref.is_floating_point() or (
                not ref.is_floating_point() and value.dtype != ref.dtype):
            raise AdapterFormatError(f"tensor {name} has dtype {value.dtype}, the model expects {ref.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterFormatError(f"tensor {name} holds NaN or infinite values; the adapter is unusable")


def _check_fingerprints(layers: dict[str, TSDLinear], meta: dict[str, Any], tensors: dict) -> None:
    mismatched = []
    for name, layer in layers.items():
        saved = tensors.get(f"{name}.base_fingerprint")
        if saved is None:
            raise AdapterFormatError(f"tensor {name}.base_fingerprint is missing from the adapter")
        if not torch.equal(saved.cpu(), layer.base_fingerprint.cpu()):
            mismatched.append(name)
    if mismatched:
        raise BaseMismatchError(
            f"the base model's weights differ from the ones the adapter was trained on in {len(mismatched)} of "
            f"{len(layers)} layers (e.g. {', '.join(mismatched[:3])}); adapter base model: "
            f"{meta.get('base_model')!r}. Load the same base checkpoint (and dtype) the adapter was trained on.")


def _load_layer(name: str, layer: TSDLinear, tensors: dict[str, torch.Tensor]) -> None:
    expected = _layer_state(layer)
    state = {}
    for key, ref in expected.items():
        full = f"{name}.{key}"
        if full not in tensors:
            raise AdapterFormatError(f"tensor {full} is missing from the adapter")
        value = tensors[full]
        if value.shape != ref.shape:
            raise AdapterFormatError(f"tensor {full} has shape {tuple(value.shape)}, the model expects "
                                     f"{tuple(ref.shape)} (different r, s or layer size?)")
        state[key] = value
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert not unexpected, unexpected  # state holds only keys the layer declared
    assert all(k.startswith("base_layer.") for k in missing), missing


def _load_saved_modules(model: nn.Module, config: TSDConfig, tensors: dict, directory: Path) -> None:
    for name, module in saved_modules(model, config):
        prefix = f"{SAVED_PREFIX}{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise AdapterFormatError(f"saved module {name!r} in {directory} does not fit the model: {err}") from None
