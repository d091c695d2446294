"""The training loop of a run, in four stages: :func:`setup` (load, attach or restore, optimizer, probe),
:func:`optimizer_step` (micro-batches, clipping, the update and the method's step count), :func:`after_step`
(log, evaluate, checkpoint, callbacks) and :func:`finalize` (final evaluation, outputs, summary).

The switch counts optimizer steps (method.md §2); data order, dropout and every state a resume needs are
deterministic functions of the step, so a resumed run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tsd import __version__
from lora_tsd.app.workflow.acceleration import prepare_model, quantization_summary
from lora_tsd.app.workflow.backends import make_backend
from lora_tsd.app.workflow.best_checkpoint import BEST_METRIC, BEST_STATE, BestCheckpoint
from lora_tsd.app.workflow.callbacks import CallbackList
from lora_tsd.app.workflow.checkpoint import load_trainer_state, save_checkpoint
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.app.workflow.loading import (
    autocast,
    batch_indices,
    evaluate_split,
    format_metrics,
    head_modules,
    load_for_run,
)
from lora_tsd.app.workflow.outputs import METRICS_FILE, MetricsLog
from lora_tsd.app.workflow.safeguards import CollapseMonitor
from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError, NonFiniteError
from lora_tsd.sharding import full


@dataclass
class LoopState:
    """Everything the stages of one run share (callbacks read it; only the stages write it)."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    callbacks: CallbackList
    started: float
    task: Any = None
    runner: Any = None
    kind: str = ""
    backend: Any = None
    model: torch.nn.Module | None = None  # as prepared by accelerate (DDP-wrapped in a multi-process run)
    core: torch.nn.Module | None = None  # the unwrapped model
    optimizer: Any = None
    plain_optimizer: Any = None  # the torch optimizer (checkpoints read it, not accelerate's wrapper)
    scheduler: Any = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    sharded: bool = False
    before: dict[str, Any] = field(default_factory=dict)
    first_step: int = 1
    skipped: int = 0
    resumed_from: Path | None = None
    log: MetricsLog | None = None
    bar: Any = None
    best: BestCheckpoint | None = None  # None: --no-best-checkpoint (or an FSDP2-sharded run)
    monitor: CollapseMonitor | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        self.accelerator.print(message)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: shard every adapted layer (base weight, A, B, c) as its own unit, then the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    from lora_tsd.layer import TSDLinear

    for module in model.modules():
        if isinstance(module, TSDLinear):
            fully_shard(module)
    fully_shard(model)


# ------------------------------------------------------------------------------------------------- setup


def setup(state: LoopState, ckpt: Path | None, svd_cache: Path | None, backend: Any = None,
          loader: Callable[[TrainConfig], tuple[Any, torch.nn.Module, Any, str, Any]] | None = None) -> None:
    """Load task and model (``loader``, default :func:`load_for_run`), attach (or restore from ``ckpt``), build the
    optimizer, probe, and prepare."""
    cfg = state.cfg
    state.task, model, _, state.kind, state.runner = (loader or load_for_run)(cfg)
    model.to(state.device)
    state.backend = backend or make_backend(cfg.method, cfg.tsd_config(head_modules(model, state.runner)),
                                            svd_cache=svd_cache)
    if ckpt is None:
        state.before = {"test": evaluate_split(model, state.runner, state.task.test, cfg, state.device)}
        state.say(f"untrained {cfg.model} on {cfg.task}: test {format_metrics(state.before['test'])}")
        model = state.backend.attach(model)
    else:
        model = state.backend.load_checkpoint_adapter(model, ckpt / "adapter")
    state.sharded = cfg.fsdp and state.accelerator.num_processes > 1
    if state.sharded:
        shard_model(model)
    _build_optimizer(state, model)
    use_best = cfg.best_checkpoint and not state.sharded  # a sharded adapter is not restored in place (yet)
    state.best = BestCheckpoint(state.out / BEST_STATE) if use_best else None
    state.monitor = CollapseMonitor(cfg.lr, cfg.warmup_steps, cfg.steps)
    if ckpt is not None:
        restored = load_trainer_state(ckpt, model, state.optimizer, state.scheduler)
        if use_best:
            state.best = BestCheckpoint.from_checkpoint(state.out / BEST_STATE, restored.meta.get("best"),
                                                        restored.extra_tensors, state.main_process)
        state.before = restored.meta["metrics_before"]
        state.skipped = int(restored.meta.get("skipped_steps", 0))
        state.first_step, state.resumed_from = restored.step + 1, ckpt
        state.say(f"resuming {state.out} from {ckpt.name} (optimizer step {restored.step})")
    elif state.backend.needs_probe:
        _probe(state, model)
    state.plain_optimizer = state.optimizer
    prepare_model(model, compile=cfg.compile, gradient_checkpointing=cfg.gradient_checkpointing)
    if not state.sharded:  # DDP (or nothing) from accelerate; FSDP2 modules were sharded above
        model, state.optimizer = state.accelerator.prepare(model, state.optimizer)
    state.model, state.core = model, state.accelerator.unwrap_model(model)
    _open_log(state)


