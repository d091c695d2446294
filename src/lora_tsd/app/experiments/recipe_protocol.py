"""The default-recipe protocol (issue 19): which candidate learning rate ships as the default, chosen on a set of
development tasks and checked on a separate set of evaluation tasks, from the runs of ``lora-tsd compare`` grids
(each run one task × method × lr × seed, with the library's other defaults).

Per run (:func:`outcome`):

- **learned**: test accuracy above both the majority-class rate and the untrained model's accuracy by more than
  :data:`Z` binomial standard errors of that rate on the run's test examples (so a lucky point is not "learning");
- **collapsed**: the exported model's test predictions look collapsed by the training safeguard's own rule
  (:func:`~lora_tsd.app.workflow.safeguards.collapse_reason`: a constant prediction, or the majority-class rate
  with one class for most predictions), or the run ended collapsed on validation (its summary says so);
- **harmful collapse**: collapsed although the same method, task and seed learned the task at another candidate
  lr: the lr was to blame, not the task.

A task that no run learns is beyond the model here and is left out of the choice and the verdict (it is reported).
The choice on the development tasks (:func:`choose_lr`): the fewest harmful collapses, then the highest mean
validation accuracy over the kept tasks and all methods, then the lower lr. The verdict on the evaluation tasks
(:func:`verdict`): at the chosen lr, no harmful collapse, and every method's run beats the untrained model's test
accuracy on every kept task where any candidate run does.

With more than one evaluation set (:func:`staged_choice`), each set checks the current lr in turn; when a check
fails, the lr is chosen again by the same rule on every set seen so far (the failed set included) and the next,
unseen set checks the new choice. The answer is the last lr chosen, and it is checked only if a later set passed it.

With ``lora-tsd train``'s restart of a stuck run (:mod:`~lora_tsd.app.workflow.restarts`), a run that ended
collapsed is replaced by its restart (the same task, method and lr with seed + 1000) when the restart ranks
higher on validation, as the command ranks them (:func:`with_restarts`); the verdict is then taken again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lora_tsd.app.workflow.restarts import attempt_rank, restart_seed
from lora_tsd.app.workflow.runners import MAJORITY_SHARE, TOP_SHARE
from lora_tsd.app.workflow.safeguards import collapse_reason

__all__ = ["Z", "Outcome", "Stage", "StagedChoice", "Verdict", "choose_lr", "harmful_collapses", "kept_tasks",
           "outcome", "outcomes", "staged_choice", "verdict", "with_restarts"]

#: How many binomial standard errors above the trivial rate a run's test accuracy must be to count as learned
#: (about a one-sided 2.3 % false-positive rate per run).
Z = 2.0


@dataclass(frozen=True)
class Outcome:
    """One finished run of the protocol, classified."""

    task: str
    method: str
    lr: float
    seed: int
    test_accuracy: float
    val_accuracy: float
    untrained: float  # the untrained model's test accuracy (same seed: same head)
    majority: float  # the test accuracy of always predicting the most frequent label
    learned: bool
    collapsed: bool
    ended_collapsed: bool  # the training safeguard's verdict at the final evaluation
    restart_seed: int | None = None  # the seed of the restart that replaced this run (with_restarts)

    @property
    def beats_untrained(self) -> bool:
        return self.test_accuracy > self.untrained


def outcome(row: dict[str, Any]) -> Outcome:
    """Classify one finished run's record from a grid's ``results.json`` (its ``runs`` list)."""
    accuracy, majority = row["test_accuracy"], row[f"test_{MAJORITY_SHARE}"]
    untrained, n = row["before_test_accuracy"], row["test_examples"]
    trivial = max(majority, untrained)
    learned = accuracy > trivial + Z * math.sqrt(trivial * (1 - trivial) / n)
    test_metrics = {"accuracy": accuracy, TOP_SHARE: row[f"test_{TOP_SHARE}"], MAJORITY_SHARE: majority}
    ended = bool(row.get("collapsed"))
    return Outcome(task=row["task"], method=row["method"], lr=row["lr"], seed=row["seed"], test_accuracy=accuracy,
                   val_accuracy=row["val_accuracy"], untrained=untrained, majority=majority, learned=learned,
                   collapsed=ended or collapse_reason(test_metrics, None, None) is not None, ended_collapsed=ended)


def outcomes(rows: Iterable[dict[str, Any]]) -> list[Outcome]:
    """:func:`outcome` of every finished run (failed runs carry no metrics and are left out)."""
    return [outcome(row) for row in rows if row["status"] == "done"]


def kept_tasks(runs: Sequence[Outcome]) -> list[str]:
    """Tasks that at least one run learned, in first-seen order; the others are beyond the model."""
    tasks = list(dict.fromkeys(o.task for o in runs))
    return [t for t in tasks if any(o.learned for o in runs if o.task == t)]


def harmful_collapses(runs: Sequence[Outcome]) -> list[Outcome]:
    """Collapsed runs whose method, task and seed learned the task at another lr."""
    learned = {(o.task, o.method, o.seed) for o in runs if o.learned}
    return [o for o in runs if o.collapsed and (o.task, o.method, o.seed) in learned]


def choose_lr(runs: Sequence[Outcome], lrs: Sequence[float]) -> float:
    """The default lr from the development runs (see the module docstring for the rule).

    Raises:
        ValueError: no task was learned, or a candidate lr has no run on a kept task.
    """
    kept = set(kept_tasks(runs))
    if not kept:
        raise ValueError("no development task was learned by any run: nothing to choose the lr on")
    harmful = harmful_collapses(runs)

    def key(lr: float) -> tuple[int, float, float]:
        vals = [o.val_accuracy for o in runs if o.lr == lr and o.task in kept]
        if not vals:
            raise ValueError(f"lr {lr:g} has no finished run on the learned development tasks")
        return (-sum(1 for o in harmful if o.lr == lr), sum(vals) / len(vals), -lr)

    return max(lrs, key=key)


@dataclass(frozen=True)
class Verdict:
    """The evaluation-set check of a chosen lr."""

    lr: float
    kept: list[str]
    beyond: list[str]
    harmful: list[Outcome]  # harmful collapses at the chosen lr
    not_beating: list[Outcome]  # runs at the chosen lr that do not beat the untrained model where some run does

    @property
    def passed(self) -> bool:
        return not self.harmful and not self.not_beating


def verdict(runs: Sequence[Outcome], lr: float) -> Verdict:
    """Check ``lr`` on the evaluation runs (all candidate lrs, so that "another lr learns" can be seen)."""
    kept = kept_tasks(runs)
    beyond = [t for t in dict.fromkeys(o.task for o in runs) if t not in kept]
    beatable = {o.task for o in runs if o.beats_untrained and o.task in kept}
    at_lr = [o for o in runs if o.lr == lr and o.task in kept]
    return Verdict(lr=lr, kept=kept, beyond=beyond,
                   harmful=[o for o in harmful_collapses(runs) if o.lr == lr and o.task in kept],
                   not_beating=[o for o in at_lr if o.task in beatable and not o.beats_untrained])


@dataclass(frozen=True)
class Stage:
    """One check of the staged protocol: the lr, the sets it was chosen on, the set that checked it."""

    lr: float
    chosen_on: list[str]
    checked_on: str
    verdict: Verdict


@dataclass(frozen=True)
class StagedChoice:
    """Every check in order and the protocol's answer (``checked``: a set passed the final lr)."""

    stages: list[Stage]
    final: float
    final_chosen_on: list[str]

    @property
    def checked(self) -> bool:
        return bool(self.stages) and self.stages[-1].verdict.passed


