"""``lora-tsd train --stuck-restarts N``: train a run that ended stuck again with another seed, and keep the better.

A run is *stuck* when its validation never left a one-class prediction after the warm-up (the safeguard's
"stuck" kind, :mod:`~lora_tsd.app.workflow.safeguards`; a run that learned and fell back is not restarted: a lower
lr is its remedy). In the default-recipe protocol (docs/results.md, "The default learning rate") such runs
followed the seed more than the lr: LoRA at lr 1e-3 stayed at the majority class on reasoning-gym circuit_logic
in seed 0 and learned it in seeds 1 and 2, and no candidate lr avoided it on every task and seed. Restarting
bad seeds is the remedy Dodge et al. (2020, "Fine-Tuning Pretrained Language Models: Weight Initializations,
Data Orders, and Early Stopping") measured for BERT fine-tuning.

Restart k trains the same options with seed ``seed + 1000·k`` (the split, ``data_seed``, is kept, so every
attempt is scored on the same validation and test examples). Attempts are ranked as ``--lr auto`` ranks its
trials: not collapsed first, then the validation accuracy each would export; the first attempt wins a tie (no
restart is taken without a gain). The run folder ends up holding the winning attempt, complete (its own config,
log, checkpoints and adapter, so ``eval``, ``export`` and ``--resume`` read one consistent run); the others
are kept in ``<run>/restarts/seed-<seed>/``; ``summary.json`` says which seeds were tried under ``restarts``.
A run that learns costs nothing more; a stuck one costs one more run per restart (a task beyond the model: N+1
runs). Restarts stop at the first attempt that is not stuck.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.app.workflow.outputs import RUN_MARKER
from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError

RESTARTS_DIR = "restarts"
#: Restart k of a run with seed s trains with seed s + SEED_STRIDE·k: far from the small seeds grids use.
SEED_STRIDE = 1000
#: The default number of restarts of a stuck run (``--stuck-restarts``).
DEFAULT_RESTARTS = 1


def restart_seed(seed: int, attempt: int) -> int:
    """The seed of restart ``attempt`` (1, 2, ...) of a run started with ``seed`` (seeds are 32-bit)."""
    return (seed + SEED_STRIDE * attempt) % 2**32


def is_stuck(summary: dict[str, Any]) -> bool:
    """Whether a finished run never left a one-class prediction on validation."""
    collapse = summary.get("collapse")
    return collapse is not None and collapse.get("kind") == "stuck"


def attempt_rank(collapsed: bool, validation: float | None) -> tuple[bool, float]:
    """How runs of one task are ranked wherever one of them is kept (a restart, an ``--lr auto`` trial, the
    protocol's replay of restarts); higher is better: not collapsed, then the validation accuracy."""
    return not collapsed, validation or 0.0


def rank_key(summary: dict[str, Any]) -> tuple[bool, float]:
    """:func:`attempt_rank` of a finished run's summary (its exported validation accuracy)."""
    return attempt_rank(summary.get("collapse") is not None, summary.get("exported", {}).get("validation"))


def check_restarts(restarts: int) -> None:
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ConfigError(f"--stuck-restarts must be an integer ≥ 0, got {restarts!r}")


def train_with_restarts(cfg: TrainConfig, restarts: int, first: Callable[[TrainConfig], dict[str, Any]],
                        train: Callable[[TrainConfig], dict[str, Any]] | None = None,
                        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``first(cfg)`` (the run as asked: a new run, a resume or an lr search), then up to ``restarts``
    fresh runs of its saved options with other seeds while the best so far is stuck; returns the kept run's
    summary.

    Every process calls this (each attempt is a complete :func:`~lora_tsd.app.workflow.run.run_training`);
    only the main process moves folders, the others read the summaries it wrote.
    """
    check_restarts(restarts)
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from lora_tsd.app.workflow.run import run_training

    train = train or run_training
    summary = first(cfg)
    if restarts == 0:
        return summary
    # The run has set up the processes by now (an earlier PartialState would set them up without the run's
    # options); the main process names the folder the run chose.
    state = PartialState()
    chosen = [summary["config"]["output_dir"] if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(chosen)
    out = Path(str(chosen[0]))
    summary = _read(summary, out)
    kept = TrainConfig.from_dict(summary["config"])
    attempts = [_attempt(summary)]
    for k in range(1, restarts + 1):
        if not is_stuck(summary):
            break
        seed = restart_seed(kept.seed, k)
        folder = out / RESTARTS_DIR / f"seed-{seed}"
        if state.is_main_process:
            say(f"restart {k} of {restarts}: the run never left a one-class prediction; training it again with "
                f"seed {seed} (the same options and data split; --stuck-restarts 0 turns this off)")
        restart = _read(train(kept.with_options(seed=seed, output_dir=str(folder), overwrite=True)), folder)
        attempts.append(_attempt(restart))
        if rank_key(restart) > rank_key(summary):
            if state.is_main_process:
                _promote(out, folder, previous_seed=summary["config"]["seed"])
            state.wait_for_everyone()
            summary = _read({}, out)
    chosen = summary["config"]["seed"]
    for attempt in attempts:  # where each attempt lies now
        attempt["folder"] = str(out if attempt["seed"] == chosen else out / RESTARTS_DIR / f"seed-{attempt['seed']}")
    if len(attempts) > 1:
        summary["restarts"] = {"max": restarts, "attempts": attempts, "exported_seed": chosen}
        if state.is_main_process:
            atomic_write_json(out / "summary.json", summary)
            say(_verdict(attempts, chosen, out))
        state.wait_for_everyone()
    return summary


def _read(summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A run's summary: the one returned (main process), else the one the main process wrote."""
    if summary:
        return summary
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def _attempt(summary: dict[str, Any]) -> dict[str, Any]:
    """One attempt's record for ``summary.json`` (its folder is added once the kept one is known)."""
    collapse = summary.get("collapse")
    return {"seed": summary["config"]["seed"], "validation_accuracy": summary["exported"]["validation"],
            "collapse": None if collapse is None else collapse["kind"]}


def _promote(out: Path, folder: Path, previous_seed: int) -> None:
    """Make the attempt in ``folder`` (inside ``out``) the run folder's content; move the run that was there to
    ``out/restarts/seed-<previous_seed>``. Each run's saved ``output_dir`` is rewritten to where it now lies."""
    aside = out / RESTARTS_DIR / f"seed-{previous_seed}"
    aside.mkdir()
    for entry in out.iterdir():
        if entry.name != RESTARTS_DIR:
            os.replace(entry, aside / entry.name)
    for entry in folder.iterdir():
        os.replace(entry, out / entry.name)
    folder.rmdir()
    _relocate(aside, was=out)
    _relocate(out, was=folder)


def _relocate(folder: Path, was: Path) -> None:
    """Rewrite the paths a moved run saved (its ``output_dir``, its outputs) from ``was`` to ``folder``."""
    def moved(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str) and (value == str(was) or value.startswith(str(was) + os.sep)):
            return str(folder) + value[len(str(was)):]
        return value

    for name in (RUN_MARKER, "summary.json"):
        path = folder / name
        atomic_write_json(path, moved(json.loads(path.read_text(encoding="utf-8"))))


def _verdict(attempts: list[dict[str, Any]], chosen: int, out: Path) -> str:
    def described(a: dict[str, Any]) -> str:
        accuracy = a["validation_accuracy"]
        shown = "n/a" if accuracy is None else f"{100 * accuracy:.1f}%"
        return f"seed {a['seed']} {shown}{' (' + a['collapse'] + ')' if a['collapse'] else ''}"

    tried = ", ".join(described(a) for a in attempts)
    others = out / RESTARTS_DIR
    if chosen == attempts[0]["seed"]:
        return (f"restarts: {tried} on validation; no restart did better, so the run exported is the first "
                f"(seed {chosen}); the restarts are kept in {others}")
    return (f"restarts: {tried} on validation; exported the run of seed {chosen} (now in {out}); the other "
            f"attempts are kept in {others}")
