"""Training a grid: every missing run, the learning-rate sweep first, then the other seeds at the chosen lr;
finished runs are skipped, a killed run resumes from its checkpoint, a run that raises is recorded as failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tsd.app.experiments.grid import GridSpec, RunKey, groups, make_config, tuning_keys
from lora_tsd.app.experiments.grid_results import choose_lrs, collect_runs
from lora_tsd.app.experiments.grid_state import (
    FAILED_FILE,
    carried_run,
    check_settings,
    load_reused,
    resumable_checkpoint,
    run_status,
)
from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError, TSDError


@dataclass
class GridProgress:
    trained: int = 0
    skipped: int = 0
    failed: int = 0
    pending: int = 0
    seconds: float = 0.0


class _Executor:
    def __init__(self, spec: GridSpec, out: Path, train: Callable[..., Any], retry_failed: bool,
                 max_runs: int | None, say: Callable[[str], None], shard: tuple[int, int] = (0, 1)) -> None:
        self.spec, self.out, self.train, self.retry_failed = spec, out, train, retry_failed
        self.max_runs, self.say, self.shard = max_runs, say, shard
        self.progress = GridProgress()
        self.seen: set[RunKey] = set()
        self.reused = load_reused(out)

    def status(self, key: RunKey) -> str:
        carried = carried_run(key, self.out, self.reused)
        return carried["status"] if carried is not None else run_status(key.path(self.out))

    def budget_left(self) -> bool:
        return self.max_runs is None or self.progress.trained < self.max_runs

    def ensure(self, key: RunKey, index: int, total: int) -> str:
        if key in self.seen:
            return self.status(key)
        self.seen.add(key)
        path = key.path(self.out)
        cfg = make_config(self.spec, key, self.out)
        status = self.status(key)
        if status == "done":
            if (path / "summary.json").is_file():  # reused runs were checked when they were carried in
                check_settings(path, cfg)
            self.progress.skipped += 1
            return status
        if status == "failed" and not self.retry_failed:
            self.progress.skipped += 1
            return status
        if not self.budget_left() or (index - 1) % self.shard[1] != self.shard[0]:
            self.progress.pending += 1
            return status
        checkpoint = resumable_checkpoint(path, cfg) if status == "partial" else None
        # Resume from exactly the checkpoint announced (not a re-search); a fresh run passes cfg alone.
        resume = {} if checkpoint is None else {"resume": True, "resume_from": str(checkpoint)}
        action = "train" if checkpoint is None else "resume"
        where = "" if checkpoint is None else f" from {checkpoint.name}"
        self.say(f"[{index}/{total}] {action} {key.describe()}{where}")
        (path / FAILED_FILE).unlink(missing_ok=True)
        started = time.time()
        try:
            self.train(cfg, **resume)
        except TSDError as err:  # e.g. NonFiniteError at a too-high lr: recorded, the grid goes on
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path / FAILED_FILE, {"error": str(err), "type": type(err).__name__})
            self.progress.failed += 1
            self.say(f"    failed: {type(err).__name__}: {err}")
        self.progress.trained += 1
        self.progress.seconds += time.time() - started
        return self.status(key)


def run_grid(spec: GridSpec, out: str | Path, train: Callable[..., Any] | None = None, retry_failed: bool = False,
             max_runs: int | None = None, say: Callable[[str], None] = print,
             shard: tuple[int, int] = (0, 1)) -> GridProgress:
    """Train every missing run of the grid (sweep first, then the other seeds at the chosen lr).

    Args:
        train: the training function (default :func:`lora_tsd.train.run_training`), called with a TrainConfig.
        max_runs: stop after training this many runs (the rest stays pending; re-invoke to continue).
        shard: ``(i, n)``: train only the runs at positions ≡ i (mod n) of the grid's order, so n processes
            (e.g. one per core or GPU) share a grid folder without training a run twice.
    Returns:
        counts of trained, skipped (already finished or failed), failed and pending runs.
    """
    if train is None:
        from lora_tsd.app.workflow.run import run_training as train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "grid.json", spec.to_dict())
    # Build every config first, so a bad variant or option fails before hours of training.
    sweep = tuning_keys(spec)
    for key in sweep or [RunKey(t, v, r, spec.lrs[0], s) for t, v, r in groups(spec) for s in spec.seeds]:
        make_config(spec, key, out)
    if not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"shard {shard[0]}/{shard[1]}: need 0 <= i < n")
    executor = _Executor(spec, out, train, retry_failed, max_runs, say, shard)
    total = len(sweep) + len(groups(spec)) * (len(spec.seeds) - (len(spec.tuning_seeds) if sweep else 0))
    index = 0
    for key in sweep:
        index += 1
        executor.ensure(key, index, total)
    rows = collect_runs(spec, out)
    chosen = choose_lrs(spec, rows)
    for seed in spec.seeds:
        for task, variant, r in groups(spec):
            lr = chosen.get((task, variant.label, r))
            if sweep and seed in spec.tuning_seeds:
                continue
            index += 1
            if lr is None:  # the sweep is unfinished (max_runs) or every lr failed
                executor.progress.pending += 1
                continue
            executor.ensure(RunKey(task, variant, r, lr, seed), index, total)
    return executor.progress

