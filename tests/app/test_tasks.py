"""Task loading: jsonl schemas and errors, seeded splits, BIG-bench views (on a tiny fake archive),
reasoning-gym, HF column mapping. Integration tests at the end use the real archive and cache."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from lora_tsd.app.assets.pins import PINNED_SHA256
from lora_tsd.app.assets.tasks import SPLITS, Task, list_tasks, load_task, parse_task_spec
from lora_tsd.app.assets.tasks.base import cap_splits, derive_seed, exact_match, make_splits
from lora_tsd.app.errors import AssetNotAvailableError, DataError
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.atomic import file_sha256
from lora_tsd.errors import ConfigError


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_TSD_CACHE", str(cache))
    return cache


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cls_rows(n: int, n_labels: int = 2) -> list[dict]:
    return [{"text": f"sentence {i}", "label": i % n_labels} for i in range(n)]


def mc_rows(n: int) -> list[dict]:
    return [{"input": f"question {i}", "choices": ["a", "b", "c"], "label": i % 3} for i in range(n)]


def gen_rows(n: int) -> list[dict]:
    return [{"prompt": f"{i} + 1 =", "completion": str(i + 1)} for i in range(n)]


def all_examples(task: Task) -> list[str]:
    return [json.dumps(e, sort_keys=True) for split in SPLITS for e in task.splits[split]]


# ------------------------------------------------------------------------------------------------------
# spec parsing


def test_parse_task_spec() -> None:
    assert parse_task_spec("bigbench:multiemo") == ("bigbench", "multiemo", None)
    assert parse_task_spec("bigbench:strategyqa@multiple_choice") == ("bigbench", "strategyqa", "multiple_choice")
    assert parse_task_spec("jsonl:/a/b@c.jsonl") == ("jsonl", "/a/b@c.jsonl", None)  # not a kind: kept
    assert parse_task_spec("hf:nyu-mll/glue:sst2") == ("hf", "nyu-mll/glue:sst2", None)


@pytest.mark.parametrize("spec", ["multiemo", "nosuch:thing", ":x"])
def test_unknown_source(spec: str) -> None:
    with pytest.raises(ConfigError, match="bigbench:"):
        load_task(spec)


def test_kind_argument_conflicts_with_suffix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", cls_rows(20))
    with pytest.raises(ConfigError, match="asks for"):
        load_task(f"jsonl:{path}@classification", kind="generation")
    with pytest.raises(ConfigError, match="kind must be"):
        load_task(f"jsonl:{path}", kind="regression")


# ------------------------------------------------------------------------------------------------------
# jsonl: every kind and layout


def test_jsonl_classification_single_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", cls_rows(50, 3))
    task = load_task(f"jsonl:{path}")
    assert task.kind == "classification"
    assert task.labels == ["0", "1", "2"]
    assert task.sizes() == {"train": 40, "validation": 5, "test": 5}
    assert sorted(all_examples(task)) == sorted(json.dumps(r, sort_keys=True) for r in cls_rows(50, 3))


def test_jsonl_classification_string_labels_and_label_file(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    task = load_task(f"jsonl:{path}")
    assert task.labels == ["neg", "pos"]
    assert {e["label"] for e in task.train} == {0, 1}
    (tmp_path / "s.labels.json").write_text(json.dumps(["pos", "neg", "neutral"]))
    task = load_task(f"jsonl:{path}")
    assert task.labels == ["pos", "neg", "neutral"]
    by_text = {e["text"]: e["label"] for s in SPLITS for e in task.splits[s]}
    assert by_text["t1"] == 0 and by_text["t0"] == 1


def test_jsonl_multiple_choice(tmp_path: Path) -> None:
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'mc.jsonl', mc_rows(30))}")
    assert task.kind == "multiple_choice" and task.labels == []
    assert all(len(e["choices"]) == 3 for e in task.train)


def test_jsonl_generation_and_scoring(tmp_path: Path) -> None:
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'g.jsonl', gen_rows(30))}")
    assert task.kind == "generation"
    example = task.test[0]
    assert task.score_generation(f"  {example['completion']} ", example) == 1.0
    assert task.score_generation("nope", example) == 0.0


def test_jsonl_sibling_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.train.jsonl", cls_rows(30))
    write_jsonl(tmp_path / "d.validation.jsonl", cls_rows(4))
    write_jsonl(tmp_path / "d.test.jsonl", cls_rows(6))
    for spec in (tmp_path / "d", tmp_path / "d.jsonl"):
        task = load_task(f"jsonl:{spec}")
        assert task.sizes() == {"train": 30, "validation": 4, "test": 6}


def test_jsonl_folder_with_missing_validation(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "train.jsonl", cls_rows(40))
    write_jsonl(tmp_path / "data" / "test.jsonl", cls_rows(7))
    task = load_task(f"jsonl:{tmp_path / 'data'}")
    assert task.sizes() == {"train": 36, "validation": 4, "test": 7}  # validation carved from train


def test_jsonl_blank_lines_and_extra_keys_are_kept(tmp_path: Path) -> None:
    rows = [{**r, "id": i} for i, r in enumerate(gen_rows(10))]
    path = write_jsonl(tmp_path / "g.jsonl", [rows[0], "", *rows[1:]])
    task = load_task(f"jsonl:{path}")
    assert sum(task.sizes().values()) == 10 and "id" in task.train[0]


BAD_LINES = [
    ("malformed", ['{"text": "a", "label": 0}', '{"text": "b", "label": 1', '{"text": "c", "label": 0}'], 2,
     "malformed JSON"),
    ("not_object", ['{"text": "a", "label": 0}', '[1, 2]'], 2, "expected a JSON object"),
    ("missing_key", ['{"text": "a", "label": 0}', '{"text": "a", "label": 1}', '{"text": "b"}'], 3,
     "match no task schema"),
    ("mixed", ['{"text": "a", "label": 0}', '{"prompt": "p", "completion": "c"}'], 2, "mixed schemas"),
    ("mc_label_range", ['{"input": "q", "choices": ["a", "b"], "label": 1}',
                        '{"input": "q", "choices": ["a", "b"], "label": 2}'], 2, r"out of range \[0, 2\)"),
    ("mc_negative", ['{"input": "q", "choices": ["a", "b"], "label": -1}'], 1, "out of range"),
    ("mc_few_choices", ['{"input": "q", "choices": ["a"], "label": 0}'], 1, "at least two strings"),
    ("cls_negative", ['{"text": "a", "label": 0}', '{"text": "a", "label": -1}'], 2, "out of range"),
    ("cls_bool", ['{"text": "a", "label": true}'], 1, "integer class id"),
    ("cls_float", ['{"text": "a", "label": 1.0}'], 1, "integer class id"),
    ("text_type", ['{"text": 3, "label": 0}'], 1, "'text' must be a string"),
    ("gen_type", ['{"prompt": "p", "completion": 4}'], 1, "'completion' must be a string"),
]


@pytest.mark.parametrize(("name", "lines", "bad_line", "message"), BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, name: str, lines: list[str], bad_line: int,
                                         message: str) -> None:
    path = write_jsonl(tmp_path / f"{name}.jsonl", [*lines, *[lines[0]] * 5])
    with pytest.raises(DataError, match=message) as caught:
        load_task(f"jsonl:{path}")
    assert f"{path}:{bad_line}" in str(caught.value)


def test_jsonl_label_out_of_range_of_label_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*cls_rows(10), {"text": "x", "label": 2}])
    (tmp_path / "d.labels.json").write_text('["neg", "pos"]')
    with pytest.raises(DataError, match=r"out of range \[0, 2\)") as caught:
        load_task(f"jsonl:{path}")
    assert f"{path}:11" in str(caught.value)


def test_jsonl_unknown_string_label_and_mixed_label_types(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    (tmp_path / "d.labels.json").write_text('["neg", "pos"]')
    with pytest.raises(DataError, match="not one of the classes") as caught:
        load_task(f"jsonl:{path}")
    assert f"{path}:2" in str(caught.value)
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match="mix"):
        load_task(f"jsonl:{path}")


def test_jsonl_label_error_in_sibling_split_names_that_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.train.jsonl", mc_rows(10))
    bad = write_jsonl(tmp_path / "d.test.jsonl", [*mc_rows(2), {"input": "q", "choices": ["a", "b"], "label": 5}])
    with pytest.raises(DataError) as caught:
        load_task(f"jsonl:{tmp_path / 'd'}")
    assert f"{bad}:3" in str(caught.value)


def test_jsonl_empty_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_task(f"jsonl:{empty}")
    write_jsonl(tmp_path / "d.train.jsonl", cls_rows(10))
    (tmp_path / "d.validation.jsonl").write_text("")
    with pytest.raises(DataError, match="validation split would be empty"):
        load_task(f"jsonl:{tmp_path / 'd'}")
    with pytest.raises(DataError, match="too few"):
        load_task(f"jsonl:{write_jsonl(tmp_path / 'two.jsonl', cls_rows(2))}")
    with pytest.raises(DataError, match="no such file"):
        load_task(f"jsonl:{tmp_path / 'missing.jsonl'}")


def test_jsonl_kind_mismatch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", cls_rows(10))
    with pytest.raises(DataError, match="the data is classification"):
        load_task(f"jsonl:{path}@generation")


# ------------------------------------------------------------------------------------------------------
# seeded splits


def test_splits_are_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    rows = cls_rows(200)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first, again, other = load_task(f"jsonl:{path}", seed=3), load_task(f"jsonl:{path}", seed=3), \
        load_task(f"jsonl:{path}", seed=4)
    assert first.splits == again.splits
    assert first.splits["test"] != other.splits["test"]
    texts = {s: {e["text"] for e in first.splits[s]} for s in SPLITS}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert set().union(*texts.values()) == {r["text"] for r in rows}


def test_caps_give_nested_prefixes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", cls_rows(200))
    full = load_task(f"jsonl:{path}", seed=1)
    small = load_task(f"jsonl:{path}", seed=1, max_train=10, max_eval=3)
    assert small.sizes() == {"train": 10, "validation": 3, "test": 3}
    for split in SPLITS:
        assert small.splits[split] == full.splits[split][: len(small.splits[split])]
    with pytest.raises(ConfigError, match="max_train"):
        load_task(f"jsonl:{path}", max_train=0)


def test_make_splits_and_derive_seed() -> None:
    examples = [{"text": str(i), "label": 0} for i in range(10)]
    splits = make_splits({"train": examples, "validation": None, "test": None}, 0, source="x")
    assert [len(splits[s]) for s in SPLITS] == [8, 1, 1]
    given = make_splits({"train": examples, "validation": examples[:2], "test": examples[:3]}, 0, source="x")
    assert [len(given[s]) for s in SPLITS] == [10, 2, 3]
    assert cap_splits(given, 4, 1)["train"] == given["train"][:4]
    assert derive_seed(0, "train") != derive_seed(0, "test") != derive_seed(1, "test")
    assert derive_seed(5, "train") == derive_seed(5, "train")


def test_task_validates_itself() -> None:
    splits = {s: [{"text": "a", "label": 0}] for s in SPLITS}
    with pytest.raises(ConfigError, match="kind"):
        Task(name="t", kind="regression", splits=splits, labels=["a"])
    with pytest.raises(ConfigError, match="labels"):
        Task(name="t", kind="classification", splits=splits)
    with pytest.raises(DataError, match=r"t, train\[0\]: label 3 out of range"):
        Task(name="t", kind="classification", splits={**splits, "train": [{"text": "a", "label": 3}]},
             labels=["a", "b"])
    task = Task(name="t", kind="classification", splits=splits, labels=["a"])
    with pytest.raises(ConfigError, match="generation"):
        task.score_generation("a", splits["train"][0])
    assert exact_match("Paris ", {"completion": "x", "targets": ["paris", "Paris, France"]}) == 1.0


# ------------------------------------------------------------------------------------------------------
# BIG-bench on a tiny archive laid out like the real one


def _bb_member(tar: tarfile.TarFile, name: str, payload: dict | str) -> None:
    data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
    info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sentiment(text: str, label: str) -> dict:
    return {"input": text, "target_scores": {k: int(k == label) for k in ("ambivalent", "positive", "negative",
                                                                          "neutral")}}


@pytest.fixture
def fake_bigbench(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bigbench-1.0.0.tar.gz in the cache's downloads, so no download happens."""
    emo = [_sentiment(f"good {i}", "positive") for i in range(12)] + \
        [_sentiment(f"bad {i}", "negative") for i in range(15)] + \
        [_sentiment(f"meh {i}", "neutral") for i in range(5)] + \
        [_sentiment("good 0", "positive"), _sentiment("bad 1", "neutral"), _sentiment("  ", "negative"),
         _sentiment("so so", "ambivalent")]
    yes_no = [{"input": f"q{i}?", "target_scores": {"Yes": int(i % 2), "No": 1 - i % 2}, "target": "because"}
              for i in range(20)]
    mc = [{"input": f"what {i}", "target_scores": {f"a{i}": 0, f"b{i}": 1, f"c{i}": 0}} for i in range(20)]
    gen = [{"input": f"say {i}", "target": [str(i), f"#{i}"]} for i in range(20)]
    downloads = tmp_cache / "downloads"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        _bb_member(tar, "aaa_gen/task.json", {"name": "aaa_gen", "examples": gen})
        _bb_member(tar, "multiemo/task.json", {"name": "multiemo", "description": "sentiment"})
        _bb_member(tar, "multiemo/all_sentence_en/task.json", {"name": "all_sentence_en", "examples": emo})
        _bb_member(tar, "multiemo/all_sentence_de/task.json", {"name": "de", "examples": emo[:3]})
        _bb_member(tar, "prog/task.py", "print('programmatic')")
        _bb_member(tar, "split/task.json", {"name": "split"})
        _bb_member(tar, "split/one/task.json", {"name": "one", "examples": mc[:10]})
        _bb_member(tar, "split/two/task.json", {"name": "two", "examples": mc[10:]})
        _bb_member(tar, "yes_no/task.json", {"name": "yes_no", "task_prefix": "Answer.", "examples": yes_no})
    # the fake archive is the pinned file for these tests (the real pin is checked in test_security.py)
    monkeypatch.setitem(PINNED_SHA256, "bigbench==1.0.0", file_sha256(downloads / "bigbench-1.0.0.tar.gz"))
    return tmp_cache


