"""The command-line training workflow: a compact loop on ``accelerate`` with the method's switch on
optimizer steps, evaluation, a JSONL metrics log, adapter checkpoints, and a summary at the end.

Output folder layout::

    <output_dir>/train_config.json   the run's TrainConfig (what `lora-tsd eval/export` read back)
    <output_dir>/metrics.jsonl       one line per optimizer step and per evaluation
    <output_dir>/checkpoints/step-N  adapter-only checkpoints (lora-tsd adapter format)
    <output_dir>/adapter/            the final adapter (lora-tsd format, with the classification head)
    <output_dir>/peft/               the same adapter as a stock PEFT LoRA adapter
    <output_dir>/summary.json        config, data and model identity, metrics before/after, time, memory
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lora_tsd import __version__
from lora_tsd.app.workflow.backends import EXTERNAL_METHODS, check_method, load_any_adapter, make_backend
from lora_tsd.app.workflow.checkpoint import find_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint
from lora_tsd.app.workflow.runners import EncoderClassifier, make_runner
from lora_tsd.atomic import atomic_write, atomic_write_json
from lora_tsd.config import DictConfig, TSDConfig
from lora_tsd.errors import ConfigError, NonFiniteError
from lora_tsd.peft_export import export_peft
from lora_tsd.sharding import full

RUN_MARKER = "train_config.json"


@dataclass
class TrainConfig(DictConfig):
    """Everything a training run needs; the command line's flags and ``--config`` keys are these fields."""

    model: str = "minilm"
    task: str = "bigbench:multiemo"
    output_dir: str = "runs/minilm-multiemo-tsd"
    overwrite: bool = False
    # method (TSDConfig fields)
    method: str = "tsd"
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    prelaunch_steps: int | None = None
    dash_directions: int = 8
    init_directions: int | None = None
    selector: str | None = None
    init_estimator: str | None = None  # resolved by TSDConfig: gradient for init/tsd unless a pre-launch is set
    dash_placement: str = "shared"
    # optimization
    steps: int = 250
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 25
    max_grad_norm: float = 1.0
    bf16: bool = False
    seed: int = 0
    data_seed: int = 0
    # data and evaluation
    max_length: int = 128
    max_train: int | None = None
    max_eval: int | None = 500
    eval_every: int = 0
    eval_batch_size: int = 64
    checkpoint_every: int = 0
    probe_batches: int = 8
    skip_nonfinite: bool = False
    fsdp: bool = False
    svd_cache: bool | None = None  # None: on for CPU runs, off on accelerators (see use_svd_cache)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "probe_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer ≥ 0, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        check_method(self.method)
        # Validates the method fields now, before anything is loaded, and records the estimator the run will
        # use: a saved config then says what ran, whatever a later version's default is.
        self.init_estimator = self.tsd_config().init_estimator
        if self.fsdp and self.method in EXTERNAL_METHODS:
            raise ConfigError(f"--fsdp supports the lora-tsd methods; run the external {self.method} baseline "
                              "with DDP")

    def tsd_config(self, modules_to_save: list[str] | None = None) -> TSDConfig:
        # External baselines (DoRA) share r, alpha, dropout and targets; validate them as plain LoRA.
        method = "lora" if self.method in EXTERNAL_METHODS else self.method
        return TSDConfig(method=method, r=self.r, alpha=self.alpha, dropout=self.dropout,
                         target_modules=self.target_modules, prelaunch_steps=self.prelaunch_steps,
                         dash_directions=self.dash_directions, init_directions=self.init_directions,
                         selector=self.selector, init_estimator=self.init_estimator,
                         dash_placement=self.dash_placement, seed=self.seed,
                         modules_to_save=modules_to_save or [])


def use_svd_cache(requested: bool | None, device: torch.device) -> bool:
    """Whether the switch reads and fills the on-disk SVD cache: as requested, else only on a CPU.

    On a CPU a cached SVD loads in a fraction of the time LAPACK takes (SmolLM2's 210 matrices: 0.7 s warm vs
    11.9 s cold, docs/performance.md). On CUDA the checked cuSOLVER ``gesvda`` recomputes one LLaMA-7B layer's
    five SVDs in 0.75 s while hashing the weights and reading the cache back takes 1.06 s (H100), so the cache
    would only cost time there.
    """
    return requested if requested is not None else device.type == "cpu"


# ------------------------------------------------------------------------------------------- outputs


