"""Smoke test of ``lora-tsd bench``: the quick mode runs and prints every row. No timing is asserted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora_tsd import bench


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--only", "--sweep", "--plot", "--json", "--tokens", "--reps", "--threads",
                   "--rank", "--dash", "--input-grad", "--smol-layers", "--cache-root"):
        assert option in text


def test_quick_run_prints_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot, out = tmp_path / "sweep.png", tmp_path / "bench.json"
    code = bench.main(["--quick", "--threads", "1", "--sweep", "--plot", str(plot), "--json", str(out),
                       "--cache-root", str(tmp_path)])
    assert code == 0
    text = capsys.readouterr().out
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (T\d\.\d+) \| .*? \| .*? \| (.*?) \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    assert list(rows) == bench.ROW_KEYS
    # Every row got a number (peft and transformers are installed in the test environment).
    assert all(re.match(r"\d+\.\d+", v) for v in rows.values()), rows
    for title in ("| d (d×d layer) |", "| s | lora | dash |", "| r | lora |"):
        assert title in text
    assert plot.exists() and plot.stat().st_size > 1000
    data = json.loads(out.read_text())
    assert [r["key"] for r in data["rows"]] == bench.ROW_KEYS
    assert data["sweep"]["sizes"] and data["sweep"]["s"] and data["sweep"]["r"]
    assert not list(tmp_path.glob("tmp*"))  # the temporary SVD cache was removed


def test_interleaved_rotates_and_caps() -> None:
    calls: list[str] = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1,
                              fewer={"b": 1})
    assert calls == ["a", "b", "b", "a", "a", "a"]  # warm-up a b; then b a; a (b capped); a
    assert len(times["a"]) == 3 and len(times["b"]) == 1
