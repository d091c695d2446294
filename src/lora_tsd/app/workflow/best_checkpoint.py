"""The best validation checkpoint of a run: the adapter state of the evaluation with the highest validation accuracy
(every runner reports one), kept in memory and in ``<run>/best_state.safetensors``, and restored at the end (as
``transformers.Trainer``'s ``load_best_model_at_end``), so a run that degrades late, or collapses, still exports
what it learned. Ties keep the earlier step.

The state is everything training changed (adapter tensors and buffers, phase included, and the head), so a best
state from before a switch restores the pre-switch adapter exactly (``lora_tsd.restore_adapter_state``). It travels
inside every resumable checkpoint, so a resumed run restores the same best state as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_tsd.atomic import atomic_write

BEST_STATE = "best_state.safetensors"
#: The validation metric the best checkpoint maximizes.
BEST_METRIC = "accuracy"


@dataclass
class BestCheckpoint:
    """The best validation evaluation so far: its step, metrics and adapter state."""

    path: Path
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def metric(self) -> float | None:
        return self.metrics.get(BEST_METRIC) if self.step is not None else None

    def consider(self, step: int, metrics: dict[str, float],
                 take_state: Callable[[], dict[str, torch.Tensor] | None], write: bool) -> bool:
        """Keep the state (``take_state()``, called only then) if step ``step``'s validation ``metrics`` beat the
        best so far; True if they did. ``write``: this process writes the file (rank 0)."""
        if BEST_METRIC not in metrics:
            return False
        if self.step is not None and not metrics[BEST_METRIC] > self.metrics[BEST_METRIC]:
            return False
        state = take_state()
        if state is None:
            return False
        self.step, self.metrics, self.tensors = step, dict(metrics), state
        if write:
            self._write()
        return True

    def _write(self) -> None:
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        atomic_write(self.path, lambda p: save_file(tensors, str(p), metadata={"step": str(self.step)}))

    # --------------------------------------------------------------------------------- inside checkpoints

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"step": self.step, "metrics": self.metrics}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {f"best.{k}": v for k, v in self.tensors.items()}

    @classmethod
    def from_checkpoint(cls, path: Path, meta: dict[str, Any] | None, tensors: dict[str, torch.Tensor],
                        write: bool) -> BestCheckpoint:
        """The best state as of a resumed checkpoint (the run folder's file is rewritten: it may be newer)."""
        best = cls(path)
        if meta and meta.get("step") is not None:
            best.step, best.metrics = int(meta["step"]), dict(meta["metrics"])
            best.tensors = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
            if write:
                best._write()
        return best


def read_best_state(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's ``best_state.safetensors``."""
    return load_file(str(Path(run_dir) / BEST_STATE))