def staged_choice(sets: Sequence[tuple[str, Sequence[Outcome]]], lrs: Sequence[float]) -> StagedChoice:
    """Choose on the first named set, check on each later one in turn, choosing again after a failed check.

    Args:
        sets: (name, runs) pairs: the development set first, then the evaluation sets in the order they are used.
        lrs: the candidate lrs.
    """
    if not sets:
        raise ValueError("no task set to choose the lr on")
    chosen_on = [sets[0][0]]
    lr = choose_lr(sets[0][1], lrs)
    stages: list[Stage] = []
    for index, (name, runs) in enumerate(sets[1:], start=1):
        check = verdict(runs, lr)
        stages.append(Stage(lr=lr, chosen_on=list(chosen_on), checked_on=name, verdict=check))
        if not check.passed:
            chosen_on = [n for n, _ in sets[: index + 1]]
            lr = choose_lr([o for _, seen in sets[: index + 1] for o in seen], lrs)
    return StagedChoice(stages=stages, final=lr, final_chosen_on=chosen_on)


def with_restarts(runs: Sequence[Outcome], restarts: Sequence[Outcome]) -> list[Outcome]:
    """``runs`` with each run that ended collapsed replaced by its first restart where that ranks higher (not
    collapsed, then validation accuracy; the first run wins a tie), as ``lora-tsd train --stuck-restarts 1``
    exports it. A replaced run keeps its seed (the seed asked for) and names the restart's in ``restart_seed``."""
    index = {(o.task, o.method, o.lr, o.seed): o for o in restarts}

    def rank(o: Outcome) -> tuple[bool, float]:
        return attempt_rank(o.ended_collapsed, o.val_accuracy)

    kept = []
    for o in runs:
        restart = index.get((o.task, o.method, o.lr, restart_seed(o.seed, 1)))
        if o.ended_collapsed and restart is not None and rank(restart) > rank(o):
            o = dataclasses.replace(restart, seed=o.seed, restart_seed=restart.seed)
        kept.append(o)
    return kept