def test_bigbench_multiemo_default_is_binary_sentiment(fake_bigbench: Path) -> None:
    task = load_task("bigbench:multiemo", seed=0)
    assert task.kind == "classification" and task.labels == ["negative", "positive"]
    counts = task.info["counts"]
    # "good 0" twice with the same label: kept once; "bad 1" both negative and neutral: dropped;
    # the blank input dropped; neutral and ambivalent sentences removed by the reduction.
    assert counts["duplicates"] == 1 and counts["conflicting_answers"] == 2 and counts["empty_input"] == 1
    assert task.info["label_counts"] == {"positive": 12, "negative": 14}
    texts = [e["text"] for s in SPLITS for e in task.splits[s]]
    assert len(texts) == len(set(texts)) == 26 and "bad 1" not in texts
    assert (fake_bigbench / "bigbench" / "multiemo" / "all_sentence_en" / "task.json").is_file()
    assert not (fake_bigbench / "bigbench" / "multiemo" / "all_sentence_de").exists()  # only what was asked


def test_bigbench_full_subtask_and_views(fake_bigbench: Path) -> None:
    four = load_task("bigbench:multiemo/all_sentence_en")
    assert four.labels == ["ambivalent", "negative", "neutral", "positive"]
    yes_no = load_task("bigbench:yes_no")
    assert yes_no.kind == "classification" and yes_no.labels == ["No", "Yes"]
    assert yes_no.info["task_prefix"] == "Answer."
    mc = load_task("bigbench:yes_no@multiple_choice")
    assert mc.kind == "multiple_choice" and all(e["choices"] == ["Yes", "No"] for e in mc.train)
    gen = load_task("bigbench:yes_no", kind="generation")
    assert gen.train[0]["completion"] == "because"