def prepare_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Create the run folder; refuse an existing non-empty one unless ``overwrite`` (and then only a run folder)."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite "
                              "to replace it or choose another --output-dir")
        if not (out / RUN_MARKER).is_file():
            raise ConfigError(f"--overwrite refuses to delete {str(out)!r}: it is not a lora-tsd run folder "
                              f"(no {RUN_MARKER})")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


class MetricsLog:
    """Append-only JSONL log, flushed per line so a killed run keeps everything it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


# ------------------------------------------------------------------------------------------- loading


def load_for_run(cfg: TrainConfig):
    """Task, model, tokenizer, model kind and runner of a run (used by train, eval and export alike).

    The model name is resolved first and the (model kind, task kind) pair checked before any weights load,
    so a typo or an impossible pair fails in seconds.
    """
    from transformers import AutoConfig

    from lora_tsd.app.assets.models import detect_model_kind, load_model, resolve_model
    from lora_tsd.app.assets.tasks import load_task
    from lora_tsd.app.workflow.runners import check_pair

    source = resolve_model(cfg.model)
    task = load_task(cfg.task, seed=cfg.data_seed, max_train=cfg.max_train, max_eval=cfg.max_eval)
    kind = detect_model_kind(AutoConfig.from_pretrained(source))
    check_pair(kind, task)
    torch.manual_seed(cfg.seed)  # the classification head's initialization
    num_labels = len(task.labels) if task.kind == "classification" else None
    model, tokenizer, kind = load_model(source, kind=kind, num_labels=num_labels)
    runner = make_runner(kind, task, tokenizer, cfg.max_length)
    return task, model, tokenizer, kind, runner


def head_modules(model: torch.nn.Module, runner: Any) -> list[str]:
    if not isinstance(runner, EncoderClassifier):
        return []
    return [name for name in runner.head_names if hasattr(model, name)]


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def evaluate_split(model, runner, examples, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    with autocast(cfg, device):
        metrics = runner.evaluate(model, examples, cfg.eval_batch_size, device)
    model.train(was_training)
    return metrics


# ------------------------------------------------------------------------------------------- training


def batch_indices(n_examples: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Example indices of global micro-batch ``micro_step``: seeded per-epoch permutations, no state."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, pos = divmod(micro_step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[pos * batch_size:(pos + 1) * batch_size].tolist()


def _fault(point: str, step: int) -> None:
    """Test hook: ``LORA_TSD_FAULT=<point>:<step>`` SIGKILLs this process there (kill-and-resume tests)."""
    spec = os.environ.get("LORA_TSD_FAULT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log records past the resumed checkpoint (they are replayed), keeping the file atomic."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("step", 0) <= last_step or record.get("event") == "start":
            keep.append(line)
    text = "".join(f"{line}\n" for line in keep)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def run_training(cfg: TrainConfig, resume: bool = False, resume_from: str | None = None) -> dict[str, Any]:
    """Train, evaluate and export; returns the summary (also written to ``summary.json``).

    With ``resume``, continue the run in ``cfg.output_dir`` from its newest good checkpoint (or
    ``resume_from``): the result is bit-identical on CPU to a run that was never interrupted.
    """
    from accelerate import Accelerator

    started = time.time()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    if resume:
        out = Path(cfg.output_dir)
        cfg = dataclasses.replace(read_run_config(out), progress=cfg.progress)
        ckpt = find_checkpoint(out, resume_from)
        return _train(cfg, accelerator, out, ckpt, resume, started)
    if main_process:
        prepare_output_dir(cfg.output_dir, cfg.overwrite)
        atomic_write_json(Path(cfg.output_dir) / RUN_MARKER, cfg.to_dict())
    accelerator.wait_for_everyone()
    out = Path(cfg.output_dir)
    try:
        return _train(cfg, accelerator, out, None, False, started)
    except BaseException:
        # A run that fails before its first checkpoint leaves nothing behind; one with checkpoints keeps them
        # (and its log) for --resume.
        if main_process and not list_checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: shard every adapted layer (base weight, A, B, c) as its own unit, then the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    from lora_tsd.layer import TSDLinear

    for module in model.modules():
        if isinstance(module, TSDLinear):
            fully_shard(module)
    fully_shard(model)


def _train(cfg: TrainConfig, accelerator: Any, out: Path, ckpt: Path | None, resume: bool,
           started: float) -> dict[str, Any]:
    from transformers import get_linear_schedule_with_warmup

    main_process = accelerator.is_main_process
    task, model, tokenizer, kind, runner = load_for_run(cfg)
    device = accelerator.device
    model.to(device)
    say = accelerator.print

    from lora_tsd.app.assets.download_cache import cache_dir

    backend = make_backend(cfg.method, cfg.tsd_config(head_modules(model, runner)),
                           svd_cache=cache_dir() if use_svd_cache(cfg.svd_cache, device) else None)
    state_meta: dict[str, Any] = {}
    if ckpt is None:
        before = {"test": evaluate_split(model, runner, task.test, cfg, device)}
        say(f"untrained {cfg.model} on {cfg.task}: test {_fmt(before['test'])}")
        model = backend.attach(model)
    else:
        model = backend.load_checkpoint_adapter(model, ckpt / "adapter")
    world = accelerator.num_processes
    sharded = cfg.fsdp and world > 1
    if sharded:
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    first_step = 1
    if ckpt is not None:
        restored = load_trainer_state(ckpt, model, optimizer, scheduler)
        state_meta, first_step = restored.meta, restored.step + 1
        before = state_meta["metrics_before"]
        say(f"resuming {out} from {ckpt.name} (optimizer step {restored.step})")
    elif resume:
        raise ConfigError(f"no checkpoint to resume from in {out / 'checkpoints'}; start the run again")
    train = task.train
    rank = accelerator.process_index
    if ckpt is None and backend.needs_probe:
        # LoRA-Init's gradient estimator (method.md §4): rank by the full-weight gradient accumulated over the
        # first `probe_batches` training micro-batches (each rank its share), then switch; no optimizer step.
        batches = [[train[i] for i in batch_indices(len(train), cfg.batch_size, cfg.seed, k)[rank::world]]
                   for k in range(cfg.probe_batches)]

        def probe_loss(module: torch.nn.Module, batch: list) -> torch.Tensor:
            with autocast(cfg, device):
                return runner.loss(module, batch, device)

        model.train()
        backend.probe(model, batches, probe_loss, optimizer)
        model.zero_grad(set_to_none=True)
        say(f"gradient probe over {cfg.probe_batches} batches: {cfg.method} selected its directions before "
            "training")
    plain_optimizer = optimizer  # checkpoints read the torch optimizer, not accelerate's wrapper
    if not sharded:  # DDP (or nothing) from accelerate; FSDP2 modules were sharded above
        model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    described = backend.describe(core)
    log = MetricsLog(out / "metrics.jsonl")
    if main_process:
        if ckpt is None:
            log.write({"event": "start", "method": cfg.method, **described})
            if backend.needs_probe:
                log.write({"event": "switch", "step": 0, "method": cfg.method, "estimator": "gradient",
                           "probe_batches": cfg.probe_batches})
        else:
            _truncate_log(out / "metrics.jsonl", first_step - 1)
    skipped = int(state_meta.get("skipped_steps", 0))

    model.train()
    bar = tqdm(total=cfg.steps, initial=first_step - 1, desc=f"{cfg.method} r={cfg.r}",
               disable=not (cfg.progress and main_process))
    for opt_step in range(first_step, cfg.steps + 1):
        _fault("step", opt_step)
        total = 0.0
        finite = True
        for micro in range(cfg.grad_accum):
            idx = batch_indices(len(train), cfg.batch_size, cfg.seed, (opt_step - 1) * cfg.grad_accum + micro)
            mine = [train[i] for i in idx[rank::world]]  # every rank takes its share of the global batch
            with autocast(cfg, device):
                loss = runner.loss(model, mine, device) / cfg.grad_accum
            finite = finite and bool(torch.isfinite(loss))
            accelerator.backward(loss)
            total += loss.detach().item()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if sharded
                else accelerator.clip_grad_norm_(params, max_norm))
        finite = finite and bool(torch.isfinite(full(torch.as_tensor(norm))))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if not cfg.skip_nonfinite:
                raise NonFiniteError(f"non-finite loss or gradient at optimizer step {opt_step} (loss {total}); "
                                     f"stopped; the checkpoints in {out / 'checkpoints'} are intact (lower --lr, "
                                     "or --skip-nonfinite to skip such steps)")
            skipped += 1
            if main_process:
                log.write({"event": "skipped", "step": opt_step, "loss": total, "skipped_steps": skipped})
            bar.update(1)
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        switched = backend.step(core, optimizer)
        phase = backend.phase(core)
        lr = scheduler.get_last_lr()[0]
        if main_process:
            log.write({"event": "step", "step": opt_step, "loss": total, "lr": lr, "phase": phase})
        if switched and main_process:
            log.write({"event": "switch", "step": opt_step, "method": cfg.method})
            bar.write(f"switch at optimizer step {opt_step}: {cfg.method} selected its directions")
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", phase=phase)
        bar.update(1)
        if cfg.eval_every and opt_step % cfg.eval_every == 0 and opt_step < cfg.steps:
            metrics = evaluate_split(model, runner, task.validation, cfg, device)
            if main_process:
                log.write({"event": "eval", "step": opt_step, "split": "validation", **metrics})
                bar.write(f"step {opt_step}: validation {_fmt(metrics)}")
        if cfg.checkpoint_every and opt_step % cfg.checkpoint_every == 0:  # every rank: a collective
            save_checkpoint(out, opt_step, core, plain_optimizer, scheduler, fault=_fault,
                            write_adapter=lambda m, d: backend.save_checkpoint_adapter(m, d, cfg.model),
                            extra={"model": cfg.model, "metrics_before": before, "skipped_steps": skipped})
        accelerator.wait_for_everyone()
    bar.close()

    after = {split: evaluate_split(model, runner, getattr(task, split), cfg, device)
             for split in ("validation", "test")}
    summary: dict[str, Any] = {}
    backend.save(core, out, cfg.model, "SEQ_CLS" if kind == "encoder" else "CAUSAL_LM")  # every rank; rank 0 writes
    if main_process:
        for split, metrics in after.items():
            log.write({"event": "eval", "step": cfg.steps, "split": split, **metrics})
        history = [{k: v for k, v in r.items() if k not in ("event", "split")} for r in _read_log(out)
                   if r.get("event") == "eval" and r.get("split") == "validation" and r["step"] < cfg.steps]
        summary = {
            "lora_tsd_version": __version__,
            "config": cfg.to_dict(),
            "model": {"name": cfg.model, "kind": kind, "class": type(core).__name__,
                      "adapted_layers": described["adapted_layers"],
                      "trainable_parameters": described["trainable_parameters"]},
            "data": {"task": task.name, "kind": task.kind, "labels": task.labels, "sizes": task.sizes(),
                     "info": _jsonable(task.info)},
            "switch_step": described["switch_step"],
            "phase": backend.phase(core),
            "metrics_before": before,
            "metrics_after": after,
            "validation_history": history,
            "skipped_steps": skipped,
            "resumed_from": str(ckpt) if ckpt is not None else None,
            "processes": world,
            "wall_time_s": round(time.time() - started, 2),
            "peak_memory_mb": _peak_memory_mb(device),
            "outputs": {"adapter": str(out / "adapter"), "peft": str(out / "peft"),
                        "metrics": str(out / "metrics.jsonl")},
        }
        atomic_write_json(out / "summary.json", summary)
        say(f"trained {cfg.method} r={cfg.r} for {cfg.steps} steps in {summary['wall_time_s']:.0f} s: "
            f"test {_fmt(after['test'])} (untrained {_fmt(before['test'])})")
        say(f"outputs in {out}: adapter/, peft/ (stock PEFT LoRA), summary.json, metrics.jsonl")
    accelerator.wait_for_everyone()
    return summary


def _read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items() if k.startswith("accuracy"))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


# ------------------------------------------------------------------------------------------- eval / export


def read_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    path = Path(run_dir) / RUN_MARKER
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a lora-tsd run folder (no {RUN_MARKER}); pass the output "
                          "directory of `lora-tsd train`")
    return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def evaluate_run(run_dir: str | None, model: str | None = None, task: str | None = None,
                 split: str = "test", adapter: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Score a run's adapter (or, with no run, the bare base model) on a task split."""
    if run_dir is not None:
        cfg = read_run_config(run_dir)
        updates = {k: v for k, v in dict(model=model, task=task, **overrides).items() if v is not None}
        cfg = dataclasses.replace(cfg, **updates)
        adapter = adapter or str(Path(run_dir) / "adapter")
    else:
        if model is None or task is None:
            raise ConfigError("eval needs a run folder, or both --model and --task to score the bare base model")
        cfg = TrainConfig(model=model, task=task, **{k: v for k, v in overrides.items() if v is not None})
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
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite")
    _, base, tokenizer, kind, _ = load_for_run(cfg)
    model = load_any_adapter(base, Path(run_dir) / "adapter")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    external = cfg.method in EXTERNAL_METHODS  # a PEFT model (DoRA): PEFT merges and saves it
    if merged:
        plain = model.merge_and_unload() if external else merge(model)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    elif external:
        model.save_pretrained(tmp)
    else:
        export_peft(model, tmp, base_model_name=cfg.model, task_type="SEQ_CLS" if kind == "encoder" else "CAUSAL_LM")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