def _build_optimizer(state: LoopState, model: torch.nn.Module) -> None:
    from transformers import get_linear_schedule_with_warmup

    cfg = state.cfg
    state.params = [p for p in model.parameters() if p.requires_grad]
    state.optimizer = torch.optim.AdamW(state.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state.scheduler = get_linear_schedule_with_warmup(state.optimizer, cfg.warmup_steps, cfg.steps)


def _micro_batch(state: LoopState, micro_step: int) -> list[dict[str, Any]]:
    """This process's share of global micro-batch ``micro_step``."""
    train = state.task.train
    idx = batch_indices(len(train), state.cfg.batch_size, state.cfg.seed, micro_step)
    return [train[i] for i in idx[state.accelerator.process_index::state.accelerator.num_processes]]


def _probe(state: LoopState, model: torch.nn.Module) -> None:
    """LoRA-Init's gradient estimator (method.md §4): rank by the full-weight gradient accumulated over the first
    ``probe_batches`` training micro-batches (each rank its share), then switch; no optimizer step."""
    cfg = state.cfg
    batches = [_micro_batch(state, k) for k in range(cfg.probe_batches)]

    def probe_loss(module: torch.nn.Module, batch: list) -> torch.Tensor:
        with autocast(cfg, state.device):
            return state.runner.loss(module, batch, state.device)

    model.train()
    state.backend.probe(model, batches, probe_loss, state.optimizer, cfg.probe_groups)
    model.zero_grad(set_to_none=True)
    state.say(f"gradient probe over {cfg.probe_batches} batches: {cfg.method} selected its directions before "
              "training")


def _open_log(state: LoopState) -> None:
    state.log = MetricsLog(state.out / METRICS_FILE)
    if not state.main_process:
        return
    if state.resumed_from is not None:
        state.log.truncate_after(state.first_step - 1)
        state.monitor.replay(state.log.read())
        return
    state.log.write({"event": "start", "method": state.cfg.method, **state.backend.describe(state.core)})
    if state.backend.needs_probe:
        state.log.write({"event": "switch", "step": 0, "method": state.cfg.method, "estimator": "gradient",
                         "probe_batches": state.cfg.probe_batches})


# ------------------------------------------------------------------------------------------------- steps


@dataclass
class StepOutcome:
    loss: float
    applied: bool  # False: a non-finite step was skipped (--skip-nonfinite)
    switched: bool = False


def optimizer_step(state: LoopState, step: int) -> StepOutcome:
    """One optimizer step: ``grad_accum`` micro-batches, clipping, the update, and the method's step count."""
    cfg = state.cfg
    total, finite = 0.0, True
    for micro in range(cfg.grad_accum):
        batch = _micro_batch(state, (step - 1) * cfg.grad_accum + micro)
        with autocast(cfg, state.device):
            loss = state.runner.loss(state.model, batch, state.device) / cfg.grad_accum
        finite = finite and bool(torch.isfinite(loss))
        state.accelerator.backward(loss)
        total += loss.detach().item()
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = (torch.nn.utils.clip_grad_norm_(state.params, max_norm) if state.sharded
            else state.accelerator.clip_grad_norm_(state.params, max_norm))
    finite = finite and bool(torch.isfinite(full(torch.as_tensor(norm))))
    if not finite:
        state.optimizer.zero_grad(set_to_none=True)
        if not cfg.skip_nonfinite:
            raise NonFiniteError(f"non-finite loss or gradient at optimizer step {step} (loss {total}); stopped; "
                                 f"the checkpoints in {state.out / 'checkpoints'} are intact (lower --lr, or "
                                 "--skip-nonfinite to skip such steps)")
        state.skipped += 1
        return StepOutcome(total, applied=False)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(total, applied=True, switched=state.backend.step(state.core, state.optimizer))


def after_step(state: LoopState, step: int, outcome: StepOutcome) -> None:
    """Log the step, report a switch, evaluate and checkpoint when due, then the callbacks."""
    cfg, log = state.cfg, state.log
    if not outcome.applied:
        if state.main_process:
            log.write({"event": "skipped", "step": step, "loss": outcome.loss, "skipped_steps": state.skipped})
        state.bar.update(1)
        return
    phase, lr = state.backend.phase(state.core), state.scheduler.get_last_lr()[0]
    state.monitor.add_loss(step, outcome.loss)
    if state.main_process:
        log.write({"event": "step", "step": step, "loss": outcome.loss, "lr": lr, "phase": phase})
        if outcome.switched:
            log.write({"event": "switch", "step": step, "method": cfg.method})
    if outcome.switched and state.main_process:
        state.bar.write(f"switch at optimizer step {step}: {cfg.method} selected its directions")
    state.bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}", phase=phase)
    state.bar.update(1)
    if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps:
        metrics = evaluate_split(state.model, state.runner, state.task.validation, cfg, state.device)
        if state.main_process:
            log.write({"event": "eval", "step": step, "split": "validation", **metrics})
        _watch_validation(state, step, metrics, state.bar.write)
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:  # every rank: a collective
        best = state.best or BestCheckpoint(state.out / BEST_STATE)
        save_checkpoint(state.out, step, state.core, state.plain_optimizer, state.scheduler,
                        on_partial=lambda s: state.callbacks.on_checkpoint_partial(state, s),
                        write_adapter=lambda m, d: state.backend.save_checkpoint_adapter(m, d, cfg.model),
                        extra={"model": cfg.model, "metrics_before": state.before, "skipped_steps": state.skipped,
                               "best": best.checkpoint_meta()},
                        extra_tensors=best.checkpoint_tensors())
    state.callbacks.on_step_end(state, step)
    state.accelerator.wait_for_everyone()


