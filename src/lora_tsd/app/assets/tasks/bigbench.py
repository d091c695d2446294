"""BIG-bench JSON tasks from the PyPI source archive ``bigbench==1.0.0``: ``bigbench:<task>[/<subtask>]``.

The 358 MB archive is downloaded once into the cache (never installed), and only the requested
``benchmark_tasks/<task>[/<subtask>]/`` folder is extracted, on first use, into
``<cache>/bigbench/<task>[/<subtask>]/`` (a few seconds: the archive is streamed, not unpacked).
The archive stays cached, so other tasks extract without a download.

Each example ``{"input", "target_scores": {choice: score}, "target"?}`` becomes one of three views:

- ``multiple_choice``: ``{"input", "choices": [target_scores keys, file order], "label": index of the
  unique highest score}``;
- ``classification``: when every example has the same set of choices (sentiment, yes/no, NLI):
  ``labels`` = the sorted choices, ``{"text": input, "label": index of the right choice}``;
- ``generation``: ``{"prompt": input, "completion": target, "targets": all accepted targets}``, scored by
  exact match (for tasks that only have ``target``).

The default view is classification when the choice set is fixed, else multiple choice, else generation;
choose another with ``load_task(spec, kind=...)`` or a ``@kind`` suffix
(``bigbench:strategyqa@multiple_choice``). A task without examples of its own (``arithmetic``,
``elementary_math_qa``) is the union of its subtasks; note that subtasks can hold the same question in
different forms (``elementary_math_qa`` has each question with and without hints), so prefer one subtask
when train/test leakage matters.

Cleaning, before splitting: inputs are stripped, empty inputs dropped, exact duplicates
(same input and choices) kept once, and inputs that appear with different right answers dropped as
ambiguous. There is one split in the files; train/validation/test (80/10/10) are made with a seeded
shuffle (``seed`` picks the split: keep it fixed to compare training runs on the same test set).

Embedded default: ``bigbench:multiemo`` is the English sentence-level MultiEmo set
(``multiemo/all_sentence_en``, reviews of hotels, medicine, products and schools) reduced to the
sentences labelled positive or negative: a two-class classification task, labels
``['negative', 'positive']``. ``bigbench:multiemo/all_sentence_en`` is the full four-class set
(adds ``ambivalent`` and ``neutral``).

Every BIG-bench file carries a canary string: the data lives in the cache only, never in a repository.
"""

from __future__ import annotations

import difflib
import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lora_tsd.app.assets.download_cache import build_once, cache_dir, fetch_pypi_file, is_complete, say
from lora_tsd.app.assets.safe_extract import copy_tar_member
from lora_tsd.app.assets.tasks.base import TASK_KINDS, Example, Task, cap_splits, exact_match, make_splits
from lora_tsd.app.errors import DataError
from lora_tsd.errors import ConfigError

__all__ = ["BIGBENCH_REQUIREMENT", "EMBEDDED_VIEWS", "bigbench_task_dir", "load_bigbench_task"]

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
_ARCHIVE_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_TASK_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")


@dataclass(frozen=True)
class EmbeddedView:
    """A named reduction of a BIG-bench (sub)task, used when the bare task name is asked for."""

    source: str
    keep_answers: tuple[str, ...]
    description: str
    task_prefix: str  # replaces the source's instruction, which names the answers that were removed


EMBEDDED_VIEWS: dict[str, EmbeddedView] = {
    "multiemo": EmbeddedView(
        source="multiemo/all_sentence_en",
        keep_answers=("negative", "positive"),
        description="MultiEmo English review sentences, positive vs negative (2-class sentiment)",
        task_prefix="Determine whether the given opinion is positive or negative in terms of its sentiment.",
    ),
}


# ----------------------------------------------------------------------------------------------------
# Fetching and extraction


def bigbench_task_dir(task_path: str) -> Path:
    """Return the extracted folder of ``<task>`` or ``<task>/<subtask>``, extracting it on first use.

    Raises:
        ConfigError: no such task or subtask in the archive (the message lists what exists).
        AssetNotAvailableError: the archive cannot be downloaded (the message says how to get it).
    """
    if not _TASK_PATH.match(task_path):
        raise ConfigError(f"bad BIG-bench task name {task_path!r}: expected <task> or <task>/<subtask>")
    dest = cache_dir() / "bigbench" / task_path
    if is_complete(dest):
        return dest
    archive = fetch_pypi_file(BIGBENCH_REQUIREMENT, sdist=True)

    def build(tmp: Path) -> None:
        _extract_task(archive, task_path, tmp)

    return build_once(dest, build, what=f"BIG-bench task {task_path}")


class _CountingReader:
    """A read-only file wrapper that reports how many bytes were read, for a progress bar."""

    def __init__(self, raw: IO[bytes], on_read: Callable[[int], Any]) -> None:
        self._raw, self._on_read = raw, on_read

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._on_read(len(data))
        return data


