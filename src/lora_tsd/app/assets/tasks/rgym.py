"""Generated reasoning tasks from ``reasoning-gym`` (PyPI, offline): ``reasoning-gym:<generator>``.

Each split is drawn from the generator with its own seed derived from ``seed`` and the split name
(``create_dataset(name, size=N, seed=S)``); questions that also occur in an evaluation split are removed
from the later splits (validation excludes test, train excludes both), so no evaluation question is
trained on. Sizes: ``max_train`` (default 1000) and ``max_eval`` (default 200) examples; a generator
with few distinct questions may yield fewer (``info["counts"]`` says how many were dropped).

Examples are ``{"prompt": question, "completion": answer, "entry": the reasoning-gym entry}``;
``Task.score_generation(pred, example)`` calls the generator's own ``score_answer(pred, entry)``.

``reasoning-gym:<generator>@classification`` is the classification view of a generator whose answers
come from a small closed set (e.g. ``syllogism``: Yes/No, ``family_relationships``: father, son, ...):
``{"text": question, "label": index}`` with the labels the sorted distinct answers of all three splits.
It is what an encoder (``--model minilm``) trains on; a generator with more than ``MAX_CLASSES``
distinct answers (arithmetic, puzzles) is refused, since its answers are not classes.

Needs ``pip install 'lora-tsd[data]'`` (or ``reasoning-gym==0.1.25``).
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Callable
from typing import Any

from lora_tsd.app.assets.tasks.base import Example, Task, cap_splits, derive_seed
from lora_tsd.app.errors import AssetNotAvailableError
from lora_tsd.errors import ConfigError

__all__ = [
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "MAX_CLASSES",
    "load_reasoning_gym_task",
    "reasoning_gym_names",
]

DEFAULT_TRAIN_SIZE = 1000
DEFAULT_EVAL_SIZE = 200
_REQUIREMENT = "reasoning-gym==0.1.25"
#: The most distinct answers a generator may have for its classification view: beyond it the answers are
#: values to compute, not classes to pick.
MAX_CLASSES = 16


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as error:
        raise AssetNotAvailableError(
            f"reasoning-gym tasks need the reasoning-gym package: pip install 'lora-tsd[data]' "
            f"(or pip install {_REQUIREMENT})"
        ) from error
    return reasoning_gym


def reasoning_gym_names() -> list[str]:
    """Names of all registered reasoning-gym generators."""
    _import_reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_name(name: str) -> None:
    names = reasoning_gym_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ConfigError(f"no reasoning-gym generator {name!r}.{hint} The {len(names)} generators: {', '.join(names)}")


def _generate(name: str, size: int, seed: int, exclude: set[str], stats: Counter[str], split: str) -> list[Example]:
    """``size`` distinct examples whose questions are not in ``exclude`` (spares are drawn to replace them)."""
    reasoning_gym = _import_reasoning_gym()
    # Item i of a reasoning-gym dataset depends only on (seed, i), so drawing spares does not change the
    # first `size` items.
    dataset = reasoning_gym.create_dataset(name, size=size + size // 4 + 8, seed=seed)
    examples: list[Example] = []
    questions: set[str] = set()
    for entry in dataset:
        if entry["question"] in exclude or entry["question"] in questions:
            stats[f"{split}_duplicates_skipped"] += 1
            continue
        questions.add(entry["question"])
        examples.append({"prompt": entry["question"], "completion": str(entry["answer"]), "entry": entry})
        if len(examples) == size:
            break
    return examples


def _make_scorer(name: str) -> Callable[[str, Example], float]:
    score_answer = _import_reasoning_gym().get_score_answer_fn(name)

    def score(pred: str, example: Example) -> float:
        return float(score_answer(pred, example["entry"]))

    return score


def load_reasoning_gym_task(
    arg: str, *, seed: int, max_train: int | None, max_eval: int | None, kind: str | None
) -> Task:
    """Load ``reasoning-gym:<arg>`` (see the module docstring)."""
    if kind not in (None, "generation", "classification"):
        raise ConfigError(
            f"reasoning-gym tasks have a generation and a classification view; kind={kind!r} is not available"
        )
    if not arg:
        raise ConfigError("reasoning-gym: needs a generator name, e.g. reasoning-gym:gsm_symbolic")
    _check_name(arg)
    sizes = {"train": max_train or DEFAULT_TRAIN_SIZE, "validation": max_eval or DEFAULT_EVAL_SIZE}
    sizes["test"] = sizes["validation"]
    stats: Counter[str] = Counter()
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split in ("test", "validation", "train"):  # evaluation first: train yields to them, not vice versa
        splits[split] = _generate(arg, sizes[split], derive_seed(seed, split), seen, stats, split)
        seen.update(example["prompt"] for example in splits[split])
    info = {
        "source": f"reasoning-gym {_REQUIREMENT.split('==')[1]}",
        "generator": arg,
        "seeds": {split: derive_seed(seed, split) for split in splits},
        "counts": dict(stats),
    }
    name = f"reasoning-gym:{arg}"
    if kind == "classification":
        labels, splits = as_classification(name, splits)
        info["label_counts"] = dict(Counter(labels[e["label"]] for e in splits["train"]))
        return Task(name=f"{name}@classification", kind="classification",
                    splits=cap_splits(splits, max_train, max_eval), labels=labels, info=info)
    return Task(name=name, kind="generation", splits=cap_splits(splits, max_train, max_eval),
                scorer=_make_scorer(arg), info=info)


def as_classification(name: str, splits: dict[str, list[Example]]) -> tuple[list[str], dict[str, list[Example]]]:
    """The classification view of generated splits: sorted distinct answers as labels, ``{"text", "label"}``.

    Raises:
        ConfigError: more than ``MAX_CLASSES`` distinct answers, or a single one (nothing to classify).
    """
    labels = sorted({example["completion"] for examples in splits.values() for example in examples})
    if not 2 <= len(labels) <= MAX_CLASSES:
        shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
        raise ConfigError(
            f"{name} has {len(labels)} distinct answer(s) ({shown}); its classification view needs 2 to "
            f"{MAX_CLASSES}: train it as a generation task with a decoder (--model smollm2-135m, task {name})"
        )
    index = {label: i for i, label in enumerate(labels)}
    return labels, {
        split: [{"text": example["prompt"], "label": index[example["completion"]]} for example in examples]
        for split, examples in splits.items()
    }
