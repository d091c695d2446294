"""Resumable training checkpoints: everything a bit-exact resume needs, written so a kill cannot corrupt them.

A checkpoint ``<run>/checkpoints/step-0000042/`` holds:

- ``adapter/``: the adapter in the library's format (tensors, buffers: phase, step, directions; the head);
- ``trainer_state.safetensors``: full (unsharded) optimizer state tensors keyed by parameter name, and every
  rank's RNG states (torch CPU and CUDA);
- ``trainer_state.json``: optimizer hyper-parameters, scheduler state, the optimizer step, run metadata;
- ``manifest.json``: SHA-256 of every other file, written last.

It is assembled in ``step-N.partial/`` and renamed into place in one step, so a checkpoint directory either
exists complete or not at all; a leftover ``.partial`` is ignored. Loading verifies the manifest; a
truncated or tampered latest checkpoint is reported and the previous good one is used. Only safetensors and
JSON are read: no pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_tsd.adapter_io import save_adapter
from lora_tsd.atomic import atomic_write, atomic_write_json, file_sha256, fsync_dir
from lora_tsd.config import short_repr
from lora_tsd.errors import AdapterFormatError
from lora_tsd.sharding import full, is_writer, rank_and_world

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
MANIFEST = "manifest.json"
EXTRA = "extra."
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def _rng_tensors() -> dict[str, torch.Tensor]:
    """Every rank's RNG states (a collective in a distributed run): dropout draws differ per rank."""
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            own[f"cuda.{i}"] = state
    rank, world = rank_and_world()
    gathered: list[Any] = [own]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, own)
    return {f"rng.{r}.{key}": value for r, states in enumerate(gathered) for key, value in states.items()}


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """This rank's RNG states (rank 0's when the checkpoint came from a run with fewer processes)."""
    rank, _ = rank_and_world()
    prefix = f"rng.{rank}." if f"rng.{rank}.torch" in tensors else "rng.0."
    torch.set_rng_state(tensors[prefix + "torch"])
    cuda = sorted((k for k in tensors if k.startswith(prefix + "cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _state_dict_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (unsharded) tensors keyed by parameter name: the same file serves DDP, FSDP2 and single-process
    # runs, whatever the number of processes that resumes it.
    return StateDictOptions(full_state_dict=True, **kwargs)


def _split_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state (all-gathered from FSDP2 shards; a collective) → (tensors for safetensors, JSON rest)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state_dict = get_optimizer_state_dict(model, optimizer, options=_state_dict_options())
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{key}"] = full(value).contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, field = key.removeprefix("optim.").rsplit(".", 1)
            state.setdefault(name, {})[field] = value
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int = 2,
    on_partial: Callable[[int], None] | None = None,
    write_adapter: Callable[[nn.Module, Path], None] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of optimizer step ``step`` atomically; keep the newest ``keep`` (0: keep all).

    In a distributed run every rank must call it (sharded adapter and optimizer tensors and every rank's RNG
    states are gathered); rank 0 writes. ``write_adapter(model, folder)`` replaces the lora-tsd adapter
    format (the PEFT DoRA baseline saves its own). ``extra_tensors`` (keys prefixed ``extra.``) are stored with
    the trainer state and come back in :attr:`TrainerState.extra_tensors` (the best validation state).
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".partial")
    writer = is_writer()
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
    if write_adapter is None:
        save_adapter(model, tmp / "adapter", base_model_name=extra.get("model"))
    else:  # e.g. the PEFT DoRA baseline, saved in PEFT's own format
        write_adapter(model, tmp / "adapter")
    if on_partial is not None:
        on_partial(step)  # a hook half-way through the write (the kill-and-resume tests kill the process here)
    opt_tensors, opt_meta = _split_optimizer_state(model, optimizer)
    tensors = {**opt_tensors, **_rng_tensors(),
               **{EXTRA + k: v.contiguous().cpu() for k, v in (extra_tensors or {}).items()}}
    if not writer:
        return final
    atomic_write(tmp / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
    atomic_write_json(tmp / STATE_JSON, {"step": step, "optimizer": opt_meta,
                                         "scheduler": scheduler.state_dict(), **extra})
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    atomic_write_json(tmp / MANIFEST, {str(p.relative_to(tmp)): file_sha256(p) for p in files})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete (renamed-into-place) checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`AdapterFormatError` unless every file matches the checkpoint's manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise AdapterFormatError(f"checkpoint {path} has no {MANIFEST} (incomplete write)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterFormatError(f"checkpoint {path}: {MANIFEST} is corrupt") from None
    _check_manifest_names(path, manifest)
    for rel, digest in manifest.items():
        file = path / rel
        if file.is_symlink() or not file.is_file():
            raise AdapterFormatError(f"checkpoint {path}: {rel} is missing")
        if file_sha256(file) != digest:
            raise AdapterFormatError(f"checkpoint {path}: {rel} does not match its checksum (truncated or "
                                     "modified)")


def _check_manifest_names(path: Path, manifest: Any) -> None:
    """A manifest names only files inside its checkpoint (checked before any file is touched, so it cannot probe
    paths elsewhere), each with a SHA-256, and at least the trainer state: an empty one verifies nothing."""
    if not isinstance(manifest, dict) or not all(isinstance(v, str) and len(v) == 64 for v in manifest.values()):
        raise AdapterFormatError(f"checkpoint {path}: {MANIFEST} must map file names to SHA-256 digests")
    for rel in manifest:
        pure = PurePosixPath(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
            raise AdapterFormatError(f"checkpoint {path}: {MANIFEST} names {short_repr(rel)}, which is not a file "
                                     "inside the checkpoint")
    missing = sorted({STATE_JSON, STATE_TENSORS} - set(manifest))
    if missing:
        raise AdapterFormatError(f"checkpoint {path}: {MANIFEST} does not list {', '.join(missing)}")


def find_checkpoint(run_dir: Path, explicit: str | None = None) -> Path | None:
    """The checkpoint to resume from: ``explicit`` (verified), else the newest one that verifies.

    Corrupt checkpoints are reported on stderr and skipped.
    """
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise AdapterFormatError(f"checkpoint {explicit!r} does not exist")
        verify_checkpoint(path)
        return path
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except AdapterFormatError as err:
            print(f"lora-tsd: skipping corrupt checkpoint: {err}", file=sys.stderr)
            continue
        return path
    return None


def _forget_stateless(path: Path, optimizer: torch.optim.Optimizer, saved_groups: list[dict[str, Any]],
                      stateless: set[str]) -> None:
    """Drop the state torch made up for parameters the checkpoint saved without one.

    ``set_optimizer_state_dict`` first gives every parameter a state by a zero-gradient step (step count 1,
    zero moments), then overwrites it from the checkpoint; parameters absent there would keep the made-up
    one, and their next update would use the wrong bias correction. The saved groups list the parameters by
    name in the optimizer's own order, which identifies them.
    """
    from lora_tsd.switching import reset_optimizer_state

    groups = optimizer.param_groups
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
        raise AdapterFormatError(f"checkpoint {path}: the optimizer's parameter groups do not fit this run")
    reset_optimizer_state(optimizer, [param for saved, group in zip(saved_groups, groups, strict=True)
                                      for name, param in zip(saved["params"], group["params"], strict=True)
                                      if name in stateless])


@dataclass
class TrainerState:
    step: int
    meta: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor]


def load_trainer_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
                       ) -> TrainerState:
    """Restore optimizer, scheduler and RNG states from a verified checkpoint; return its step and metadata.

    ``model`` is the (possibly FSDP2-sharded) model the optimizer was built on; every rank reads the full state
    and keeps its own shard.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(path / STATE_TENSORS))
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise AdapterFormatError(f"checkpoint {path} cannot be read: {err}") from None
    try:
        state_dict = _join_optimizer_state(tensors, meta["optimizer"])
        # Parameters the checkpoint lists without a state had none when it was saved: A and B right after the
        # switch, which resets their state (they get a fresh one at the next step). Loading them as stateless is
        # the exact state of the run; torch's strict check would refuse it.
        listed = {name for group in state_dict["param_groups"] for name in group["params"]}
        stateless = listed - set(state_dict["state"])
        set_optimizer_state_dict(model, optimizer, state_dict, options=_state_dict_options(strict=not stateless))
    except (ValueError, KeyError, RuntimeError, AssertionError) as err:
        raise AdapterFormatError(f"checkpoint {path}: the optimizer state does not fit this run: {err}") from None
    if stateless:
        _forget_stateless(path, optimizer, state_dict["param_groups"], stateless)
    scheduler.load_state_dict(meta["scheduler"])
    _restore_rng(tensors)
    return TrainerState(step=int(meta["step"]), meta=meta,
                        extra_tensors={k.removeprefix(EXTRA): v for k, v in tensors.items() if k.startswith(EXTRA)})