def _watch_validation(state: LoopState, step: int, metrics: dict[str, Any], say: Callable[[str], None]) -> None:
    """After a validation evaluation: print it, keep the best state, and warn (once) of a collapse."""
    kept = state.best is not None and state.best.consider(
        step, metrics, lambda: state.backend.trained_state(state.core), state.main_process)
    if state.main_process:
        say(f"step {step}: validation {format_metrics(metrics)}{' (best so far)' if kept else ''}")
    warning = state.monitor.check(step, metrics)
    if warning is not None and state.main_process:
        say(warning)


def train_steps(state: LoopState) -> None:
    """Optimizer steps ``first_step .. steps`` with a progress bar."""
    from tqdm.auto import tqdm

    cfg = state.cfg
    state.model.train()
    state.bar = tqdm(total=cfg.steps, initial=state.first_step - 1, desc=f"{cfg.method} r={cfg.adapter.r}",
                     disable=not (cfg.progress and state.main_process))
    state.callbacks.on_train_start(state)
    for step in range(state.first_step, cfg.steps + 1):
        state.callbacks.on_step_start(state, step)
        after_step(state, step, optimizer_step(state, step))
    state.bar.close()


# ------------------------------------------------------------------------------------------------- the end


def finalize(state: LoopState) -> dict[str, Any]:
    """Evaluate on validation, restore the best validation state, write the adapter and its PEFT export and a
    ``summary.json`` saying ``"finished": false``; then evaluate on test and finish the summary. A run killed in
    its final test evaluation keeps its adapter, and its summary says the evaluation did not finish."""
    cfg, out = state.cfg, state.out
    validation = evaluate_split(state.model, state.runner, state.task.validation, cfg, state.device)
    if state.main_process:
        state.log.write({"event": "eval", "step": cfg.steps, "split": "validation", **validation})
    _watch_validation(state, cfg.steps, validation, state.say)
    after, exported = {"validation": validation}, _restore_best(state, validation)
    task_type = "SEQ_CLS" if state.kind == "encoder" else "CAUSAL_LM"
    state.backend.save(state.core, out, cfg.model, task_type)  # every rank; rank 0 writes
    summary: dict[str, Any] = {}
    if state.main_process:
        summary = _summary(state, after, exported, finished=False)
        atomic_write_json(out / "summary.json", summary)
    state.callbacks.on_final_test_evaluation(state)
    after["test"] = evaluate_split(state.model, state.runner, state.task.test, cfg, state.device)
    if state.main_process:
        state.log.write({"event": "eval", "step": cfg.steps, "split": "test", **after["test"]})
        summary = _summary(state, after, exported, finished=True)
        atomic_write_json(out / "summary.json", summary)
        state.say(f"trained {cfg.method} r={cfg.adapter.r} for {cfg.steps} steps in {summary['wall_time_s']:.0f} s: "
                  f"validation {format_metrics(after['validation'])} (step {exported['step']}), "
                  f"test {format_metrics(after['test'])} (untrained {format_metrics(state.before['test'])})")
        warning = state.monitor.final_message(exported["step"])
        if warning is not None:
            state.say(warning)
        if "peft" in summary["outputs"]:
            state.say(f"outputs in {out}: adapter/, peft/ (stock PEFT LoRA), summary.json, metrics.jsonl")
    state.callbacks.on_train_end(state, summary)
    state.accelerator.wait_for_everyone()
    return summary


