"""What lora-tsd accepts in a model or adapter folder before Transformers or PEFT reads it.

Nothing pickled is read: ``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt`` and PEFT's ``adapter_model.bin``
are loaded through ``torch.load``, which can run code, so a folder that has only those is refused with the
command that converts it to safetensors. No model code runs: a ``config.json`` with ``auto_map`` (a model whose
classes live in the folder's own Python files) is refused unless the user passes ``--trust-remote-code``, and
every load passes ``trust_remote_code`` explicitly, so Transformers never asks on the terminal. An empty or
truncated folder, or one without tokenizer files, gets a message instead of a traceback or a silent ``[UNK]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_tsd.app.errors import DataError
from lora_tsd.errors import ConfigError

__all__ = ["PICKLED_SUFFIXES", "TOKENIZER_FILES", "check_adapter_folder", "check_model_folder", "load_options"]

#: Weight files read with ``torch.load`` (pickle).
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Any of these makes a folder's tokenizer loadable.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")

_CONVERT = ("convert it once where you trust the file: python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('FILE', weights_only=True), 'model.safetensors')\"")


def load_options(trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` of a model, config or tokenizer gets: remote code only on
    opt-in (Transformers would otherwise ask on the terminal and run the code on "y")."""
    return {"trust_remote_code": trust_remote_code}


def _pickled_only(folder: Path, safetensors: list[Path]) -> list[Path]:
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES and p.is_file())
    return pickled if not safetensors else []


def check_model_folder(folder: Path, trust_remote_code: bool = False, need_tokenizer: bool = True) -> None:
    """Refuse a local model folder lora-tsd must not or cannot load.

    Raises:
        ConfigError: ``auto_map`` in config.json without ``trust_remote_code`` (exit 2: a flag fixes it).
        DataError: no or unreadable config.json, pickled weights only, no weights, a truncated safetensors
            file, or no tokenizer files.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DataError(f"model folder {folder} has no config.json (empty or not a Transformers model folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"model folder {folder}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise DataError(f"model folder {folder}: config.json must hold a JSON object")
    if config.get("auto_map") and not trust_remote_code:
        raise ConfigError(f"model folder {folder} needs its own Python code (config.json has auto_map); lora-tsd "
                          "does not run a model folder's code unless you pass --trust-remote-code")
    safetensors = sorted(folder.glob("*.safetensors"))
    pickled = _pickled_only(folder, safetensors)
    if pickled:
        raise DataError(f"model folder {folder} has only pickled weights ({pickled[0].name}); nothing pickled is "
                        f"read (torch.load can run code). To use it, {_CONVERT}")
    if not safetensors and not any(folder.glob("*.gguf")):
        raise DataError(f"model folder {folder} has no weights (*.safetensors)")
    for file in safetensors:
        _check_safetensors_header(file)
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"model folder {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                        "without them every word would be unknown")


def check_adapter_folder(folder: Path) -> None:
    """Refuse a PEFT adapter folder whose weights are pickled (``adapter_model.bin`` without safetensors)."""
    if (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").is_file():
        convert = _CONVERT.replace("model.safetensors", "adapter_model.safetensors")
        raise DataError(f"adapter folder {folder} has only adapter_model.bin; nothing pickled is read (torch.load "
                        f"can run code). To use it, {convert}")


def _check_safetensors_header(file: Path) -> None:
    """Open the header (and check the declared data fits the file), so truncation is a message, not a crash."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises its own SafetensorError for every malformed file
        raise DataError(f"{file} is not a readable safetensors file (truncated or corrupt): {err}") from None