def test_bigbench_multiple_choice_and_subtask_union(fake_bigbench: Path) -> None:
    task = load_task("bigbench:split", seed=2)
    assert task.kind == "multiple_choice" and sum(task.sizes().values()) == 20
    assert task.info["subtasks"] == ["one", "two"]
    assert all(e["choices"][e["label"]].startswith("b") for s in SPLITS for e in task.splits[s])
    with pytest.raises(ConfigError, match="no fixed label set"):
        load_task("bigbench:split@classification")


def test_bigbench_generation_view(fake_bigbench: Path) -> None:
    task = load_task("bigbench:aaa_gen")
    assert task.kind == "generation"
    example = task.test[0]
    assert task.score_generation(example["targets"][1], example) == 1.0


def test_bigbench_split_determinism(fake_bigbench: Path) -> None:
    a, b, c = (load_task("bigbench:yes_no", seed=s) for s in (7, 7, 8))
    assert a.splits == b.splits and a.splits != c.splits


def test_bigbench_unknown_names(fake_bigbench: Path) -> None:
    with pytest.raises(ConfigError, match=r"no BIG-bench task 'yes_noo'\. Closest: yes_no\..*multiemo"):
        load_task("bigbench:yes_noo")
    with pytest.raises(ConfigError, match="no subtask 'all_sentence_xx'.*all_sentence_de, all_sentence_en"):
        load_task("bigbench:multiemo/all_sentence_xx")
    with pytest.raises(ConfigError, match="bad BIG-bench task name"):
        load_task("bigbench:../etc")
    with pytest.raises(DataError, match="programmatic"):
        load_task("bigbench:prog")
    assert not list((fake_bigbench / "bigbench").glob("*yes_noo*"))  # a failed extraction leaves nothing


