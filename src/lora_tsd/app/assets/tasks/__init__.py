"""Tasks for the command-line workflow: where examples come from, their schemas, and seeded splits.

``load_task(spec)`` takes ``<source>:<argument>[@<kind>]``:

====================================  ============================================================
``bigbench:<task>[/<subtask>]``       BIG-bench JSON tasks from the ``bigbench==1.0.0`` archive
                                      (cached; the package index no longer serves it, see
                                      :mod:`lora_tsd.tasks.bigbench`).
``reasoning-gym:<generator>``         seeded generated reasoning problems with scorers (offline);
                                      ``@classification`` for closed answer sets:
                                      ``reasoning-gym:syllogism@classification`` is the default.
                                      See :mod:`lora_tsd.tasks.rgym`.
``jsonl:<path>``                      your own JSON Lines files. See :mod:`lora_tsd.tasks.jsonl`.
``hf:<dataset_id>[:<config>]``        Hugging Face ``datasets`` (needs the Hub or its cache).
                                      See :mod:`lora_tsd.tasks.hf`.
====================================  ============================================================

The optional ``@<kind>`` suffix (or the ``kind`` argument) picks the view of a source that has several:
``classification``, ``multiple_choice`` or ``generation`` (e.g. ``bigbench:strategyqa@multiple_choice``).
Example schemas per kind are in :mod:`lora_tsd.tasks.base`.

Splits are deterministic for a given ``seed``: the same spec and seed give the same train, validation and
test examples in the same order on every machine; ``max_train`` / ``max_eval`` keep a prefix of each
(nested subsets).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, Protocol

from lora_tsd.app.assets.download_cache import cache_dir, find_download, is_complete
from lora_tsd.app.assets.pins import PINNED_SHA256
from lora_tsd.app.assets.tasks.base import SPLITS, TASK_KINDS, Example, Task, exact_match
from lora_tsd.app.assets.tasks.bigbench import BIGBENCH_REQUIREMENT, EMBEDDED_VIEWS, load_bigbench_task
from lora_tsd.app.assets.tasks.hf import load_hf_task
from lora_tsd.app.assets.tasks.jsonl import load_jsonl_task
from lora_tsd.app.assets.tasks.rgym import load_reasoning_gym_task
from lora_tsd.errors import ConfigError

__all__ = [
    "SPLITS",
    "TASK_KINDS",
    "TASK_SOURCES",
    "Example",
    "Task",
    "exact_match",
    "list_tasks",
    "load_task",
    "parse_task_spec",
]


class TaskLoader(Protocol):
    """``loader(argument, seed=..., max_train=..., max_eval=..., kind=...) -> Task``."""

    def __call__(
        self, arg: str, *, seed: int, max_train: int | None, max_eval: int | None, kind: str | None
    ) -> Task: ...


#: Task sources by spec prefix; a new source is one entry here.
TASK_SOURCES: dict[str, TaskLoader] = {
    "bigbench": load_bigbench_task,
    "reasoning-gym": load_reasoning_gym_task,
    "jsonl": load_jsonl_task,
    "hf": load_hf_task,
}


def parse_task_spec(spec: str) -> tuple[str, str, str | None]:
    """Split ``<source>:<argument>[@<kind>]`` into its parts (kind None when absent).

    Raises:
        ConfigError: no ``source:`` prefix or an unknown source.
    """
    source, sep, arg = spec.partition(":")
    if not sep or source not in TASK_SOURCES:
        known = ", ".join(f"{name}:" for name in TASK_SOURCES)
        raise ConfigError(f"task {spec!r} must start with one of {known} (e.g. reasoning-gym:syllogism@classification)")
    kind = None
    head, at, tail = arg.rpartition("@")
    if at and tail in TASK_KINDS:
        arg, kind = head, tail
    return source, arg, kind


def load_task(
    spec: str,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    kind: str | None = None,
) -> Task:
    """Load a task with deterministic train/validation/test splits.

    Args:
        spec: ``<source>:<argument>[@<kind>]``, see the module docstring.
        seed: picks the split (and the generated data for reasoning-gym). Keep it fixed across
            training seeds to evaluate every run on the same test set.
        max_train: keep at most this many train examples (None: all; reasoning-gym: 1000).
        max_eval: keep at most this many validation and test examples each (None: all; reasoning-gym: 200).
        kind: the view to load when a source offers several; same as an ``@kind`` suffix.

    Raises:
        ConfigError: bad spec, unknown task, or a view the data cannot give.
        DataError: malformed, empty or inconsistent data (the message names the file and line).
        AssetNotAvailableError: the data is neither cached nor fetchable (the message says how to get it).
    """
    source, arg, spec_kind = parse_task_spec(spec)
    if kind is not None and kind not in TASK_KINDS:
        raise ConfigError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    if kind is not None and spec_kind is not None and kind != spec_kind:
        raise ConfigError(f"task {spec!r} asks for {spec_kind} but kind={kind!r} was given")
    return TASK_SOURCES[source](
        arg, seed=seed, max_train=max_train, max_eval=max_eval, kind=kind or spec_kind
    )


def _bigbench_data(path: str) -> str:
    """Where a BIG-bench task's data is: ``extracted`` (its folder is in the cache), ``downloaded`` (the archive is
    in the cache: extracted in seconds on first use), ``download`` (the archive is fetched on first use) or
    ``unavailable`` (lora-tsd has no SHA-256 pin for the archive, so it neither fetches nor reads one: the package
    index stopped serving bigbench==1.0.0 before a digest could be taken)."""
    if is_complete(cache_dir() / "bigbench" / path):
        return "extracted"
    if BIGBENCH_REQUIREMENT not in PINNED_SHA256:
        return "unavailable"
    return "downloaded" if find_download(BIGBENCH_REQUIREMENT, sdist=True) is not None else "download"


def _reasoning_gym_data(_: str) -> str:
    """``generated`` (the seeded generators are installed) or ``not installed`` (pip install the data extra)."""
    return "generated" if importlib.util.find_spec("reasoning_gym") is not None else "not installed"


#: Data states that need no download.
OFFLINE_DATA = ("extracted", "downloaded", "generated")


# (name, kind, examples after cleaning, description, where it is cached): the embedded, tested tasks.
_EMBEDDED_TASKS: tuple[tuple[str, str, int | None, str, Callable[[str], str], str], ...] = (
    ("reasoning-gym:syllogism@classification", "classification", None,
     "does a conclusion follow from two premises, Yes/No, seeded (the default task)", _reasoning_gym_data, ""),
    ("reasoning-gym:family_relationships@classification", "classification", None,
     "how two people in a described family are related, 12 classes, seeded", _reasoning_gym_data, ""),
    ("bigbench:multiemo", "classification", 36_306, EMBEDDED_VIEWS["multiemo"].description,
     _bigbench_data, EMBEDDED_VIEWS["multiemo"].source),
    ("bigbench:multiemo/all_sentence_en", "classification", 57_242,
     "MultiEmo English review sentences, 4 classes (ambivalent, negative, neutral, positive)",
     _bigbench_data, "multiemo/all_sentence_en"),
    ("bigbench:strategyqa", "classification", 2_289, "yes/no questions needing implicit reasoning (BoolQ-like)",
     _bigbench_data, "strategyqa"),
    ("bigbench:winowhy", "classification", 2_856, "is the reason given for a Winograd pronoun correct",
     _bigbench_data, "winowhy"),
    ("bigbench:vitaminc_fact_verification", "classification", 54_668, "claim vs Wikipedia quote: True/False/Neither",
     _bigbench_data, "vitaminc_fact_verification"),
    ("bigbench:social_iqa", "multiple_choice", 1_925, "social commonsense, 3 answers (SIQA)",
     _bigbench_data, "social_iqa"),
    ("bigbench:arithmetic", "multiple_choice", 15_023, "four operations, 1 to 5 digits (union of 20 subtasks)",
     _bigbench_data, "arithmetic"),
    ("reasoning-gym:gsm_symbolic", "generation", None, "GSM8K-derived templated word problems, seeded",
     _reasoning_gym_data, ""),
    ("reasoning-gym:basic_arithmetic", "generation", None, "arithmetic expressions, seeded",
     _reasoning_gym_data, ""),
    ("reasoning-gym:chain_sum", "generation", None, "chains of additions and subtractions, seeded",
     _reasoning_gym_data, ""),
    ("reasoning-gym:simple_equations", "generation", None, "linear equations in one unknown, seeded",
     _reasoning_gym_data, ""),
)


def list_tasks() -> list[dict[str, Any]]:
    """Describe the embedded tasks: name, kind, examples (None: generated on demand), description, data, cached.

    ``data`` says where the data is: ``extracted`` (ready in the cache), ``downloaded`` (the BIG-bench archive is
    in the cache; the task folder is extracted in seconds on first use), ``download`` (fetched on first use),
    ``unavailable`` (no pinned source), ``generated`` (reasoning-gym is installed) or ``not installed``. ``cached``
    is true when no download is needed.
    Any other BIG-bench JSON task, reasoning-gym generator, jsonl file or HF dataset works too.
    """
    rows = []
    for name, kind, examples, description, data_state, key in _EMBEDDED_TASKS:
        data = data_state(key)
        rows.append({"name": name, "kind": kind, "examples": examples, "description": description, "data": data,
                     "cached": data in OFFLINE_DATA})
    return rows
