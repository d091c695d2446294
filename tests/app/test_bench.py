"""Smoke test of ``lora-tsd bench``: the quick mode runs and prints every row. No timing is asserted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora_tsd.app.bench.cli import main as bench_main
from lora_tsd.app.bench.report import ROW_KEYS


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--only", "--sweep", "--plot", "--json", "--tokens", "--reps", "--threads",
                   "--rank", "--dash", "--input-grad", "--smol-layers", "--cache-root"):
        assert option in text


def test_quick_run_prints_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot, out = tmp_path / "sweep.png", tmp_path / "bench.json"
    code = bench_main(["--quick", "--threads", "1", "--sweep", "--plot", str(plot), "--json", str(out),
                       "--cache-root", str(tmp_path)])
    assert code == 0
    text = capsys.readouterr().out
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (T\d\.\d+) \| .*? \| .*? \| (.*?) \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    assert list(rows) == ROW_KEYS
    # Every row got a number (peft and transformers are installed in the test environment).
    assert all(re.match(r"\d+\.\d+", v) for v in rows.values()), rows
    for title in ("| d (d×d layer) |", "| s | lora | dash |", "| r | lora |"):
        assert title in text
    assert plot.exists() and plot.stat().st_size > 1000
    data = json.loads(out.read_text())
    assert [r["key"] for r in data["rows"]] == ROW_KEYS
    assert data["sweep"]["sizes"] and data["sweep"]["s"] and data["sweep"]["r"]
    assert not list(tmp_path.glob("tmp*"))  # the temporary SVD cache was removed


def test_interleaved_rotates_and_caps() -> None:
    from lora_tsd.app.bench.measure import interleaved

    calls: list[str] = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1,
                              fewer={"b": 1})
    assert calls == ["a", "b", "b", "a", "a", "a"]  # warm-up a b; then b a; a (b capped); a
    assert len(times["a"]) == 3 and len(times["b"]) == 1


def test_gpu_bench_smoke_runs_every_section_with_stand_in_drivers(tmp_path: Path) -> None:
    """bench/gpu_bench.py on a CPU: every section, and the cuSOLVER-only paths with LAPACK standing in."""
    import os
    import subprocess
    import sys

    out = tmp_path / "gpu_bench.json"
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--fake-drivers",
                           "--sections", "layers", "models", "svd", "svdacc", "switch", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    sections = {row["section"] for row in result["rows"]}
    assert any(s.startswith("switch (fp32 weights") for s in sections)
    assert any(s.startswith("switch with torch's default driver") for s in sections)
    svd_rows = [row for row in result["rows"] if row["section"] == "svd"]
    assert {row["driver"] for row in svd_rows} == {"default", "gesvdj", "gesvda", "gesvd", "library"}
    assert {row["shape"] for row in svd_rows} == {"64x64", "172x64", "64x172"}
    acc = [row for row in result["rows"] if row["section"].startswith("svd accuracy")]
    assert {row["driver"] for row in acc} == {"default", "gesvdj", "gesvda", "gesvd", "library"}
    assert all(row["svd_error"] <= row["tolerance"] for row in acc)  # LAPACK stands in: accurate everywhere