def test_bigbench_offline_without_archive(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_tsd.app.assets.download_cache as cache

    monkeypatch.setattr(cache.sys, "executable", str(tmp_cache / "no-python"))
    with pytest.raises(AssetNotAvailableError, match=r"pip download --no-deps --no-binary :all: bigbench==1\.0\.0"):
        load_task("bigbench:multiemo")


def test_list_tasks_describes_embedded(tmp_cache: Path) -> None:
    rows = list_tasks()
    assert rows[0]["name"] == TrainConfig().task and rows[0]["kind"] == "classification"  # the default comes first
    bigbench = next(row for row in rows if row["name"] == "bigbench:multiemo")
    assert {"name", "kind", "examples", "description", "cached"} <= bigbench.keys()
    assert bigbench["cached"] is False


# ------------------------------------------------------------------------------------------------------
# reasoning-gym (installed from the data extra; generation is local and fast)


def test_reasoning_gym_splits_and_scorer() -> None:
    pytest.importorskip("reasoning_gym")
    task = load_task("reasoning-gym:basic_arithmetic", seed=1, max_train=30, max_eval=10)
    assert task.kind == "generation" and task.sizes() == {"train": 30, "validation": 10, "test": 10}
    prompts = {s: {e["prompt"] for e in task.splits[s]} for s in SPLITS}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    example = task.test[0]
    assert task.score_generation(example["completion"], example) == 1.0
    assert task.score_generation("not a number", example) < 1.0
    again = load_task("reasoning-gym:basic_arithmetic", seed=1, max_train=30, max_eval=10)
    assert [e["prompt"] for e in again.train] == [e["prompt"] for e in task.train]
    other = load_task("reasoning-gym:basic_arithmetic", seed=2, max_train=30, max_eval=10)
    assert [e["prompt"] for e in other.train] != [e["prompt"] for e in task.train]


def test_reasoning_gym_errors() -> None:
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ConfigError, match="Closest: basic_arithmetic"):
        load_task("reasoning-gym:basic_arithmetc")
    with pytest.raises(ConfigError, match=r"basic_arithmetic has \d+ distinct answer\(s\).*needs 2 to 16"):
        load_task("reasoning-gym:basic_arithmetic@classification", max_train=50, max_eval=20)
    with pytest.raises(ConfigError, match="propositional_logic has 1 distinct answer"):
        load_task("reasoning-gym:propositional_logic@classification", max_train=20, max_eval=10)
    with pytest.raises(ConfigError, match="generation and a classification view; kind='multiple_choice'"):
        load_task("reasoning-gym:syllogism@multiple_choice")