def _extract_task(archive: Path, task_path: str, target: Path) -> None:
    """Stream the archive once and copy the members under ``task_path/`` into ``target``.

    The archive lists each folder's members together, so the scan stops right after the folder.
    """
    from tqdm.auto import tqdm

    prefix = f"{_ARCHIVE_TASKS}{task_path}/"
    say(f"extracting BIG-bench task {task_path} from {archive.name} (a few seconds) ...")
    seen_tasks: set[str] = set()
    seen_subtasks: set[str] = set()
    found = False
    with (
        open(archive, "rb") as raw,
        tqdm(total=archive.stat().st_size, unit="B", unit_scale=True, desc="scanning", disable=None) as bar,
        tarfile.open(fileobj=_CountingReader(raw, bar.update), mode="r|gz") as stream,  # type: ignore[arg-type]
    ):
        for member in stream:
            _note_names(member.name, task_path, seen_tasks, seen_subtasks)
            if member.name.startswith(prefix):
                found = True
                copy_tar_member(stream, member, target, member.name[len(prefix) :], archive=archive.name)
            elif found:
                break
    if not found:
        raise _unknown_task_error(task_path, seen_tasks, seen_subtasks)


def _note_names(name: str, task_path: str, tasks: set[str], subtasks: set[str]) -> None:
    if not name.startswith(_ARCHIVE_TASKS):
        return
    parts = name[len(_ARCHIVE_TASKS) :].split("/")
    if len(parts) >= 2 and parts[0]:  # a folder, not a file directly in benchmark_tasks/
        tasks.add(parts[0])
        if parts[0] == task_path.split("/")[0] and len(parts) >= 3 and parts[1]:
            subtasks.add(parts[1])


