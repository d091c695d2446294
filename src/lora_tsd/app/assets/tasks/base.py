"""The ``Task`` record, example schemas, and seeded splitting shared by every task source.

Example schemas, one per task kind (extra keys are allowed and kept):

- ``classification``: ``{"text": str, "label": int}`` with ``0 <= label < len(task.labels)``
- ``multiple_choice``: ``{"input": str, "choices": list[str], "label": int}`` with
  ``0 <= label < len(choices)`` and at least two choices
- ``generation``: ``{"prompt": str, "completion": str}``, plus optional ``"entry"`` (what a
  source-specific scorer needs, e.g. a reasoning-gym entry) or ``"targets"`` (all accepted answers)
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_tsd.app.errors import DataError
from lora_tsd.config import short_repr
from lora_tsd.errors import ConfigError

__all__ = [
    "SPLITS",
    "TASK_KINDS",
    "Example",
    "Task",
    "cap_splits",
    "check_example",
    "derive_seed",
    "exact_match",
    "infer_kind",
    "make_splits",
]

TASK_KINDS = ("classification", "multiple_choice", "generation")
SPLITS = ("train", "validation", "test")

#: Fraction of the examples that each evaluation split takes when a source has fewer than three splits.
EVAL_FRACTIONS = {"validation": 0.1, "test": 0.1}

Example = dict[str, Any]
Scorer = Callable[[str, Example], float]

# The keys that identify each kind, checked in this order (multiple choice first: it also has 'label').
_KIND_KEYS: tuple[tuple[str, frozenset[str]], ...] = (
    ("multiple_choice", frozenset({"input", "choices", "label"})),
    ("classification", frozenset({"text", "label"})),
    ("generation", frozenset({"prompt", "completion"})),
)


def _normalize_answer(text: str) -> str:
    return " ".join(str(text).split()).strip().lower()


def exact_match(pred: str, example: Example) -> float:
    """1.0 when ``pred`` equals the completion (or any of ``targets``) up to case and whitespace."""
    answers = example.get("targets") or [example["completion"]]
    return float(_normalize_answer(pred) in {_normalize_answer(a) for a in answers})


@dataclass
class Task:
    """A task ready for training and evaluation.

    Attributes:
        name: the spec it was loaded from, e.g. ``"bigbench:multiemo"``.
        kind: one of ``TASK_KINDS``.
        splits: ``{"train": [...], "validation": [...], "test": [...]}``, each a non-empty list of
            examples in the schema of ``kind`` (see the module docstring).
        labels: class names for ``classification`` (index = label id); empty for the other kinds.
        scorer: ``scorer(pred, example) -> float`` for generation tasks; exact match when None.
        info: provenance and statistics (source, counts, dropped examples, prompt prefixes, ...).
    """

    name: str
    kind: str
    splits: dict[str, list[Example]]
    labels: list[str] = field(default_factory=list)
    scorer: Scorer | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if set(self.splits) != set(SPLITS):
            raise ConfigError(f"a task needs exactly the splits {SPLITS}, got {sorted(self.splits)}")
        if (self.kind == "classification") != bool(self.labels):
            raise ConfigError("labels are required for classification tasks and only for them")
        n_labels = len(self.labels) or None
        for split in SPLITS:
            examples = self.splits[split]
            if not examples:
                raise DataError(f"task {self.name}: the {split} split is empty")
            for index, example in enumerate(examples):
                check_example(example, self.kind, n_labels, f"task {self.name}, {split}[{index}]")

    @property
    def train(self) -> list[Example]:
        return self.splits["train"]

    @property
    def validation(self) -> list[Example]:
        return self.splits["validation"]

    @property
    def test(self) -> list[Example]:
        return self.splits["test"]

    def score_generation(self, pred: str, example: Example) -> float:
        """Score a generated answer for a generation example (1.0 = correct)."""
        if self.kind != "generation":
            raise ConfigError(f"score_generation applies to generation tasks; {self.name} is {self.kind}")
        return float((self.scorer or exact_match)(pred, example))

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {split: len(self.splits[split]) for split in SPLITS}


def infer_kind(example: Mapping[str, Any]) -> str | None:
    """The kind whose identifying keys ``example`` has, or None."""
    for kind, keys in _KIND_KEYS:
        if keys <= example.keys():
            return kind
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a label


def check_example(example: Any, kind: str, n_labels: int | None, where: str) -> None:
    """Raise :class:`DataError` naming ``where`` unless ``example`` follows the schema of ``kind``.

    ``n_labels`` bounds classification labels; None skips that bound (the caller infers it later).
    """
    if not isinstance(example, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}")
    required = dict(_KIND_KEYS)[kind]
    missing = sorted(required - example.keys())
    if missing:
        raise DataError(f"{where}: missing key(s) {missing} for a {kind} example (has {sorted(example)})")
    _CHECKERS[kind](example, n_labels, where)


def _check_classification(example: Mapping[str, Any], n_labels: int | None, where: str) -> None:
    if not isinstance(example["text"], str):
        raise DataError(f"{where}: 'text' must be a string, got {type(example['text']).__name__}")
    label = example["label"]
    if not _is_int(label):
        raise DataError(f"{where}: 'label' must be an integer class id, got {label!r}")
    if label < 0 or (n_labels is not None and label >= n_labels):
        bound = f"[0, {n_labels})" if n_labels is not None else ">= 0"
        raise DataError(f"{where}: label {label} out of range {bound}")


def _check_multiple_choice(example: Mapping[str, Any], n_labels: int | None, where: str) -> None:
    if not isinstance(example["input"], str):
        raise DataError(f"{where}: 'input' must be a string, got {type(example['input']).__name__}")
    choices = example["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two strings, got {choices!r}")
    label = example["label"]
    if not _is_int(label):
        raise DataError(f"{where}: 'label' must be the integer index of the right choice, got {label!r}")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label} out of range [0, {len(choices)}) for {len(choices)} choices")
    if any(not c.strip() for c in choices):
        raise DataError(f"{where}: choice {[c.strip() for c in choices].index('')} is empty")
    if len(set(choices)) != len(choices):
        repeated = next(c for c in choices if choices.count(c) > 1)
        raise DataError(f"{where}: choice {short_repr(repeated)} appears twice; the choices must differ")


def _check_generation(example: Mapping[str, Any], n_labels: int | None, where: str) -> None:
    for key in ("prompt", "completion"):
        if not isinstance(example[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(example[key]).__name__}")


_CHECKERS: dict[str, Callable[[Mapping[str, Any], int | None, str], None]] = {
    "classification": _check_classification,
    "multiple_choice": _check_multiple_choice,
    "generation": _check_generation,
}


def derive_seed(seed: int, purpose: str) -> int:
    """A 31-bit seed for ``purpose`` (e.g. a split name) derived from ``seed``, stable across runs.

    Seeds of different purposes land far apart, so generators that seed item ``i`` with ``seed + i``
    do not produce shifted copies of each other.
    """
    return zlib.crc32(f"{seed}/{purpose}".encode()) & 0x7FFFFFFF


def _shuffled(examples: Sequence[Example], seed: int, purpose: str) -> list[Example]:
    order = list(range(len(examples)))
    random.Random(derive_seed(seed, purpose)).shuffle(order)
    return [examples[i] for i in order]


def make_splits(
    splits: Mapping[str, Sequence[Example] | None], seed: int, *, source: str
) -> dict[str, list[Example]]:
    """Shuffle the given splits and carve the missing evaluation splits out of ``train``, seeded.

    ``splits`` maps each of ``SPLITS`` to its examples or None (missing). Every given split is shuffled
    (so a later cap takes a random subset, not a prefix of a possibly sorted file); then a missing
    ``test`` and ``validation`` each take ``EVAL_FRACTIONS`` of the train examples (at least one) and the
    rest stays train. The result depends only on the examples, their order and ``seed``; the splits are
    disjoint (as far as the examples are distinct).

    Raises:
        DataError: too few examples to carve from, or an empty split (``source`` names the data).
    """
    result = {split: _shuffled(splits[split], seed, split) for split in SPLITS if splits.get(split) is not None}
    train = result.get("train", [])
    missing = [split for split in ("test", "validation") if split not in result]
    if missing and train and len(train) < len(missing) + 1:
        raise DataError(
            f"{source}: {len(train)} example(s) are too few to split off {' and '.join(missing)} "
            f"(need at least {len(missing) + 1})"
        )
    start = 0
    for split in missing:
        count = max(1, round(EVAL_FRACTIONS[split] * len(train)))
        result[split] = train[start : start + count]
        start += count
    result["train"] = train[start:]
    for split in SPLITS:
        if not result[split]:
            raise DataError(f"{source}: the {split} split is empty")
    return result


def cap_splits(
    splits: Mapping[str, list[Example]], max_train: int | None, max_eval: int | None
) -> dict[str, list[Example]]:
    """Keep the first ``max_train`` train and ``max_eval`` validation/test examples.

    Splits are shuffled before this, so a smaller cap gives a prefix of a larger one (nested subsets).
    """
    for name, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
    caps = {"train": max_train, "validation": max_eval, "test": max_eval}
    return {split: list(splits[split][: caps[split]]) for split in SPLITS}
