"""Checks of a training run's options beyond their types, in one place: ranges and cross-checks between options
(:func:`check_options`, from :class:`~lora_tsd.app.workflow.config.TrainConfig`) and against the loaded data
(:func:`check_against_data`, before the model loads). Each refusal names the option and the value, and is raised
before anything is written (exit 2 on the command line). Value types are checked by ``DictConfig.check_types``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_tsd.config import short_repr
from lora_tsd.errors import ConfigError

# ``cfg`` below is a TrainConfig, typed Any: config.py calls into this module, so importing it here, even for
# annotations only, would be an import cycle.
__all__ = ["MAX_SEED", "check_against_data", "check_checkpoint_belongs", "check_options", "check_resume_options"]

#: Seeds must fit every generator a run seeds (numpy's legacy seeding takes 32 bits).
MAX_SEED = 2**32 - 1


def check_options(cfg: Any) -> None:
    """Ranges and cross-checks of options that need no data.

    Raises:
        ConfigError: a negative weight decay or clipping norm, a seed outside ``[0, 2**32)``, or a pre-launch
            not shorter than the run for a method that switches after it.
    """
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must be ≥ 0, got {cfg.weight_decay!r}")
    if cfg.max_grad_norm < 0:
        raise ConfigError(f"max_grad_norm must be ≥ 0 (0 disables clipping), got {cfg.max_grad_norm!r}")
    for name in ("seed", "data_seed"):
        value = getattr(cfg, name)
        if not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{name} must be an integer in [0, {MAX_SEED}], got {_bounded(value)}")
    adapter = cfg.adapter
    if cfg.external_method is None and adapter.spec.has_switch and adapter.prelaunch_steps >= cfg.steps:
        raise ConfigError(f"prelaunch_steps (t) = {adapter.prelaunch_steps} must be less than steps = {cfg.steps}: "
                          f"{adapter.method} switches after t steps and would never switch; raise --steps above "
                          f"{adapter.prelaunch_steps} or lower --prelaunch-steps below {cfg.steps}")


def check_against_data(cfg: Any, task: Any) -> None:
    """Options against the loaded task: the micro-batch must fit in the training split.

    Raises:
        ConfigError: ``batch_size`` larger than the training examples.
    """
    n_train = len(task.train)
    if cfg.batch_size > n_train:
        raise ConfigError(f"batch_size = {cfg.batch_size} is larger than the {n_train} training examples of "
                          f"{task.name}; lower --batch-size or use more data")


def _bounded(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


#: Options a ``--resume`` may be given that do not change what the run computes.
RESUME_FREE_OPTIONS = ("output_dir", "progress")
#: Adapter options a checkpoint records (adapter/tsd_config.json) that identify the run it belongs to.
RUN_IDENTITY = ("method", "r", "alpha", "seed", "dash_directions", "init_directions", "selector", "prelaunch_steps")


def check_resume_options(out: Path, saved: dict[str, Any], given: dict[str, Any]) -> None:
    """Refuse a ``--resume`` of the run in ``out`` (saved options ``saved``) given options that differ from them
    (they would be ignored).

    Raises:
        ConfigError: naming each changed option with its saved and given values.
    """
    changed = [f"{name}={short_repr(value)} (saved: {short_repr(saved.get(name))})" for name, value in given.items()
               if name not in RESUME_FREE_OPTIONS and saved.get(name) != value]
    if changed:
        raise ConfigError(f"--resume continues {str(out)!r} with its saved options, so these would be ignored: "
                          f"{'; '.join(changed)}; drop them, or start a new run to change them")


def check_checkpoint_belongs(ckpt: Path, cfg: Any) -> None:
    """Refuse a checkpoint written by another run (another model, method, rank, seed ...), naming the field.

    Raises:
        ConfigError: the checkpoint's recorded model or adapter options differ from the run's.
    """
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("model") not in (None, cfg.model):
        raise ConfigError(f"checkpoint {ckpt} belongs to another run: its model is {short_repr(state['model'])}, "
                          f"this run's is {short_repr(cfg.model)}")
    adapter_file = ckpt / "adapter" / "tsd_config.json"
    if not adapter_file.is_file():  # a PEFT (DoRA) checkpoint: its model above is what it records
        return
    saved = json.loads(adapter_file.read_text(encoding="utf-8")).get("config", {})
    mine = cfg.adapter.with_options(seed=cfg.seed).to_dict()
    for name in RUN_IDENTITY:
        if name in saved and saved[name] != mine.get(name):
            raise ConfigError(f"checkpoint {ckpt} belongs to another run: its {name} is {short_repr(saved[name])}, "
                              f"this run's is {short_repr(mine.get(name))}")
