"""A run folder: creating it, its JSONL metrics log, and reading its saved config back.

Layout::

    <output_dir>/train_config.json   the run's TrainConfig (what `lora-tsd eval/export` and --resume read back)
    <output_dir>/metrics.jsonl       one line per optimizer step and per evaluation
    <output_dir>/checkpoints/step-N  resumable checkpoints (adapter, optimizer, scheduler, RNG states)
    <output_dir>/adapter/            the final adapter (lora-tsd format, with the classification head)
    <output_dir>/peft/               the same adapter as a stock PEFT LoRA adapter
    <output_dir>/summary.json        config, data and model identity, metrics before/after, time, memory; what
                                     was exported ("exported"), a collapse, "finished" (false until the final
                                     test evaluation completes)
    <output_dir>/best_state.safetensors  the best validation state (restored at the end; best_checkpoint.py)
    <output_dir>/lr_search/          the trial runs of --lr auto (app/experiments/lr_search.py)
    <output_dir>/restarts/seed-S/    the attempts of a stuck run that were not exported (restarts.py)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lora_tsd.app.formats import slug
from lora_tsd.app.workflow.config import ABSENT_MEANS, TrainConfig
from lora_tsd.app.workflow.ownership import check_replaceable, claim_folder
from lora_tsd.app.workflow.run_folder import RunFolderLock
from lora_tsd.atomic import atomic_write
from lora_tsd.errors import ConfigError

RUN_MARKER = "train_config.json"
METRICS_FILE = "metrics.jsonl"


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> bool:
    """Refuse an existing non-empty folder unless ``overwrite`` (and then only a folder lora-tsd created); True if it
    must be replaced. Changes nothing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {str(out)!r} is a file; choose another --output-dir")
    if not (out.exists() and any(out.iterdir())):
        return False
    if not overwrite:
        raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite "
                          "to replace it or choose another --output-dir")
    check_replaceable(out, what="run folder")
    return True


RUNS_ROOT = Path("runs")


def default_run_name(cfg: TrainConfig) -> str:
    """``<model>-<task>-<method>-r<r>`` from the run's options, as a folder name (a model or task path contributes
    its last part: ``jsonl:data/reviews.jsonl`` → ``reviews``)."""
    model = Path(cfg.model.rstrip("/\\")).name or cfg.model
    task = cfg.task.split(":", 1)[-1].rstrip("/\\")
    task = Path(task).stem if cfg.task.startswith("jsonl:") else task
    parts = [slug(model, "_"), slug(task, "_"), cfg.method, f"r{cfg.adapter.r}"]
    return slug("-".join(parts), "_", keep="._-", limit=96, fallback="run")


def new_run_folder(cfg: TrainConfig, root: Path = RUNS_ROOT) -> Path:
    """The default run folder: ``root/<default_run_name>``, or the first free ``-2``, ``-3``, ... after it, so a
    new run never meets an earlier one's folder."""
    base = root / default_run_name(cfg)
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, lock: RunFolderLock | None = None) -> Path:
    """Create the run folder and mark it as lora-tsd's; refuse an existing non-empty one unless ``overwrite``, and
    then delete it only if lora-tsd created it (:mod:`~lora_tsd.app.workflow.ownership`) and no live run holds
    its ``lock``."""
    out = Path(path)
    if check_output_dir(out, overwrite):
        if lock is not None:
            lock.check_free(out)
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        claim_folder(out, "run")
    except OSError as err:
        raise ConfigError(f"cannot create output directory {str(out)!r}: {err.strerror or err}") from None
    return out


def read_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run folder."""
    path = Path(run_dir) / RUN_MARKER
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a lora-tsd run folder (no {RUN_MARKER}); pass the output "
                          "directory of `lora-tsd train`")
    return TrainConfig.from_dict({**ABSENT_MEANS, **json.loads(path.read_text(encoding="utf-8"))})


class MetricsLog:
    """Append-only JSONL log, flushed per line so a killed run keeps everything it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        """Every record (a line cut by a kill is skipped)."""
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, last_step: int) -> None:
        """Drop the records past a resumed checkpoint (they are replayed), keeping the file atomic."""
        if not self.path.is_file():
            return
        keep = [r for r in self.read() if r.get("step", 0) <= last_step or r.get("event") == "start"]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda p: p.write_text(text, encoding="utf-8"))
