"""Warnings, at the start of a run, for valid options that will not do what they seem to ask.

The config's own validation refuses impossible values; these options are legal but surprising (a method that
never reaches its switch, a warm-up that never decays, a split smaller than a batch). Each warning names the
option and the fix, so that a user learns it before the run, not from its summary.
"""

from __future__ import annotations

import sys
from typing import Any

from lora_tsd.app.workflow.callbacks import LoopCallback
from lora_tsd.app.workflow.config import TrainConfig

WARNING_PREFIX = "lora-tsd train: warning: "


def option_warnings(cfg: TrainConfig) -> list[str]:
    """What the options alone say the run will not do (no data needed)."""
    warnings = []
    steps = cfg.steps
    # A method that would never switch (prelaunch_steps >= steps) is refused by validation.check_options.
    if cfg.warmup_steps >= steps:
        warnings.append(
            f"--warmup-steps {cfg.warmup_steps} is not below --steps {steps}: the learning rate never decays (the "
            f"run ends during the warm-up); lower --warmup-steps below {steps} (e.g. {max(steps // 10, 0)})")
    if cfg.eval_interval > steps:
        warnings.append(
            f"--eval-every {cfg.eval_every} is beyond --steps {steps}: no validation during training, only at the "
            f"end; lower --eval-every to at most {steps} or leave it unset (every steps//10)")
    if cfg.checkpoint_every > steps:
        warnings.append(
            f"--checkpoint-every {cfg.checkpoint_every} is beyond --steps {steps}: no checkpoint is ever saved, so "
            f"--resume has nothing to resume; lower --checkpoint-every to at most {steps}")
    if cfg.max_train is not None and cfg.max_train < cfg.batch_size:
        warnings.append(
            f"--max-train {cfg.max_train} is smaller than --batch-size {cfg.batch_size}: every batch repeats "
            f"examples; raise --max-train or lower --batch-size to at most {cfg.max_train}")
    return warnings


def data_warnings(cfg: TrainConfig, train_size: int, validation_size: int) -> list[str]:
    """What the loaded splits say the run will not do."""
    warnings = []
    # A training split smaller than a batch is refused by validation.check_against_data before this runs.
    if validation_size == 0 and cfg.eval_interval > 0:
        warnings.append(
            f"the validation split is empty, so --eval-every {cfg.eval_interval} has nothing to score; give more "
            "data or a validation file, or pass --eval-every 0")
    return warnings


def emit(warnings: list[str]) -> None:
    """Print each warning as one line on stderr."""
    for text in warnings:
        print(WARNING_PREFIX + text, file=sys.stderr, flush=True)


class DataPreflight(LoopCallback):
    """Warns about the loaded splits once the task is loaded, before the first optimizer step (main process)."""

    def on_train_start(self, state: Any) -> None:
        if state.accelerator.is_main_process and state.resumed_from is None:
            emit(data_warnings(state.cfg, len(state.task.train), len(state.task.validation)))
