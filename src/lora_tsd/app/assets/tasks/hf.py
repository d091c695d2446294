"""Tasks from Hugging Face ``datasets``: ``hf:<dataset_id>[:<config>]`` (needs the Hub, or its cache).

Column conventions (first match wins; the kind can be forced with ``kind=`` or an ``@kind`` suffix):

- multiple choice: a choices column ``choices`` / ``endings`` / ``options`` (a list of strings, or a
  ``{"text": [...], "label": [...]}`` dict as in ARC), an input column ``input`` / ``question`` /
  ``ctx`` / ``sentence`` / ``goal``, and the answer in ``label`` / ``answer`` / ``answerKey`` (an index,
  a digit string, or one of the choice labels such as ``"B"``);
- classification: a ``label`` column (``ClassLabel`` names become ``Task.labels``; other values are
  sorted) and the text in ``text`` / ``sentence`` / ``content`` / ``review``, or a sentence pair joined
  by a newline: ``sentence1``+``sentence2``, ``premise``+``hypothesis``, ``question``+``sentence``,
  ``question``+``passage``, ``question1``+``question2``;
- generation: ``prompt``+``completion``, ``question``+``answer``, ``input``+``output`` or
  ``input``+``target``.

Splits ``train``, ``validation`` (or ``validation_matched`` / ``valid`` / ``dev``) and ``test`` are used
when present; a split whose labels are all hidden (negative, as in GLUE's test sets) counts as missing, and
missing evaluation splits are carved out of train with a seeded shuffle (10 % each).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lora_tsd.app.assets.download_cache import hub_offline_requested, hub_unreachable
from lora_tsd.app.assets.tasks.base import SPLITS, TASK_KINDS, Example, Task, cap_splits, make_splits
from lora_tsd.app.errors import AssetNotAvailableError, DataError
from lora_tsd.errors import ConfigError

__all__ = ["load_hf_task"]

_SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "validation_matched", "valid", "dev"),
    "test": ("test", "test_matched"),
}
_TEXT_COLUMNS = ("text", "sentence", "content", "review")
_PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question", "passage"),
    ("question1", "question2"),
)
_CHOICE_COLUMNS = ("choices", "endings", "options")
_MC_INPUT_COLUMNS = ("input", "question", "ctx", "sentence", "goal")
_MC_ANSWER_COLUMNS = ("label", "answer", "answerKey")
_GENERATION_COLUMNS = (("prompt", "completion"), ("question", "answer"), ("input", "output"), ("input", "target"))


def _first(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _first_pair(columns: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    return next((p for p in pairs if p[0] in columns and p[1] in columns), None)


def _detect_kind(columns: Sequence[str]) -> str:
    if _first(columns, _CHOICE_COLUMNS) and _first(columns, _MC_INPUT_COLUMNS) and _first(columns, _MC_ANSWER_COLUMNS):
        return "multiple_choice"
    if "label" in columns and (_first(columns, _TEXT_COLUMNS) or _first_pair(columns, _PAIR_COLUMNS)):
        return "classification"
    if _first_pair(columns, _GENERATION_COLUMNS):
        return "generation"
    raise DataError(
        f"cannot map the columns {list(columns)} to a task; see lora_tsd.tasks.hf for the column conventions, "
        f"or convert the data to jsonl"
    )


# ----------------------------------------------------------------------------------------------------
# Row converters: each returns the example, or None for a row without a usable (visible) label.


Converter = Callable[[Mapping[str, Any]], Example | None]


def _missing_columns(kind: str, columns: Sequence[str]) -> DataError:
    return DataError(f"the columns {list(columns)} do not fit a {kind} task; see lora_tsd.tasks.hf for the conventions")


def _classification_converter(
    columns: Sequence[str], features: Mapping[str, Any]
) -> tuple[Converter, list[str] | None]:
    text = _first(columns, _TEXT_COLUMNS)
    pair = None if text else _first_pair(columns, _PAIR_COLUMNS)
    if "label" not in columns or (text is None and pair is None):
        raise _missing_columns("classification", columns)
    names = list(getattr(features.get("label"), "names", None) or []) or None

    def convert(row: Mapping[str, Any]) -> Example | None:
        label = row["label"]
        if label is None or (isinstance(label, int) and label < 0):
            return None
        content = row[text] if text else f"{row[pair[0]]}\n{row[pair[1]]}"  # type: ignore[index]
        return {"text": str(content), "label": label}

    return convert, names


def _mc_choices(value: Any) -> tuple[list[str], list[str] | None]:
    if isinstance(value, Mapping):  # ARC style: {"text": [...], "label": ["A", "B", ...]}
        return [str(t) for t in value.get("text", [])], [str(x) for x in value.get("label", [])]
    return [str(t) for t in value], None


def _mc_label(answer: Any, choice_labels: list[str] | None) -> int | None:
    if choice_labels and str(answer) in choice_labels:
        return choice_labels.index(str(answer))
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if answer >= 0 else None
    if isinstance(answer, str) and answer.strip().isdigit():
        return int(answer)
    return None


def _mc_converter(columns: Sequence[str], features: Mapping[str, Any]) -> tuple[Converter, None]:
    choices_column = _first(columns, _CHOICE_COLUMNS)
    input_column = _first(columns, _MC_INPUT_COLUMNS)
    answer_column = _first(columns, _MC_ANSWER_COLUMNS)
    if choices_column is None or input_column is None or answer_column is None:
        raise _missing_columns("multiple_choice", columns)

    def convert(row: Mapping[str, Any]) -> Example | None:
        choices, choice_labels = _mc_choices(row[choices_column])
        label = _mc_label(row[answer_column], choice_labels)
        if label is None:
            return None
        return {"input": str(row[input_column]), "choices": choices, "label": label}

    return convert, None


def _generation_converter(columns: Sequence[str], features: Mapping[str, Any]) -> tuple[Converter, None]:
    pair = _first_pair(columns, _GENERATION_COLUMNS)
    if pair is None:
        raise _missing_columns("generation", columns)
    prompt, completion = pair

    def convert(row: Mapping[str, Any]) -> Example | None:
        if row[completion] is None:
            return None
        return {"prompt": str(row[prompt]), "completion": str(row[completion])}

    return convert, None


_CONVERTERS: dict[str, Callable[[Sequence[str], Mapping[str, Any]], tuple[Converter, list[str] | None]]] = {
    "classification": _classification_converter,
    "multiple_choice": _mc_converter,
    "generation": _generation_converter,
}


# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _datasets_offline(datasets: Any, offline: bool) -> Iterator[None]:
    """Make ``datasets`` use only its cache for this call when the Hub is off or out of reach.

    ``datasets`` and ``huggingface_hub`` read HF_HUB_OFFLINE once, at import; without this a dead network
    costs about 25 s of retries before the same error.
    """
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_dataset_dict(dataset_id: str, config: str | None) -> Any:
    try:
        import datasets
    except ImportError as error:
        raise AssetNotAvailableError("hf: tasks need the datasets package: pip install 'lora-tsd[data]'") from error
    offline = hub_offline_requested() or hub_unreachable()
    try:
        with _datasets_offline(datasets, offline):
            return datasets.load_dataset(dataset_id, config)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise AssetNotAvailableError(
            f"dataset {dataset_id!r}{f' ({config})' if config else ''} is not in the local Hugging Face cache "
            f"and the Hub cannot be reached ({type(error).__name__}: {error}). Set up Hub access (network; "
            f"unset HF_HUB_OFFLINE) to download it once, or convert the data to jsonl and use jsonl:<path>"
        ) from error


def _pick_splits(dataset_dict: Mapping[str, Any]) -> dict[str, Any]:
    picked = {}
    for split, names in _SPLIT_NAMES.items():
        name = next((n for n in names if n in dataset_dict), None)
        if name is not None:
            picked[split] = dataset_dict[name]
    if "train" not in picked:
        raise DataError(f"the dataset has no train split (splits: {list(dataset_dict)})")
    return picked


def _convert_split(rows: Any, convert: Converter) -> list[Example] | None:
    examples = [example for row in rows if (example := convert(row)) is not None]
    return examples or None  # no visible labels (e.g. GLUE test): treat the split as missing


def _classification_labels(splits: Mapping[str, list[Example] | None], names: list[str] | None) -> list[str]:
    if names:
        return names
    values = sorted({e["label"] for examples in splits.values() if examples for e in examples}, key=str)
    index = {value: i for i, value in enumerate(values)}
    for examples in splits.values():
        for example in examples or []:
            example["label"] = index[example["label"]]
    return [str(v) for v in values]


def load_hf_task(arg: str, *, seed: int, max_train: int | None, max_eval: int | None, kind: str | None) -> Task:
    """Load ``hf:<dataset_id>[:<config>]`` (see the module docstring for the column conventions)."""
    dataset_id, _, config = arg.partition(":")
    if not dataset_id:
        raise ConfigError("hf: needs a dataset id, e.g. hf:nyu-mll/glue:sst2")
    if kind is not None and kind not in TASK_KINDS:
        raise ConfigError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    raw = _pick_splits(_load_dataset_dict(dataset_id, config or None))
    columns = list(raw["train"].column_names)
    kind = kind or _detect_kind(columns)
    convert, names = _CONVERTERS[kind](columns, raw["train"].features)
    converted = {split: _convert_split(raw[split], convert) if split in raw else None for split in SPLITS}
    labels = _classification_labels(converted, names) if kind == "classification" else []
    splits = make_splits(converted, seed, source=f"hf:{arg}")
    return Task(
        name=f"hf:{arg}",
        kind=kind,
        splits=cap_splits(splits, max_train, max_eval),
        labels=labels,
        info={"source": "Hugging Face datasets", "dataset": dataset_id, "config": config or None},
    )
