"""A run folder: creating it, its JSONL metrics log, and reading its saved config back.

Layout::

    <output_dir>/train_config.json   the run's TrainConfig (what `lora-tsd eval/export` and --resume read back)
    <output_dir>/metrics.jsonl       one line per optimizer step and per evaluation
    <output_dir>/checkpoints/step-N  resumable checkpoints (adapter, optimizer, scheduler, RNG states)
    <output_dir>/adapter/            the final adapter (lora-tsd format, with the classification head)
    <output_dir>/peft/               the same adapter as a stock PEFT LoRA adapter
    <output_dir>/summary.json        config, data and model identity, metrics before/after, time, memory
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.atomic import atomic_write
from lora_tsd.errors import ConfigError

RUN_MARKER = "train_config.json"
METRICS_FILE = "metrics.jsonl"


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, marker: str = RUN_MARKER) -> Path:
    """Create the run folder; refuse an existing non-empty one unless ``overwrite`` (and then only a run folder,
    recognised by its ``marker`` file)."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite "
                              "to replace it or choose another --output-dir")
        if not (out / marker).is_file():
            raise ConfigError(f"--overwrite refuses to delete {str(out)!r}: it is not a lora-tsd run folder "
                              f"(no {marker})")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run folder."""
    path = Path(run_dir) / RUN_MARKER
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a lora-tsd run folder (no {RUN_MARKER}); pass the output "
                          "directory of `lora-tsd train`")
    return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


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
