"""The result of one ``lora-tsd bench`` run: its rows (the issue's targets, in order), the absolute measurements
behind them, and their markdown tables and JSON."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .machine import machine_info
from .measure import Measure, MiB
from .settings import Settings

# (key, what is measured, target): the rows every run prints, in order.
ROWS: list[tuple[str, str, str]] = [
    ("T1.1", "dash/lora step time, layer A", "≤ 1.03"),
    ("T1.2", "dash/lora step peak memory, layer A", "≤ 1.02"),
    ("T1.3", "dense-dash (authors)/lora step time, layer A", "≫ 1 expected"),
    ("T1.4", "dense-dash (authors)/lora step peak memory, layer A", "> 1 expected"),
    ("T1.5", "dash/lora step time, layer B", "≤ 1.03"),
    ("T1.6", "dash/lora step peak memory, layer B", "≤ 1.02"),
    ("T1.7", "dense-dash (authors)/lora step time, layer B", "≫ 1 expected"),
    ("T1.8", "dense-dash (authors)/lora step peak memory, layer B", "> 1 expected"),
    ("T1.9", "dash/lora step time, whole MiniLM", "≤ 1.05"),
    ("T1.10", "dash/lora step peak memory, whole MiniLM", "report"),
    ("T2.1", "ours/PEFT lora step time, layer A", "≤ 1.02"),
    ("T2.2", "ours/PEFT lora step peak memory, layer A", "≤ 1.02"),
    ("T2.3", "ours/PEFT lora step time, layer B", "≤ 1.02"),
    ("T2.4", "ours/PEFT lora step peak memory, layer B", "≤ 1.02"),
    ("T2.5", "ours/PEFT lora step time, whole MiniLM", "≤ 1.02"),
    ("T2.6", "ours/PEFT lora step peak memory, whole MiniLM", "≤ 1.02"),
    ("T2.7", "ours/PEFT lora step time, whole SmolLM2", "≤ 1.02"),
    ("T2.8", "ours/PEFT lora step peak memory, whole SmolLM2", "≤ 1.02"),
    ("T3.1", "cold switch / (Σ thin SVD + projections)", "≤ 1.05 (no slower, within noise)"),
    ("T3.2", "cold switch, seconds", "report"),
    ("T3.3", "warm switch with the SVD cache, seconds", "< 2"),
    ("T3.4", "first switch filling the cache, seconds", "report"),
    ("T3.5", "serial switch peak extra memory / one layer's SVD + projections peak", "≤ 1.10"),
    ("T3.6", "default switch (layers in parallel, 1 thread per SVD) / serial switch (all threads per SVD)",
     "report"),
    ("T4.1", "merged/base forward time, whole MiniLM", "= 1 (same modules)"),
    ("T4.2", "merged model has the base model's modules and shapes (1 = yes)", "= 1"),
    ("T4.3", "unmerged dash/base forward time, whole MiniLM", "report"),
    ("T4.4", "unmerged lora/base forward time, whole MiniLM", "report"),
    ("T4.5", "unmerged dash/base forward time, layer A", "report"),
    ("T4.6", "unmerged dash/base forward time, layer B", "report"),
    ("T5.1", "2-process switch / 1-process serial switch (same 2 cores)", "≤ 0.6"),
    ("T5.2", "2-process switch / 1-process default switch (same 2 cores)", "report"),
]
ROW_KEYS = [key for key, _, _ in ROWS]


@dataclass
class Row:
    """One printed ratio: ``value`` with the min–max of the per-round paired ratios (``spread``)."""

    key: str
    what: str
    target: str
    value: float | None = None
    spread: tuple[float, float] | None = None
    min_ratio: float | None = None
    case: str = ""
    note: str = ""
    met: bool | None = None


class Report:
    """Collects rows and absolute measurements; prints them as markdown tables."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rows = {key: Row(key, what, target) for key, what, target in ROWS}
        self.measures: list[tuple[str, Measure]] = []
        self.notes: list[str] = []
        self.sweep: dict[str, Any] = {}

    def ratio(self, key: str, a: Measure, b: Measure, case: str, memory: bool = False) -> None:
        """Row ``key`` = a / b: of the median times (with the paired per-round ratios' range and the ratio of the
        minima), or with ``memory`` of the peak memories (with the RSS cross-check in the note)."""
        row = self.rows[key]
        row.case = case
        if memory:
            if a.peak is None or b.peak is None:
                row.note = "no memory reading"
                return
            row.value = a.peak / b.peak
            if a.peak_rss is not None and b.peak_rss is not None:
                row.note = f"RSS cross-check {a.peak_rss / b.peak_rss:.3f}"
        else:
            row.value = a.median / b.median
            row.min_ratio = min(a.seconds) / min(b.seconds)
            pairs = [x / y for x, y in zip(a.seconds, b.seconds, strict=False) if y > 0]
            row.spread = (min(pairs), max(pairs)) if pairs else None

    def value(self, key: str, value: float | None, case: str = "", note: str = "") -> None:
        """Row ``key`` = a number measured otherwise (seconds, a structural check)."""
        row = self.rows[key]
        row.value, row.case, row.note = value, case, note

    def skip(self, keys: Sequence[str], why: str) -> None:
        """Rows that cannot be measured here, with the reason (printed as their note)."""
        for key in keys:
            self.rows[key].note = why

    def add(self, group: str, *measures: Measure) -> None:
        """Absolute measurements for the second table, under ``group``."""
        self.measures.extend((group, m) for m in measures)

    def judge(self) -> None:
        """Set each row's ``met`` from its target text (``≤ x``, ``< x``, ``= x``); other targets stay unjudged."""
        for row in self.rows.values():
            if row.value is None or not math.isfinite(row.value):
                continue
            t = row.target
            if t.startswith("≤"):
                row.met = row.value <= float(t.split()[1])
            elif t.startswith("<"):
                row.met = row.value < float(t.split()[1])
            elif t.startswith("= 1 (same"):
                row.met = None  # timing of identical modules: noise only; T4.2 is the structural check
            elif t.startswith("="):
                row.met = row.value == float(t.split()[1])

    def tables(self) -> str:
        """The rows table, the absolute measurements table and the notes, as markdown."""
        self.judge()
        out = ["| row | measurement | case | value [paired min–max] | ratio of minima | target | met | note |",
               "|---|---|---|---|---|---|---|---|"]
        for row in self.rows.values():
            if row.value is None:
                val = "n/a"
            else:
                val = f"{row.value:.3f}"
                if row.spread is not None:
                    val += f" [{row.spread[0]:.3f}–{row.spread[1]:.3f}]"
            met = {True: "yes", False: "NO", None: ""}[row.met]
            mins = "" if row.min_ratio is None else f"{row.min_ratio:.3f}"
            out.append(f"| {row.key} | {row.what} | {row.case} | {val} | {mins} | {row.target} | {met} | "
                       f"{row.note} |")
        out += ["", "| group | variant | median s | min–max s | n | peak MiB (static + step) | static MiB | "
                "step MiB (torch) | step MiB (RSS) |", "|---|---|---|---|---|---|---|---|---|"]
        for group, m in self.measures:
            rng = f"{min(m.seconds):.4f}–{max(m.seconds):.4f}" if m.seconds else ""
            out.append(f"| {group} | {m.name} | {m.median:.4f} | {rng} | {len(m.seconds)} | {mib(m.peak)} | "
                       f"{mib(m.static_bytes)} | {mib(m.torch_extra)} | {mib(m.rss_extra)} |")
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        """Every number of the run, with the machine and the settings (what ``--json`` writes)."""
        self.judge()
        return {
            "machine": machine_info(self.settings.threads),
            "settings": dataclasses.asdict(self.settings),
            "rows": [dataclasses.asdict(r) for r in self.rows.values()],
            "measures": [{"group": g, **dataclasses.asdict(m), "median": m.median, "peak": m.peak}
                         for g, m in self.measures],
            "notes": self.notes,
            "sweep": self.sweep,
        }


def mib(n: int | None) -> str:
    """Bytes as MiB with one decimal, or an empty table cell."""
    return "" if n is None else f"{n / MiB:.1f}"


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout holds only the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

