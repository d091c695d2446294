"""Tasks from local JSON Lines files: ``jsonl:<path>``.

One JSON object per line (blank lines are skipped). The kind is inferred from the keys of the first
example and every other line must have the same kind:

- classification: ``{"text": "...", "label": 1}``; ``label`` is an integer class id, or a class name
  (string) in every line. Class names come from ``labels.json`` / ``<stem>.labels.json`` beside the files
  (a JSON list of names, index = class id) when present; otherwise integer labels give ``0 .. max``
  (names ``"0"``, ``"1"``, ...) and string labels their sorted distinct values.
- multiple choice: ``{"input": "...", "choices": ["a", "b", ...], "label": 0}``, ``label`` the index of
  the right choice.
- generation: ``{"prompt": "...", "completion": "..."}``.

Extra keys are kept. Where the splits come from, for ``jsonl:<path>``:

- ``<path>`` is a folder: ``train.jsonl`` (required), ``validation.jsonl`` and ``test.jsonl`` inside it;
- ``<dir>/<stem>.train.jsonl`` exists for ``<path>`` = ``<dir>/<stem>`` or ``<dir>/<stem>.jsonl``: the
  sibling files ``<stem>.train.jsonl``, ``<stem>.validation.jsonl``, ``<stem>.test.jsonl``;
- otherwise ``<path>`` is one file.

A missing validation or test split is carved out of train with a seeded shuffle (10 % each). Every error
names the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_tsd.app.assets.tasks.base import SPLITS, Example, Task, cap_splits, check_example, infer_kind, make_splits
from lora_tsd.app.errors import DataError
from lora_tsd.config import short_repr
from lora_tsd.errors import ConfigError

__all__ = ["load_jsonl_task", "read_jsonl"]


def read_jsonl(path: Path) -> tuple[list[Example], list[int]]:
    """Parse a JSON Lines file into objects, with the 1-based line number of each.

    Raises:
        DataError: unreadable file, malformed JSON or a line that is not an object (file:line given).
    """
    examples: list[Example] = []
    line_numbers: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from error
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: malformed JSON: {error.msg} (column {error.colno})") from error
        except RecursionError:
            raise DataError(f"{path}:{number}: the JSON is nested too deeply to be an example") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        examples.append(value)
        line_numbers.append(number)
    return examples, line_numbers


def _split_files(path: Path) -> tuple[dict[str, Path], Path | None]:
    """Map each present split to its file, and return the labels file to look for."""
    if path.is_dir():
        files = {split: path / f"{split}.jsonl" for split in SPLITS}
        if not files["train"].is_file():
            raise DataError(f"{path}: a task folder needs train.jsonl (and optionally validation/test.jsonl)")
        return {s: f for s, f in files.items() if f.is_file()}, path / "labels.json"
    stem = path.name.removesuffix(".jsonl")
    siblings = {split: path.with_name(f"{stem}.{split}.jsonl") for split in SPLITS}
    if siblings["train"].is_file():
        return {s: f for s, f in siblings.items() if f.is_file()}, path.with_name(f"{stem}.labels.json")
    if not path.is_file():
        raise DataError(f"{path}: no such file (nor {siblings['train'].name} beside it)")
    return {"train": path}, path.with_name(f"{stem}.labels.json")


def _read_label_names(path: Path | None) -> list[str] | None:
    if path is None or not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the label names: {error}") from error
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a non-empty JSON list of class names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names must be distinct")
    return names


def _check_classification_shape(example: Example, origin: str) -> None:
    if not isinstance(example["text"], str):
        raise DataError(f"{origin}: 'text' must be a string, got {type(example['text']).__name__}")
    label = example["label"]
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise DataError(f"{origin}: 'label' must be an integer class id or a class name, got {label!r}")


class _Parsed:
    """Examples of all split files with where each came from, for error messages."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.kind_origin = ""
        self.splits: dict[str, list[Example]] = {}
        self.origins: dict[str, list[str]] = {}

    def add_file(self, split: str, path: Path) -> None:
        examples, numbers = read_jsonl(path)
        if not examples:
            raise DataError(f"{path}: no examples (the {split} split would be empty)")
        origins = [f"{path}:{number}" for number in numbers]
        for example, origin in zip(examples, origins, strict=True):
            self._check_kind(example, origin)
            if self.kind == "classification":  # ids are bounded later, once all files are read
                _check_classification_shape(example, origin)
            else:
                check_example(example, self.kind, None, origin)
        self.splits[split] = examples
        self.origins[split] = origins

    def _check_kind(self, example: Example, origin: str) -> None:
        kind = infer_kind(example)
        if kind is None:
            raise DataError(
                f"{origin}: keys {sorted(example)} match no task schema: need text+label (classification), "
                f"input+choices+label (multiple choice) or prompt+completion (generation)"
            )
        if self.kind is None:
            self.kind, self.kind_origin = kind, origin
        elif kind != self.kind:
            raise DataError(f"{origin}: mixed schemas: this line is {kind} but {self.kind_origin} is {self.kind}")


