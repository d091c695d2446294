"""``lora-tsd train --lr auto``: a short sweep of candidate learning rates on validation, then the full run at the
best one.

Each candidate is an ordinary training run (:func:`~lora_tsd.app.workflow.run.run_training`, the entry point the
compare grid trains its cells with) of ``search_steps`` optimizer steps (default a quarter of the run's), with the
warm-up scaled alike. Trials are ranked by: no collapse (:mod:`~lora_tsd.app.workflow.safeguards`) first, then the
validation accuracy the trial would export (its best validation checkpoint), then the lower lr on a tie (the safer
one). Test data is never looked at. The cost is ``len(candidates) × search_steps`` extra optimizer steps plus each
trial's model load and evaluations: with the defaults (3 candidates × steps//4) 0.75 × the run's optimizer steps
again. Measured on the tiny BERT of tests/app/test_safeguards.py (2 candidates × 60 steps, 2 CPU cores shared):
54.5 s of trials before a 60-step run of about 31 s. It is printed, and recorded in the run's ``summary.json`` under
``lr_search``; the trial runs are kept in ``<output_dir>/lr_search/``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tsd.app.formats import slug
from lora_tsd.app.workflow.config import LR_CANDIDATES, TrainConfig
from lora_tsd.app.workflow.outputs import check_output_dir, new_run_folder
from lora_tsd.app.workflow.restarts import attempt_rank
from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError

TRIALS_DIR = "lr_search"


@dataclass
class Trial:
    lr: float
    validation_accuracy: float | None
    collapsed: bool
    wall_time_s: float

    def rank_key(self) -> tuple[bool, float, float]:
        return (*attempt_rank(self.collapsed, self.validation_accuracy), -self.lr)  # then the lower lr

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "validation_accuracy": self.validation_accuracy, "collapsed": self.collapsed,
                "wall_time_s": self.wall_time_s}


def default_search_steps(steps: int) -> int:
    """Optimizer steps of one trial: a quarter of the full run's, at least 1."""
    return max(1, steps // 4)


def trial_config(cfg: TrainConfig, lr: float, steps: int, folder: Path) -> TrainConfig:
    """The short run of candidate ``lr``: same model, task, method and seed; warm-up scaled to the trial's length;
    no checkpoints, no progress bar."""
    warmup = round(cfg.warmup_steps * steps / cfg.steps)
    return cfg.with_options(lr=lr, steps=steps, warmup_steps=warmup, output_dir=str(folder), overwrite=False,
                            checkpoint_every=0, progress=False)


def check_candidates(candidates: Sequence[float], search_steps: int | None) -> None:
    if not candidates:
        raise ConfigError("--lr-candidates needs at least one learning rate")
    bad = [c for c in candidates if not c > 0]
    if bad:
        raise ConfigError(f"--lr-candidates must be positive, got {bad[0]!r}")
    if len(set(candidates)) < len(candidates):
        raise ConfigError(f"--lr-candidates lists a learning rate twice: {' '.join(f'{c:g}' for c in candidates)}")
    if search_steps is not None and search_steps < 1:
        raise ConfigError(f"--lr-search-steps must be a positive integer, got {search_steps!r}")


def train_with_lr_search(cfg: TrainConfig, candidates: Sequence[float] = LR_CANDIDATES,
                         search_steps: int | None = None, train: Callable[..., dict[str, Any]] | None = None,
                         say: Callable[[str], None] = print) -> dict[str, Any]:
    """Try every candidate lr for ``search_steps`` steps, then train ``cfg`` at the best; returns the full run's
    summary (with ``lr_search``: candidates, trials, the choice and the cost)."""
    if train is None:
        from lora_tsd.app.workflow.run import run_training as train
    check_candidates(candidates, search_steps)
    steps = search_steps or default_search_steps(cfg.steps)
    if cfg.output_dir is None:  # the default folder, named before the trials create anything beside it
        cfg = cfg.with_options(output_dir=str(new_run_folder(cfg)))
    out = Path(str(cfg.output_dir))
    check_output_dir(out, cfg.overwrite)  # refuse before spending the sweep
    out.parent.mkdir(parents=True, exist_ok=True)
    trials_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.lr-search-", dir=out.parent))
    try:
        started = time.time()
        trials = [_run_trial(cfg, lr, steps, trials_root, train) for lr in candidates]
        searched_s = round(time.time() - started, 2)
        best = max(trials, key=Trial.rank_key)
        say(f"--lr auto: {len(trials)} trials x {steps} steps ({len(trials) * steps} optimizer steps, "
            f"{searched_s:.0f} s) on validation: "
            + ", ".join(f"lr {t.lr:g} {_describe(t)}" for t in trials) + f"; training at lr {best.lr:g}")
        summary = train(cfg.with_options(lr=best.lr))
        shutil.move(str(trials_root), str(out / TRIALS_DIR))
    except BaseException:
        shutil.rmtree(trials_root, ignore_errors=True)  # the sweep's own temporary folder only
        raise
    summary["lr_search"] = {"candidates": list(candidates), "steps_per_trial": steps,
                            "trials": [t.to_dict() for t in trials], "chosen_lr": best.lr,
                            "total_steps": len(trials) * steps, "wall_time_s": searched_s,
                            "trial_runs": str(out / TRIALS_DIR)}
    if summary.get("config") is not None:  # rank 0 (other ranks get an empty summary)
        atomic_write_json(out / "summary.json", summary)
    return summary


def _run_trial(cfg: TrainConfig, lr: float, steps: int, root: Path, train: Callable[..., Any]) -> Trial:
    started = time.time()
    summary = train(trial_config(cfg, lr, steps, root / slug(f"lr-{lr:g}")))
    if not summary:  # not rank 0: read what rank 0 wrote
        summary = json.loads((root / slug(f"lr-{lr:g}") / "summary.json").read_text(encoding="utf-8"))
    return Trial(lr=lr, validation_accuracy=summary["exported"]["validation"],
                 collapsed=summary["collapse"] is not None, wall_time_s=round(time.time() - started, 2))


def _describe(trial: Trial) -> str:
    accuracy = "n/a" if trial.validation_accuracy is None else f"{100 * trial.validation_accuracy:.1f}%"
    return f"{accuracy}{' (collapsed)' if trial.collapsed else ''}"
