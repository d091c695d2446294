"""What a run loads before training: the task, the model and its tokenizer, and the runner that turns the
task's examples into losses and metrics; plus evaluation of a split."""

from __future__ import annotations

from typing import Any

import torch

from lora_tsd.app.workflow.acceleration import quantization_config
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.app.workflow.runners import EncoderClassifier, make_runner
from lora_tsd.quantized import keep_trainable_layout


def load_for_run(cfg: TrainConfig) -> tuple[Any, torch.nn.Module, Any, str, Any]:
    """Task, model, tokenizer, model kind and runner of a run (used by train, eval and export alike).

    The model name is resolved first and the (model kind, task kind) pair checked before any weights load,
    so a typo or an impossible pair fails in seconds.
    """
    from transformers import AutoConfig

    from lora_tsd.app.assets.models import checked_model_source, detect_model_kind, load_model
    from lora_tsd.app.assets.tasks import load_task
    from lora_tsd.app.workflow.runners import check_pair
    from lora_tsd.app.workflow.validation import check_against_data

    source = checked_model_source(cfg.model, cfg.trust_remote_code)
    task = load_task(cfg.task, seed=cfg.data_seed, max_train=cfg.max_train, max_eval=cfg.max_eval)
    check_against_data(cfg, task)
    kind = detect_model_kind(AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code))
    check_pair(kind, task)
    torch.manual_seed(cfg.seed)  # the classification head's initialization
    num_labels = len(task.labels) if task.kind == "classification" else None
    model, tokenizer, kind = load_model(source, kind=kind, num_labels=num_labels,
                                        trust_remote_code=cfg.trust_remote_code,
                                        quantization_config=quantization_config(cfg.quantize))
    if cfg.quantize:  # gradients must flow through the frozen quantized layers too (quantized.py)
        for module in model.modules():
            keep_trainable_layout(module)
    runner = make_runner(kind, task, tokenizer, cfg.max_length)
    return task, model, tokenizer, kind, runner


def head_modules(model: torch.nn.Module, runner: Any) -> list[str]:
    """The task head an encoder classifier trains in full (saved with the adapter)."""
    if not isinstance(runner, EncoderClassifier):
        return []
    return [name for name in runner.head_names if hasattr(model, name)]


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def evaluate_split(model: torch.nn.Module, runner: Any, examples: list[dict[str, Any]], cfg: TrainConfig,
                   device: torch.device) -> dict[str, float]:
    """The runner's metrics on ``examples``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    with autocast(cfg, device):
        metrics = runner.evaluate(model, examples, cfg.eval_batch_size, device)
    model.train(was_training)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """``accuracy 84.6%, ...``: the accuracy-type metrics of an evaluation, for the console."""
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items() if k.startswith("accuracy"))


def batch_indices(n_examples: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Example indices of global micro-batch ``micro_step``: seeded per-epoch permutations, no state, so a resumed
    run reads exactly the batches an uninterrupted one would."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, pos = divmod(micro_step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[pos * batch_size:(pos + 1) * batch_size].tolist()