def test_reasoning_gym_classification_view() -> None:
    """A closed-answer generator as classification: labels are the sorted answers, texts the questions, and the
    examples are the generation view's, relabelled (same questions in the same order, no test question trained on)."""
    pytest.importorskip("reasoning_gym")
    task = load_task("reasoning-gym:syllogism@classification", seed=3, max_train=60, max_eval=20)
    generated = load_task("reasoning-gym:syllogism", seed=3, max_train=60, max_eval=20)
    assert task.kind == "classification" and task.labels == ["No", "Yes"]
    assert task.name == "reasoning-gym:syllogism@classification"
    for split in SPLITS:
        assert [e["text"] for e in task.splits[split]] == [e["prompt"] for e in generated.splits[split]]
        assert [task.labels[e["label"]] for e in task.splits[split]] == [
            e["completion"] for e in generated.splits[split]
        ]
    assert not {e["text"] for e in task.train} & {e["text"] for e in task.test}
    assert sum(task.info["label_counts"].values()) == 60


# ------------------------------------------------------------------------------------------------------
# HF datasets: column mapping (load_dataset stubbed with in-memory data) and offline error


def _stub_load_dataset(monkeypatch: pytest.MonkeyPatch, dataset_dict: object) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: dataset_dict)


def test_hf_classification_with_hidden_test_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    rows = {"sentence": [f"s{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
    hidden = {"sentence": ["t1", "t2"], "label": [-1, -1]}
    _stub_load_dataset(monkeypatch, datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows, features=features),
        "validation": datasets.Dataset.from_dict({k: v[:6] for k, v in rows.items()}, features=features),
        "test": datasets.Dataset.from_dict(hidden, features=features),
    }))
    task = load_task("hf:nyu-mll/glue:sst2")
    assert task.kind == "classification" and task.labels == ["negative", "positive"]
    assert task.sizes() == {"train": 36, "validation": 6, "test": 4}  # hidden test: carved from train


