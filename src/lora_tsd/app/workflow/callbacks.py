"""Hooks into the training loop: code that observes a run without living inside it.

A :class:`LoopCallback` gets the loop's state at fixed points. Pass callbacks to
:func:`~lora_tsd.app.workflow.run.run_training`, or register one for every run of the process with
:func:`register_callback` (the kill-and-resume tests install their fault injector this way, so the production
loop carries no test code).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class LoopCallback:
    """Override the hooks you need; each receives the loop's :class:`~lora_tsd.app.workflow.loop.LoopState`."""

    def on_train_start(self, state: Any) -> None:
        """Before the first optimizer step of this process (after a resume: of the resumed part)."""

    def on_step_start(self, state: Any, step: int) -> None:
        """Before optimizer step ``step`` (1-based) computes its micro-batches."""

    def on_step_end(self, state: Any, step: int) -> None:
        """After optimizer step ``step``: the update, the method's step count, logging, evaluation, checkpoint."""

    def on_checkpoint_partial(self, state: Any, step: int) -> None:
        """Half-way through writing the checkpoint of ``step`` (adapter written, trainer state not yet)."""

    def on_final_test_evaluation(self, state: Any) -> None:
        """After the adapter and the unfinished summary are written, before the final test evaluation."""

    def on_train_end(self, state: Any, summary: dict[str, Any]) -> None:
        """After the final evaluation and the outputs (rank 0 gets the summary; other ranks an empty dict)."""


_REGISTERED: list[LoopCallback] = []


def register_callback(callback: LoopCallback) -> Callable[[], None]:
    """Run ``callback`` in every training run of this process; returns a function that removes it again."""
    _REGISTERED.append(callback)
    return lambda: _REGISTERED.remove(callback) if callback in _REGISTERED else None


class CallbackList(LoopCallback):
    """The registered callbacks followed by a run's own, called in that order."""

    def __init__(self, callbacks: Iterable[LoopCallback] = ()) -> None:
        self.callbacks = [*_REGISTERED, *callbacks]

    def on_train_start(self, state: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_start(state)

    def on_step_start(self, state: Any, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_start(state, step)

    def on_step_end(self, state: Any, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state, step)

    def on_checkpoint_partial(self, state: Any, step: int) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint_partial(state, step)

    def on_final_test_evaluation(self, state: Any) -> None:
        for cb in self.callbacks:
            cb.on_final_test_evaluation(state)

    def on_train_end(self, state: Any, summary: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state, summary)