def _label_kinds(parsed: _Parsed) -> set[type]:
    return {type(e["label"]) for examples in parsed.splits.values() for e in examples}


def _resolve_classification_labels(parsed: _Parsed, names: list[str] | None) -> list[str]:
    """Turn string labels into ids, and check every id against the class count (file:line on error)."""
    label_types = _label_kinds(parsed)
    if len(label_types) > 1:
        raise DataError(f"{parsed.kind_origin}: labels mix class names (strings) and integer ids across lines")
    if label_types == {str}:
        values = sorted({e["label"] for exs in parsed.splits.values() for e in exs})
        names = names or values
        index = {name: i for i, name in enumerate(names)}
        for split, examples in parsed.splits.items():
            for example, origin in zip(examples, parsed.origins[split], strict=True):
                if example["label"] not in index:
                    raise DataError(f"{origin}: label {example['label']!r} is not one of the classes {names}")
                example["label"] = index[example["label"]]
        return names
    if names is None:
        highest, where = max((e["label"], origin) for split, exs in parsed.splits.items()
                             for e, origin in zip(exs, parsed.origins[split], strict=True))
        present = {e["label"] for exs in parsed.splits.values() for e in exs}
        if highest >= 0 and len(present) < highest + 1:  # ids must be 0..K-1, else a K-class head is guessed
            absent = sorted(set(range(highest + 1)) - present)
            raise DataError(f"{where}: label {highest} would make {highest + 1} classes, but ids "
                            f"{short_repr(absent)} never occur; class ids must be 0..K-1 (or give the class names "
                            "in labels.json)")
        names = [str(i) for i in range(highest + 1)]
    train = parsed.splits.get("train") or [e for exs in parsed.splits.values() for e in exs]
    train_labels = {e["label"] for e in train}
    if len(train_labels) < 2:
        raise DataError(f"{parsed.kind_origin}: the training data has {len(train_labels)} class(es); a classifier "
                        "needs examples of at least two")
    for split, examples in parsed.splits.items():
        for example, origin in zip(examples, parsed.origins[split], strict=True):
            check_example(example, "classification", len(names), origin)
    return names


def load_jsonl_task(
    arg: str, *, seed: int, max_train: int | None, max_eval: int | None, kind: str | None
) -> Task:
    """Load ``jsonl:<arg>`` (see the module docstring for the layout and schemas)."""
    if not arg:
        raise ConfigError("jsonl: needs a path, e.g. jsonl:data/sst2.jsonl")
    path = Path(arg).expanduser()
    files, labels_file = _split_files(path)
    parsed = _Parsed()
    for split, file in files.items():
        parsed.add_file(split, file)
    assert parsed.kind is not None
    if kind is not None and kind != parsed.kind:
        raise DataError(f"{parsed.kind_origin}: the data is {parsed.kind}, but kind={kind!r} was asked for")
    labels: list[str] = []
    if parsed.kind == "classification":
        labels = _resolve_classification_labels(parsed, _read_label_names(labels_file))
    splits = make_splits({s: parsed.splits.get(s) for s in SPLITS}, seed, source=str(path))
    info: dict[str, Any] = {"source": "jsonl", "files": {s: str(f) for s, f in files.items()}}
    return Task(
        name=f"jsonl:{arg}",
        kind=parsed.kind,
        splits=cap_splits(splits, max_train, max_eval),
        labels=labels,
        info=info,
    )
