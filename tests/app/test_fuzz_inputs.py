"""Seeded fuzzing of --config files and JSONL data (issue 18): hundreds of mutated files, each either accepted
or refused with a lora-tsd error (never another exception, i.e. never a traceback on the command line), and
nothing written anywhere while reading them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from catalogue import snapshot

from lora_tsd.app.assets.tasks import load_task
from lora_tsd.app.cli.options import load_config_file
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.errors import TSDError

SEED = 18
CONFIG = ('model: ./m\ntask: jsonl:data.jsonl\nlr: 0.002\nsteps: 10\nbatch_size: 4\nmethod: dash\nr: 4\n'
          'prelaunch_steps: 2\ntarget_modules: [query, value]\nbf16: false\nseed: 3\nweight_decay: 0.01\n')
JSONL = "".join(json.dumps({"text": f"good movie {i}", "label": i % 2}) + "\n" for i in range(10))
TOKENS = ['"', "'", ":", "[", "]", "{", "}", ",", "\n", "-", "&a", "*a", "!!python/object:os.system", "\x00",
          "\xff", "nan", "inf", "1e999", "true", "null", "  ", "#", "\t", "0x10", "-1", "99999999999999999999999",
          "[" * 300, "\ufeff", "label", "choices", '"label": 100000', "<<: *a"]


def mutate(text: str, rng: random.Random) -> bytes:
    """One to four random edits: insert a token, delete a span, duplicate a line, or flip a byte."""
    data = text
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(data) + 1)
        action = rng.randrange(4)
        if action == 0:
            data = data[:pos] + rng.choice(TOKENS) + data[pos:]
        elif action == 1:
            data = data[:pos] + data[pos + rng.randint(1, 12):]
        elif action == 2 and "\n" in data:
            lines = data.splitlines(keepends=True)
            k = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines) + 1), lines[k])
            data = "".join(lines)
        else:
            raw = bytearray(data.encode("utf-8", "surrogatepass"))
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            return bytes(raw)
    return data.encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("batch", range(4))
def test_mutated_config_files_never_crash(tmp_path: Path, batch: int) -> None:
    rng = random.Random(SEED * 100 + batch)
    before = snapshot(tmp_path)
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(100):
        path = tmp_path / f"c{batch}-{i}.yaml"
        path.write_bytes(mutate(CONFIG, rng))
        before[str(path)] = snapshot(path)[str(path)]
        try:
            TrainConfig.from_dict(load_config_file(str(path)))
            outcomes["accepted"] += 1
        except TSDError as err:
            assert len(str(err)) < 2000
            outcomes["refused"] += 1
    assert snapshot(tmp_path) == before  # reading configs writes nothing
    assert outcomes["refused"] > 10  # the mutations do break files


@pytest.mark.parametrize("batch", range(4))
def test_mutated_jsonl_data_never_crashes(tmp_path: Path, batch: int) -> None:
    rng = random.Random(SEED * 1000 + batch)
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(100):
        path = tmp_path / f"d{batch}-{i}.jsonl"
        path.write_bytes(mutate(JSONL, rng))
        before = snapshot(tmp_path)
        try:
            load_task(f"jsonl:{path}", seed=0, max_train=None, max_eval=None)
            outcomes["accepted"] += 1
        except TSDError as err:
            assert len(str(err)) < 2000
            outcomes["refused"] += 1
        assert snapshot(tmp_path) == before
    assert outcomes["refused"] > 10
