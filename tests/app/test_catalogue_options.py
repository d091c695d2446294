"""Hardening catalogue, options, config files and data files (issue 18): every wrongly typed, out-of-range or
inconsistent value, every malformed config or data file gets its own `lora-tsd train: error:` line (exit 2 for
misuse, 1 for bad data), no traceback, and no output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from catalogue import check_case
from tiny_assets import make_encoder, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("opts")
    return {"root": root, "enc": make_encoder(root / "enc"), "task": write_jsonl(root / "s.jsonl", sentiment_rows(40))}


def _train(w, out: Path, *extra: str, task: Path | None = None) -> list[str]:
    return ["train", "--model", str(w["enc"]), "--task", f"jsonl:{task or w['task']}", "--output-dir", str(out),
            "--no-progress", "--steps", "1", "--batch-size", "4", *extra]


def _config(t: Path, content: str | bytes, name: str = "c.yaml") -> str:
    path = t / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _with_config(content: str | bytes, name: str = "c.yaml"):
    """Only the config file gives options (a flag would win over it); all of these fail before any load."""
    return lambda w, t: ["train", "--output-dir", str(t / "o"), "--config", _config(t, content, name)]


def _flags(*extra: str):
    return lambda w, t: _train(w, t / "o", *extra)


def _data(text: str):
    def build(w, t):
        path = t / "d.jsonl"
        path.write_text(text)
        return _train(w, t / "o", task=path)
    return build


def _rows(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


MC = [{"input": f"q{i}", "choices": ["a", "b", "c"], "label": i % 3} for i in range(12)]
# a billion-laughs alias bomb (9**9 leaves if expanded) inside the one option `lr`
BOMB = "lr: [&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "]\n"

# (id, argv builder, exit code, regex on the first error line)
CASES = [
    # ---- options: wrong types in config files (issue 18: tracebacks)
    ("config-lr-string", _with_config('{"lr": "0.01"}', "c.json"), 2, r"lr must be a finite number, got '0.01'"),
    ("config-dropout-string", _with_config('{"dropout": "0.1"}', "c.json"), 2,
     r"dropout must be a finite number, got '0.1'"),
    ("config-targets-int", _with_config('{"target_modules": 5}', "c.json"), 2,
     r"target_modules must be a list of strings or a string or null, got 5"),
    ("config-bf16-string", _with_config('{"bf16": "no"}', "c.json"), 2, r"bf16 must be true/false, got 'no'"),
    ("config-model-int", _with_config('{"model": 42}', "c.json"), 2, r"model must be a string, got 42"),
    ("config-seed-list", _with_config('{"seed": [1, 2]}', "c.json"), 2, r"seed must be an integer, got \[1, 2\]"),
    ("config-method-list", _with_config('{"method": ["lora"]}', "c.json"), 2, r"method must be a string"),
    ("config-overwrite-string", _with_config('{"overwrite": "false"}', "c.json"), 2,
     r"overwrite must be true/false, got 'false'"),
    ("config-steps-float", _with_config("steps: 2.5\n"), 2, r"steps must be an integer, got 2.5"),
    ("config-steps-bool", _with_config("steps: true\n"), 2, r"steps must be an integer, got True"),
    # ---- options: ranges (issue 18: silent acceptance or tracebacks)
    ("lr-inf", _flags("--lr", "inf"), 2, r"lr must be a finite number, got inf"),
    ("lr-nan", _flags("--lr", "nan"), 2, r"lr must be a finite number, got nan"),
    ("lr-negative", _flags("--lr", "-0.1"), 2, r"lr must be positive, got -0.1"),
    ("max-grad-norm-nan", _flags("--max-grad-norm", "nan"), 2, r"max_grad_norm must be a finite number, got nan"),
    ("max-grad-norm-negative", _flags("--max-grad-norm", "-1"), 2, r"max_grad_norm must be ≥ 0"),
    ("weight-decay-negative", _flags("--weight-decay", "-1"), 2, r"weight_decay must be ≥ 0, got -1.0"),
    ("weight-decay-inf", _flags("--weight-decay", "inf"), 2, r"weight_decay must be a finite number"),
    ("seed-24-digits", _flags("--seed", "1" * 24), 2, r"seed must be an integer in \[0, 4294967295\], got 1{20}"),
    ("seed-negative", _flags("--seed", "-1"), 2, r"seed must be an integer in \[0, 4294967295\], got -1"),
    ("data-seed-huge", _flags("--data-seed", str(2**40)), 2, r"data_seed must be an integer in \[0, 4294967295\]"),
    ("prelaunch-equals-steps", _flags("--method", "dash", "--prelaunch-steps", "5", "--steps", "5"), 2,
     r"prelaunch_steps \(t\) = 5 must be less than steps = 5: dash switches after t steps and would never switch; "
     r"raise --steps above 5 or lower --prelaunch-steps below 5"),
    ("prelaunch-exceeds-steps", _flags("--method", "tsd", "--init-estimator", "prelaunch", "--prelaunch-steps", "9",
                                       "--steps", "3"), 2, r"prelaunch_steps \(t\) = 9 must be less than steps = 3"),
    ("batch-larger-than-data", _flags("--batch-size", "1000"), 2,
     r"batch_size = 1000 is larger than the \d+ training examples"),
    ("steps-zero", _flags("--steps", "0"), 2, r"steps must be a positive integer, got 0"),
    ("rank-negative", _flags("--rank", "-2"), 2, r"r must be a positive integer"),
    ("dropout-above-one", _flags("--dropout", "1.5"), 2, r"dropout"),
    ("no-target-matches", _flags("--target-modules", "nothing_like_this"), 2,
     r"no module matches target_modules=\['nothing_like_this'\]. adaptable layers"),
    # ---- config files (issue 18: tracebacks, silent last-wins, unclear messages)
    ("config-non-utf8", _with_config(b"lr: \xff\xfe 0.1\n"), 2, r"is not UTF-8 text \(invalid start byte at byte 4\)"),
    ("config-duplicate-key", _with_config("lr: 0.1\nsteps: 3\nlr: 0.2\n"), 2,
     r"key 'lr' is given twice \(line 3\); give each option once"),
    ("config-duplicate-json-key", _with_config('{"seed": 1, "seed": 2}', "c.json"), 2, r"key 'seed' is given twice"),
    ("config-deep-nesting", _with_config("lr: " + "[" * 100_000 + "]" * 100_000 + "\n"), 2,
     r"is nested too deeply|is not valid YAML"),
    ("config-alias-bomb", _with_config(BOMB), 2, r"lr must be a finite number, got \[\["),
    ("config-is-a-folder", lambda w, t: [*_train(w, t / "o"), "--config", str(t)], 2, r"--config .* is not a file"),
    ("config-scalar", _with_config("3\n"), 2, r"must hold a mapping of option names to values"),
    ("config-unknown-key", _with_config("learning_rate: 0.1\n"), 2, r"unknown key\(s\) in .*'learning_rate'"),
    # ---- data files: exit 1, file:line named
    ("jsonl-nested-100000", _data('{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n"), 1,
     r"d.jsonl:1: (the JSON is nested too deeply|malformed JSON)"),
    ("label-100000", _data(_rows([{"text": f"t{i}", "label": i % 2} for i in range(7)]
                                + [{"text": "x", "label": 100000}])), 1,
     r"d.jsonl:8: label 100000 would make 100001 classes, but ids \[2, 3, .* never occur"),
    ("one-class", _data(_rows([{"text": f"t{i}", "label": 0} for i in range(20)])), 1,
     r"the training data has 1 class\(es\); a classifier needs examples of at least two"),
    ("duplicate-choices", _data(_rows([*MC, {"input": "q", "choices": ["a", "b", "a"], "label": 0}])), 1,
     r"d.jsonl:13: choice 'a' appears twice; the choices must differ"),
    ("empty-choice", _data(_rows([*MC, {"input": "q", "choices": ["a", " ", "c"], "label": 0}])), 1,
     r"d.jsonl:13: choice 1 is empty"),
    ("label-bool", _data(_rows([{"text": "a", "label": True}])), 1, r"d.jsonl:1: 'label' must be an integer"),
    ("label-negative", _data(_rows([{"text": f"t{i}", "label": i % 2 - 1} for i in range(8)])), 1,
     r"label -1 out of range"),
    ("data-not-utf8", lambda w, t: _train(w, t / "o", task=_binary(t)), 1, r"d.jsonl: cannot read"),
    ("data-line-is-list", _data("[1, 2]\n"), 1, r"d.jsonl:1: expected a JSON object, got list"),
    ("data-missing-file", lambda w, t: _train(w, t / "o", task=t / "none.jsonl"), 1,
     r"none.jsonl: no such file \(nor none.train.jsonl beside it\)"),
]

# every other option, wrongly typed or out of range, in a JSON config: (key, JSON value, message regex)
TYPED = [
    ('r', '"4"', r"r must be an integer, got '4'"),
    ('alpha', '"8"', r"alpha must be a finite number or null, got '8'"),
    ('steps', '-3', r'steps must be a positive integer, got -3'),
    ('batch_size', '0', r'batch_size must be a positive integer, got 0'),
    ('grad_accum', '0', r'grad_accum must be a positive integer, got 0'),
    ('eval_every', '-1', r'eval_every must be an integer ≥ 0, got -1'),
    ('warmup_steps', '-2', r'warmup_steps must be an integer ≥ 0, got -2'),
    ('lr', 'null', r'lr must be a finite number, got None'),
    ('seed', '1.5', r'seed must be an integer, got 1.5'),
    ('task', '["a"]', r"task must be a string, got \['a'\]"),
    ('progress', '"yes"', r"progress must be true/false, got 'yes'"),
    ('fsdp', '1', r'fsdp must be true/false, got 1'),
    ('trust_remote_code', '"true"', r"trust_remote_code must be true/false, got 'true'"),
    ('max_train', '"10"', r"max_train must be an integer or null, got '10'"),
    ('max_eval', '2.5', r'max_eval must be an integer or null, got 2.5'),
    ('max_length', '0', r'max_length must be a positive integer, got 0'),
    ('checkpoint_every', '-1', r'checkpoint_every must be an integer ≥ 0, got -1'),
    ('probe_batches', '0', r'probe_batches must be a positive integer, got 0'),
    ('skip_nonfinite', '"no"', r"skip_nonfinite must be true/false, got 'no'"),
    ('dash_directions', '"2"', r"dash_directions must be an integer, got '2'"),
]
CASES += [(f"config-{key}", _with_config(json.dumps({key: json.loads(value)}), "c.json"), 2, message)
          for key, value, message in TYPED]


def _binary(t: Path) -> Path:
    (t / "d.jsonl").write_bytes(b'{"text": "\xff", "label": 0}\n')
    return t / "d.jsonl"


def test_catalogue_size() -> None:
    from test_bad_input import CASES as BAD_INPUT_CASES
    from test_catalogue_runs import EXPORT_CASES, MANIFEST_CASES, OUTPUT_DIR_CASES, RESUME_CASES
    from test_catalogue_security import MODEL_CASES

    tables = [CASES, EXPORT_CASES, MANIFEST_CASES, OUTPUT_DIR_CASES, MODEL_CASES, RESUME_CASES, BAD_INPUT_CASES]
    assert sum(len(t) for t in tables) >= 120  # issue 18: a catalogue of at least 120 cases


@pytest.mark.parametrize(("build", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_option_and_file_cases(world, tmp_path, capsys, build, code, message) -> None:
    argv = build(world, tmp_path)
    check_case(argv, code, message, capsys, watched=(tmp_path, world["enc"], world["task"]))
    assert not (tmp_path / "o").exists()  # refused before anything is written