def test_hf_multiple_choice_arc_style(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"question": [f"q{i}" for i in range(20)],
            "choices": [{"text": ["x", "y", "z"], "label": ["A", "B", "C"]}] * 20,
            "answerKey": ["B"] * 20}
    _stub_load_dataset(monkeypatch, datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}))
    task = load_task("hf:allenai/ai2_arc:ARC-Easy")
    assert task.kind == "multiple_choice" and task.train[0]["choices"] == ["x", "y", "z"]
    assert all(e["label"] == 1 for e in task.train)


def test_hf_generation_and_bad_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"question": [f"q{i}" for i in range(20)], "answer": [str(i) for i in range(20)]}
    _stub_load_dataset(monkeypatch, datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}))
    assert load_task("hf:openai/gsm8k:main").kind == "generation"
    with pytest.raises(DataError, match="do not fit a multiple_choice task"):
        load_task("hf:openai/gsm8k:main@multiple_choice")
    _stub_load_dataset(monkeypatch, datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})}))
    with pytest.raises(DataError, match="cannot map the columns"):
        load_task("hf:some/data")


def test_hf_offline_is_asset_not_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(AssetNotAvailableError, match="jsonl:<path>"):
        load_task("hf:lora-tsd-test/does-not-exist")


# ------------------------------------------------------------------------------------------------------
# integration: the real BIG-bench archive and reasoning-gym, in the real cache


@pytest.mark.integration
def test_real_default_task() -> None:
    """The default task at its default sizes, as every default run sees it (seed 0)."""
    started = time.perf_counter()
    task = load_task("reasoning-gym:syllogism@classification", seed=0)
    print(f"\nreasoning-gym:syllogism@classification (generated) in {time.perf_counter() - started:.1f} s")
    assert task.labels == ["No", "Yes"]
    assert task.info["label_counts"] == {"Yes": 696, "No": 304}
    assert task.sizes() == {"train": 1000, "validation": 200, "test": 200}
    assert all(isinstance(e["text"], str) and "logically follow" in e["text"] for e in task.test)
    again = load_task("reasoning-gym:syllogism@classification", seed=0, max_train=100, max_eval=50)
    assert again.train == task.train[:100] and again.test == task.test[:50]


@pytest.mark.integration
def test_real_reasoning_gym_gsm_symbolic() -> None:
    pytest.importorskip("reasoning_gym")
    started = time.perf_counter()
    task = load_task("reasoning-gym:gsm_symbolic", seed=0)
    print(f"\nreasoning-gym:gsm_symbolic (1000/200/200) in {time.perf_counter() - started:.1f} s")
    assert task.sizes() == {"train": 1000, "validation": 200, "test": 200}
    assert all(task.score_generation(e["completion"], e) == 1.0 for e in task.test[:20])
