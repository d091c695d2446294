"""Collapse detection: a run whose learning rate is too high often ends "normally" with a model that predicts the
majority class (issue 19: LoRA-TSD at lr 2e-3 on an untuned BIG-bench task, 3 seeds of 3). :class:`CollapseMonitor`
watches every validation evaluation after the warm-up and the training loss, says so on the console the first time
it sees a collapse and again at the end, with a concrete remedy (a lower ``--lr``, with its value), and the
summary records it.

A collapse is one of:

- a constant prediction: one class (or choice position) for at least :data:`CONSTANT_SHARE` of validation;
- the majority-class rate: validation accuracy within :data:`MAJORITY_MARGIN` of always predicting the most
  frequent label, with at least :data:`MAJORITY_TOP_SHARE` of the predictions on one class;
- a diverging loss: the mean training loss since the previous evaluation above :data:`LOSS_RATIO` times the mean
  of the first :data:`LOSS_START_STEPS` steps;

seen at every evaluation after the warm-up over at least :data:`PATIENCE` of the run's steps (a warning while
training), and still at the final evaluation (the run collapsed: said at the end and recorded in the summary). The
patience keeps a run that is slow to leave the untrained model's constant prediction from being warned about too
early; a run that recovers after a warning is told so at the end. The texts tell apart a run that never left a
one-class prediction ("stuck": a too-high lr, a slow start or a task beyond the model) from one that learned and
fell back or whose loss diverged ("collapsed": the lr is too high); both suggest the lower lr and ``--lr auto``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_tsd.app.workflow.config import LR_CANDIDATES
from lora_tsd.app.workflow.runners import MAJORITY_SHARE, TOP_SHARE

CONSTANT_SHARE = 0.99
MAJORITY_MARGIN = 0.01
MAJORITY_TOP_SHARE = 0.9
LOSS_RATIO = 2.0
LOSS_START_STEPS = 5
PATIENCE = 0.2


def remedy_lr(lr: float) -> float:
    """The lr to suggest after a collapse at ``lr``: the largest default ``--lr auto`` candidate below it, else
    a tenth of it."""
    lower = [c for c in LR_CANDIDATES if c < lr]
    return max(lower) if lower else lr / 10


def higher_lr(lr: float) -> float | None:
    """The higher lr to suggest for a run that never left a one-class prediction: the smallest default ``--lr
    auto`` candidate above it (None above them all). Measured in the default-recipe protocol (docs/results.md):
    on reasoning-gym binary_alternation, lr 5e-4 never left the majority class where 1e-3 learned the task."""
    higher = [c for c in LR_CANDIDATES if c > lr]
    return min(higher) if higher else None


def collapse_reason(metrics: dict[str, float], recent_loss: float | None, start_loss: float | None) -> str | None:
    """Why an evaluation (and the training loss since the last one) looks collapsed, or None."""
    top, majority, accuracy = metrics.get(TOP_SHARE), metrics.get(MAJORITY_SHARE), metrics.get("accuracy")
    if top is not None and top >= CONSTANT_SHARE:
        return f"{100 * top:.1f}% of validation examples get the same prediction"
    if (top is not None and majority is not None and accuracy is not None and top >= MAJORITY_TOP_SHARE
            and accuracy <= majority + MAJORITY_MARGIN):
        return (f"validation accuracy {100 * accuracy:.1f}% is the majority-class rate "
                f"{100 * majority:.1f}%")
    if recent_loss is not None and start_loss is not None and recent_loss > LOSS_RATIO * start_loss:
        return f"the training loss {recent_loss:.3g} is {recent_loss / start_loss:.1f}x its start {start_loss:.3g}"
    return None


@dataclass
class CollapseMonitor:
    """Fed every applied step's loss and every validation evaluation; remembers the first collapse."""

    lr: float
    warmup_steps: int
    steps: int
    losses: dict[int, float] = field(default_factory=dict)
    last_eval_step: int = 0
    streak_start: int | None = None  # the first evaluation of the current run of collapsed-looking ones
    left_start: bool = False  # some evaluation after the warm-up looked healthy (the run learned something)
    warned: int | None = None  # the step of the warning while training
    collapse: dict[str, Any] | None = None  # set when the final evaluation is still collapsed

    def add_loss(self, step: int, loss: float) -> None:
        self.losses[step] = loss

    def check(self, step: int, metrics: dict[str, float]) -> str | None:
        """The console line for a collapse first established at this evaluation (None: nothing new to say)."""
        recent = [v for s, v in self.losses.items() if self.last_eval_step < s <= step]
        self.last_eval_step = step
        if step <= self.warmup_steps:
            return None
        start = [self.losses[s] for s in sorted(self.losses)[:LOSS_START_STEPS]]
        reason = collapse_reason(metrics, sum(recent) / len(recent) if recent else None,
                                 sum(start) / len(start) if start else None)
        if reason is None:
            self.streak_start, self.left_start = None, True
            return None
        if self.streak_start is None:
            self.streak_start = step
        if step >= self.steps:  # the final evaluation: the run ended collapsed
            self.collapse = {"step": step, "since_step": self.streak_start, "reason": reason, "lr": self.lr,
                             "remedy_lr": remedy_lr(self.lr), "kind": self.kind(reason)}
        if self.warned is not None or step - self.streak_start < PATIENCE * self.steps or step >= self.steps:
            return None
        self.warned = step
        if self.kind(reason) == "stuck":
            return (f"warning: step {step}: validation has not left a one-class prediction since step "
                    f"{self.streak_start} ({reason}); slow starts often leave it later, but if it stays, "
                    f"{self.remedy('stuck')}")
        return f"warning: step {step}: validation collapsed since step {self.streak_start}: {reason}; {self.remedy()}"

    def kind(self, reason: str) -> str:
        """``"stuck"``: no evaluation after the warm-up looked healthy and the loss is not diverging, so the run
        may be slow rather than broken (measured: lr 5e-4 on reasoning-gym syllogism predicts one class until
        step 100 of 250, then reaches 83 %); ``"collapsed"``: it learned something and fell back, or diverged."""
        return "stuck" if not self.left_start and not reason.startswith("the training loss") else "collapsed"

    def remedy(self, kind: str = "collapsed") -> str:
        """What to try next: a lower lr; for a run that never started, a higher candidate first where one exists
        (a run can be stuck because its lr is too low as well as too high)."""
        lower = f"lower --lr to {remedy_lr(self.lr):g} (this run: {self.lr:g})"
        up = higher_lr(self.lr)
        if kind == "stuck" and up is not None:
            return f"try --lr {up:g} or {lower}, or pass --lr auto"
        return f"{lower} or pass --lr auto"

    def final_message(self, exported_step: int | None) -> str | None:
        """The end-of-run line (None when no collapse was seen)."""
        if self.collapse is None:
            if self.warned is not None:
                return f"the collapse warned about at step {self.warned} did not last: validation recovered"
            return None
        since = self.collapse["since_step"]
        exported = (f"; the exported adapter is step {exported_step}'s, the best validation"
                    if exported_step is not None and exported_step < since else "")
        if self.collapse["kind"] == "stuck":
            return (f"warning: this run never left a one-class prediction (from step {since}: "
                    f"{self.collapse['reason']}){exported}; {self.remedy('stuck')}; "
                    "another --seed may leave it (measured: docs/results.md); if no lr or seed leaves it, the "
                    "task may be beyond this model")
        return f"warning: this run collapsed from step {since} ({self.collapse['reason']}){exported}; {self.remedy()}"

    def replay(self, records: list[dict[str, Any]]) -> None:
        """Rebuild the state of a resumed run from its metrics log (already cut at the checkpoint's step)."""
        for record in records:
            if record.get("event") == "step":
                self.add_loss(record["step"], record["loss"])
            elif record.get("event") == "eval" and record.get("split") == "validation":
                self.check(record["step"], record)
