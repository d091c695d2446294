"""The commands' workflows: :func:`run_training` (train, evaluate, export; resumable), :func:`evaluate_run` and
:func:`export_run`. The loop itself is :mod:`lora_tsd.app.workflow.loop`."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lora_tsd.app.workflow import loop, preflight
from lora_tsd.app.workflow.backends import load_any_adapter
from lora_tsd.app.workflow.callbacks import CallbackList, LoopCallback
from lora_tsd.app.workflow.checkpoint import find_checkpoint, list_checkpoints
from lora_tsd.app.workflow.config import EXTERNAL_METHODS, TrainConfig
from lora_tsd.app.workflow.export_card import base_reference, label_maps, model_card
from lora_tsd.app.workflow.loading import evaluate_split, load_for_run
from lora_tsd.app.workflow.outputs import RUN_MARKER, new_run_folder, prepare_output_dir, read_run_config
from lora_tsd.app.workflow.ownership import check_replaceable, claim_folder
from lora_tsd.app.workflow.run_folder import RunFolderLock
from lora_tsd.app.workflow.validation import check_checkpoint_belongs
from lora_tsd.atomic import atomic_write, atomic_write_json
from lora_tsd.errors import ConfigError
from lora_tsd.peft_export import export_peft


def use_svd_cache(requested: bool | None, device: torch.device) -> bool:
    """Whether the switch reads and fills the on-disk SVD cache: as requested, else only on a CPU.

    On a CPU a cached SVD loads in a fraction of the time LAPACK takes (SmolLM2's 210 matrices: 0.7 s warm vs
    11.9 s cold, docs/performance.md). On CUDA the checked cuSOLVER ``gesvda`` recomputes one LLaMA-7B layer's
    five SVDs in 0.75 s while hashing the weights and reading the cache back takes 1.06 s (H100), so the cache
    would only cost time there.
    """
    return requested if requested is not None else device.type == "cpu"


def run_training(cfg: TrainConfig, resume: bool = False, resume_from: str | None = None,
                 callbacks: Iterable[LoopCallback] = (), backend: Any = None,
                 loader: Callable[[TrainConfig], tuple[Any, torch.nn.Module, Any, str, Any]] | None = None
                 ) -> dict[str, Any]:
    """Train, evaluate and export; returns the summary (also written to ``summary.json``).

    With ``resume``, continue the run in ``cfg.output_dir`` from its newest good checkpoint (or ``resume_from``):
    the result is bit-identical on CPU to a run that was never interrupted. ``callbacks`` observe the loop
    (:class:`~lora_tsd.app.workflow.callbacks.LoopCallback`); ``backend`` replaces the method's own (e.g. a full
    fine-tune for the TSD capture analysis); ``loader(cfg) -> (task, model, tokenizer, kind, runner)`` replaces
    :func:`~lora_tsd.app.workflow.loading.load_for_run` (another kind of data and model, e.g. diffusion).
    """
    from accelerate import Accelerator

    from lora_tsd.app.assets.download_cache import cache_dir

    started = time.time()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if cfg.output_dir is None:
        if resume:
            raise ConfigError("--resume needs --output-dir: the run folder to continue")
        cfg = cfg.with_options(output_dir=_agreed_new_run_folder(cfg, accelerator))
    out = Path(cfg.output_dir)
    if accelerator.is_main_process and not resume:
        print(f"run folder: {out}", flush=True)
        preflight.emit(preflight.option_warnings(cfg))
    ckpt = None
    lock = RunFolderLock()  # one writer per run folder (run_folder.py); held until this function returns
    if resume:
        cfg = read_run_config(out).with_options(progress=cfg.progress)
        ckpt = find_checkpoint(out, resume_from)
        loop.check_resumable(ckpt, out)
        check_checkpoint_belongs(ckpt, cfg)  # type: ignore[arg-type] - check_resumable refused None
        if accelerator.is_main_process:
            lock.acquire(out)
    elif accelerator.is_main_process:
        prepare_output_dir(out, cfg.overwrite, lock)
        lock.acquire(out)
        atomic_write_json(out / RUN_MARKER, cfg.to_dict())
    accelerator.wait_for_everyone()
    state = loop.LoopState(cfg, out, accelerator, CallbackList([preflight.DataPreflight(), *callbacks]), started)
    svd_cache = cache_dir() if use_svd_cache(cfg.svd_cache, accelerator.device) else None
    try:
        loop.setup(state, ckpt, svd_cache, backend, loader)
        loop.train_steps(state)
        return loop.finalize(state)
    except BaseException:
        # A new run that fails before its first checkpoint leaves nothing behind; one with checkpoints keeps them
        # (and its log) for --resume; one that failed in its final evaluation keeps its adapter and summary.
        if (not resume and accelerator.is_main_process and not list_checkpoints(out)
                and not (out / "summary.json").is_file()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()


def _agreed_new_run_folder(cfg: TrainConfig, accelerator: Any) -> str:
    """A fresh default run folder, chosen by the main process and shared with the others (a folder the main
    process creates first must not send another rank to the next number)."""
    from accelerate.utils import broadcast_object_list

    chosen = [str(new_run_folder(cfg)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    return str(chosen[0])


def evaluate_run(run_dir: str | None, model: str | None = None, task: str | None = None,
                 split: str = "test", adapter: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Score a run's adapter (or, with no run, the bare base model) on a task split."""
    updates = {k: v for k, v in dict(model=model, task=task, **overrides).items() if v is not None}
    if run_dir is not None:
        cfg = read_run_config(run_dir).with_options(**updates)
        adapter = adapter or str(Path(run_dir) / "adapter")
    else:
        if model is None or task is None:
            raise ConfigError("eval needs a run folder, or both --model and --task to score the bare base model")
        cfg = TrainConfig.from_dict(updates)
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split must be train, validation or test, got {split!r}")
    task_obj, base, _, _, runner = load_for_run(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if adapter is not None:
        base = load_any_adapter(base, adapter)
    base.to(device)
    metrics = evaluate_split(base, runner, getattr(task_obj, split), cfg, device)
    return {"model": cfg.model, "task": cfg.task, "split": split, "adapter": adapter,
            "examples": len(getattr(task_obj, split)), **metrics}


def export_run(run_dir: str, out_dir: str, merged: bool = False, overwrite: bool = False) -> Path:
    """Write a run's adapter as a stock PEFT adapter, or (``merged``) a full merged model folder."""
    from lora_tsd.merge import merge

    cfg = read_run_config(run_dir)
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {str(out)!r} is a file or a symbolic link; give a folder path")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite")
        check_replaceable(out, protected=(Path(run_dir),), what="export folder")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists() or tmp.is_symlink():  # left by a crashed export; never someone else's folder
        check_replaceable(tmp, flag="export", what="export folder")
    task, base, tokenizer, kind, _ = load_for_run(cfg)
    model = load_any_adapter(base, Path(run_dir) / "adapter")
    reference = base_reference(cfg.model)
    labels = list(task.labels) if kind == "encoder" else []
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    claim_folder(tmp, "export")
    external = cfg.method in EXTERNAL_METHODS  # a PEFT model (DoRA): PEFT merges and saves it
    if merged:
        plain = model.merge_and_unload() if external else merge(model)
        if labels:
            plain.config.id2label, plain.config.label2id = label_maps(labels)
        plain.config._name_or_path = reference.name_or_path
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    elif external:
        model.peft_config["default"].base_model_name_or_path = reference.name_or_path
        model.save_pretrained(tmp)
    else:
        export_peft(model, tmp, base_model_name=reference.name_or_path,
                    task_type="SEQ_CLS" if kind == "encoder" else "CAUSAL_LM")
    summary_file = Path(run_dir) / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    card = model_card(cfg, reference, summary, labels, kind, merged, out.resolve())
    atomic_write(tmp / "README.md", lambda p: p.write_text(card, encoding="utf-8"))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