def _restore_best(state: LoopState, final_validation: dict[str, Any]) -> dict[str, Any]:
    """Put the best validation state back into the model (when it is not the last step's); what is exported."""
    cfg, best = state.cfg, state.best
    if best is None or best.step is None:
        reason = ("final step (--no-best-checkpoint)" if not cfg.best_checkpoint else
                  "final step (no best checkpoint for an FSDP2-sharded adapter)" if state.sharded else
                  "final step (no best state kept)")
        return {"step": cfg.steps, "metric": BEST_METRIC, "validation": final_validation.get(BEST_METRIC),
                "reason": reason}
    if best.step < cfg.steps:
        state.backend.restore_trained_state(state.core, best.tensors)
        state.say(f"restored the best validation checkpoint: step {best.step}, validation "
                  f"{format_metrics(best.metrics)} (step {cfg.steps}: {format_metrics(final_validation)})")
        final_validation.clear()
        final_validation.update(best.metrics)
    else:
        state.say(f"the last step is the best validation checkpoint: step {best.step}, validation "
                  f"{format_metrics(best.metrics)}")
    return {"step": best.step, "metric": BEST_METRIC, "validation": best.metric, "reason": "best validation"}


def _summary(state: LoopState, after: dict[str, Any], exported: dict[str, Any], finished: bool) -> dict[str, Any]:
    cfg, task, out = state.cfg, state.task, state.out
    described = state.backend.describe(state.core)
    history = [{k: v for k, v in r.items() if k not in ("event", "split")} for r in state.log.read()
               if r.get("event") == "eval" and r.get("split") == "validation" and r["step"] < cfg.steps]
    return {
        "lora_tsd_version": __version__,
        "config": cfg.to_dict(),
        "model": {"name": cfg.model, "kind": state.kind, "class": type(state.core).__name__,
                  "adapted_layers": described["adapted_layers"],
                  "trainable_parameters": described["trainable_parameters"]},
        "data": {"task": task.name, "kind": task.kind, "labels": task.labels, "sizes": task.sizes(),
                 "info": json.loads(json.dumps(task.info, default=str))},
        "switch_step": described["switch_step"],
        "phase": state.backend.phase(state.core),
        "metrics_before": state.before,
        "metrics_after": dict(after),
        "finished": finished,
        "exported": exported,
        "collapse": state.monitor.collapse,
        "validation_history": history,
        "skipped_steps": state.skipped,
        "resumed_from": str(state.resumed_from) if state.resumed_from is not None else None,
        "processes": state.accelerator.num_processes,
        "wall_time_s": round(time.time() - state.started, 2),
        "peak_memory_mb": _peak_memory_mb(state.device),
        **({"quantization": quantization_summary(state.core, cfg.quantize)} if cfg.quantize else {}),
        "outputs": {**state.backend.outputs(out), "metrics": str(out / METRICS_FILE)},
    }


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def check_resumable(ckpt: Path | None, out: Path) -> None:
    if ckpt is None:
        raise ConfigError(f"no checkpoint to resume from in {out / 'checkpoints'}; start the run again with the same "
                          "options and --overwrite (it replaces this run folder, which lora-tsd created)")