def _unknown_task_error(task_path: str, tasks: set[str], subtasks: set[str]) -> ConfigError:
    task, _, subtask = task_path.partition("/")
    if subtask and task in tasks:
        names = sorted(subtasks)
        close = difflib.get_close_matches(subtask, names, n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return ConfigError(f"BIG-bench task {task!r} has no subtask {subtask!r}.{hint} Subtasks: {', '.join(names)}")
    names = sorted(tasks)
    close = difflib.get_close_matches(task, names, n=3)
    hint = f" Closest: {', '.join(close)}." if close else ""
    return ConfigError(f"no BIG-bench task {task!r}.{hint} The {len(names)} tasks: {', '.join(names)}")


# ----------------------------------------------------------------------------------------------------
# Reading and cleaning


@dataclass
class _Raw:
    """One cleaned BIG-bench example: input, choices in file order, the right choice, accepted targets."""

    input: str
    choices: list[str]
    answer: str | None
    targets: list[str]


def _read_task_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the BIG-bench task: {error}") from error
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'examples'")
    return data


def _load_examples(task_dir: Path, task_path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The raw examples of a task (its own, or the union of its subtasks) and its metadata."""
    task_json = task_dir / "task.json"
    subtask_files = sorted(task_dir.glob("*/task.json"))
    if not task_json.is_file() and not subtask_files:
        raise DataError(
            f"BIG-bench task {task_path} has no task.json: it is a programmatic task (task.py), which "
            f"needs the bigbench package's own runtime; only JSON tasks are supported"
        )
    meta = _read_task_json(task_json) if task_json.is_file() else {}
    examples = meta.pop("examples", None)
    if examples:
        return examples, meta
    examples = []
    for file in subtask_files:
        examples.extend(_read_task_json(file).get("examples") or [])
    meta["subtasks"] = [file.parent.name for file in subtask_files]
    if not examples:
        raise DataError(f"BIG-bench task {task_path} has no examples")
    return examples, meta


def _answer(scores: dict[str, Any]) -> str | None:
    """The choice with the unique highest positive score, or None when there is no single right one."""
    if not scores:
        return None
    best = max(scores.values())
    winners = [choice for choice, score in scores.items() if score == best]
    return winners[0] if len(winners) == 1 and best > 0 else None


def _to_raw(example: Any, where: str) -> _Raw | None:
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
        raise DataError(f"{where}: a BIG-bench example needs a string 'input', got {str(example)[:200]}")
    scores = example.get("target_scores") or {}
    target = example.get("target")
    targets = [target] if isinstance(target, str) else [t for t in target or [] if isinstance(t, str)]
    text = example["input"].strip()
    if not text:
        return None
    return _Raw(text, [str(c) for c in scores], _answer(scores), targets)


def _clean(examples: list[dict[str, Any]], task_path: str, stats: Counter[str]) -> list[_Raw]:
    """Strip, drop empty inputs, keep exact duplicates once, drop inputs with conflicting answers."""
    groups: dict[tuple[str, tuple[str, ...]], list[_Raw]] = {}
    for index, example in enumerate(examples):
        raw = _to_raw(example, f"BIG-bench {task_path} example {index}")
        if raw is None:
            stats["empty_input"] += 1
            continue
        groups.setdefault((raw.input, tuple(sorted(raw.choices))), []).append(raw)
    cleaned = []
    for group in groups.values():
        answers = {(r.answer, tuple(r.targets) if not r.choices else ()) for r in group}
        if len(answers) > 1:
            stats["conflicting_answers"] += len(group)
            continue
        stats["duplicates"] += len(group) - 1
        cleaned.append(group[0])
    return cleaned


def _reduce(raws: list[_Raw], keep: tuple[str, ...], stats: Counter[str]) -> list[_Raw]:
    """Keep the examples whose right answer is in ``keep``, with only those choices (in that order)."""
    kept = [_Raw(r.input, [c for c in keep if c in r.choices], r.answer, r.targets) for r in raws if r.answer in keep]
    stats["other_answers"] += len(raws) - len(kept)
    return kept


# ----------------------------------------------------------------------------------------------------
# Views


def _fixed_choices(raws: list[_Raw]) -> list[str] | None:
    sets = {frozenset(r.choices) for r in raws}
    if len(sets) == 1 and len(next(iter(sets))) >= 2:
        return sorted(next(iter(sets)))
    return None


def _default_kind(raws: list[_Raw]) -> str:
    if all(r.answer is not None for r in raws) and _fixed_choices(raws):
        return "classification"
    if all(r.choices for r in raws):
        return "multiple_choice"
    return "generation"


def _as_classification(raws: list[_Raw], name: str, stats: Counter[str]) -> tuple[list[Example], list[str]]:
    labels = _fixed_choices(raws)
    if labels is None:
        raise ConfigError(
            f"{name}: the answer choices differ between examples, so there is no fixed label set; "
            f"use the multiple_choice view (kind='multiple_choice' or an @multiple_choice suffix)"
        )
    index = {label: i for i, label in enumerate(labels)}
    examples = [{"text": r.input, "label": index[r.answer]} for r in raws if r.answer is not None]
    stats["no_single_answer"] += len(raws) - len(examples)
    return examples, labels


def _as_multiple_choice(raws: list[_Raw], name: str, stats: Counter[str]) -> tuple[list[Example], list[str]]:
    examples = [
        {"input": r.input, "choices": list(r.choices), "label": r.choices.index(r.answer)}
        for r in raws
        if r.answer is not None and len(r.choices) >= 2
    ]
    stats["no_single_answer"] += len(raws) - len(examples)
    if not examples:
        raise ConfigError(f"{name}: no example has answer choices with a single right one; try @generation")
    return examples, []


def _as_generation(raws: list[_Raw], name: str, stats: Counter[str]) -> tuple[list[Example], list[str]]:
    examples = []
    for r in raws:
        targets = r.targets or ([r.answer] if r.answer is not None else [])
        if targets:
            examples.append({"prompt": r.input, "completion": targets[0], "targets": targets})
    stats["no_target"] += len(raws) - len(examples)
    return examples, []


_VIEWS: dict[str, Callable[[list[_Raw], str, Counter[str]], tuple[list[Example], list[str]]]] = {
    "classification": _as_classification,
    "multiple_choice": _as_multiple_choice,
    "generation": _as_generation,
}


def load_bigbench_task(
    arg: str, *, seed: int, max_train: int | None, max_eval: int | None, kind: str | None
) -> Task:
    """Load ``bigbench:<arg>`` (see the module docstring for views, cleaning and splits)."""
    if kind is not None and kind not in TASK_KINDS:
        raise ConfigError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    embedded = EMBEDDED_VIEWS.get(arg)
    task_path = embedded.source if embedded else arg
    name = f"bigbench:{arg}"
    examples, meta = _load_examples(bigbench_task_dir(task_path), task_path)
    stats: Counter[str] = Counter(raw_examples=len(examples))
    raws = _clean(examples, task_path, stats)
    if embedded:
        raws = _reduce(raws, embedded.keep_answers, stats)
    view = kind or _default_kind(raws)
    view_examples, labels = _VIEWS[view](raws, name, stats)
    stats["examples"] = len(view_examples)
    splits = make_splits({"train": view_examples, "validation": None, "test": None}, seed, source=name)
    info = _info(task_path, meta, stats, embedded)
    if labels:
        info["label_counts"] = dict(Counter(labels[e["label"]] for e in view_examples))
    return Task(
        name=name,
        kind=view,
        splits=cap_splits(splits, max_train, max_eval),
        labels=labels,
        scorer=exact_match if view == "generation" else None,
        info=info,
    )


def _info(task_path: str, meta: dict[str, Any], stats: Counter[str], embedded: EmbeddedView | None) -> dict[str, Any]:
    keep = ("description", "task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix")
    info: dict[str, Any] = {"source": f"BIG-bench {BIGBENCH_REQUIREMENT}", "task_path": task_path}
    info.update({key: meta[key] for key in keep if key in meta})
    if "subtasks" in meta:
        info["subtasks"] = meta["subtasks"]
    if embedded:
        info["description"] = embedded.description
        info["task_prefix"] = embedded.task_prefix
        info["kept_answers"] = list(embedded.keep_answers)
    info["counts"] = dict(stats)
    return info
