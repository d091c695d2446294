"""``lora-tsd bench``: every performance ratio of issue 5, measured in one run on the CPU.

Targets (issue 5), each printed as one row of the result table:

1. A training step (forward + backward + AdamW) of a dash-phase layer vs a plain-LoRA layer of the same rank
   at LLaMA-7B shapes (4096×4096, 11008×4096; 2,048 tokens, fp32): time ≤ 1.03×, peak memory ≤ 1.02×; the
   authors' dense-dash pattern (``x @ (U_s diag(c) V_sᵀ)ᵀ`` built every forward) in the same table; the whole
   MiniLM-shaped model dash vs lora ≤ 1.05× time.
2. Our ``lora`` vs PEFT's LoRA (``peft.tuners.lora.Linear``), same shapes and rank: ≤ 1.02× time and memory,
   per layer and for whole MiniLM- and SmolLM2-shaped models.
3. The switch on all 210 target matrices of SmolLM2's shapes: cold vs the sum of one fp32 thin SVD per matrix
   plus the low-rank projections; warm (content-keyed SVD cache) < 2 s; peak extra memory of the switch vs the
   peak of one layer's SVD + projections.
4. Inference: merged model vs base model (structure and time), unmerged forward overhead.
5. The switch split across 2 gloo processes sharing the cores vs the 1-process switch (≤ 0.6×).

Method
------
- Timing: ``time.perf_counter`` around whole steps; the variants of one comparison run interleaved (A, B, C,
  then B, C, A, ...; warm-up rounds first) and each variant's median is reported; ratios are ratios of
  medians, with the range of the per-round paired ratios beside them as a noise indicator.
- Peak memory of a step = the bytes alive before it (parameters, buffers, optimizer state, inputs; counted
  from the tensors themselves, shared storage once) + the peak of the bytes allocated during the step above
  that level, read from torch's own CPU allocator accounting (``torch.profiler`` with ``profile_memory``:
  every allocation and free of the c10 CPU allocator with the running total). ``tracemalloc`` cannot see
  these allocations. A cross-check runs the same step again and reads the growth of the process's peak
  resident set (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``) with glibc's mmap
  threshold lowered to 64 KiB for the measurement, so that freed tensors leave the resident set at once.
- Weights are random (the costs do not depend on the values); the dash directions of the layer-level cases
  are random orthonormal columns (a thin SVD of a 4096×4096 fp32 matrix alone takes minutes on two cores;
  the switch itself is measured in target 3, the whole-model cases use the real switch).

Run ``python -m lora_tsd.bench --help`` for the options; ``--quick`` runs every row on tiny shapes in seconds
(a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_tsd import switching as schedule
from lora_tsd.attaching import attach
from lora_tsd.config import TSDConfig
from lora_tsd.directions import ThinSVD, projections, thin_svd
from lora_tsd.inject import adapted_layers
from lora_tsd.layer import PHASE_PRELAUNCH, TSDLinear
from lora_tsd.merge import merge
from lora_tsd.switching import intra_op_threads

MiB = 1024 * 1024

# ------------------------------------------------------------------------------------------- settings

SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Settings:
    """Sizes and repetitions of one bench run (defaults: the issue's shapes, a ~10 min run on 2 cores)."""

    tokens: int = 2048
    reps: int = 5
    warmup: int = 1
    rank: int = 8
    dash: int = 8
    threads: int = 0
    input_grad: bool = False
    layer_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(4096, 4096), (11008, 4096)])
    # MiniLM (all-MiniLM-L6-v2): BERT, hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522.
    minilm: dict[str, int] = field(default_factory=lambda: dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522))
    minilm_batch: tuple[int, int] = (16, 128)
    # SmolLM2-135M: Llama, hidden 576, 30 layers, 9 heads / 3 kv heads, intermediate 1536, vocab 49152, tied.
    smol: dict[str, int] = field(default_factory=lambda: dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152))
    smol_batch: tuple[int, int] = (4, 128)
    # The switch: 30 layers × (q, o 576×576; k, v 192×576; gate, up 1536×576; down 576×1536) = 210 matrices.
    switch_layers: int = 30
    switch_dims: tuple[int, int, int] = (576, 192, 1536)  # (hidden, kv width, intermediate)
    switch_reps: int = 2
    sweep_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    sweep_svd_max: int = 2048
    sweep_dim: int = 2048
    sweep_s: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    sweep_r: list[int] = field(default_factory=lambda: [4, 8, 32, 128])
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        """Every row on tiny shapes (seconds): a smoke test of the bench, not a measurement."""
        return cls(tokens=32, reps=2, warmup=1, layer_shapes=[(64, 64), (172, 64)],
                   minilm=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=128),
                   minilm_batch=(2, 8),
                   smol=dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                             intermediate_size=96, vocab_size=128),
                   smol_batch=(1, 8), switch_layers=2, switch_dims=(36, 12, 96), switch_reps=1,
                   sweep_sizes=[32, 64], sweep_svd_max=64, sweep_dim=64, sweep_s=[1, 8], sweep_r=[4, 8],
                   quick=True)


# ------------------------------------------------------------------------------------------- result rows

# (key, target number, what is measured, target text): the rows every run prints, in order.
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


@dataclass
class Measure:
    """Absolute numbers of one variant: median seconds (all repetitions) and peak memory (bytes)."""

    name: str
    seconds: list[float] = field(default_factory=list)
    static_bytes: int | None = None
    torch_extra: int | None = None
    rss_extra: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def peak(self) -> int | None:
        return None if self.static_bytes is None or self.torch_extra is None else self.static_bytes + self.torch_extra

    @property
    def peak_rss(self) -> int | None:
        return None if self.static_bytes is None or self.rss_extra is None else self.static_bytes + self.rss_extra


class Report:
    """Collects rows and absolute measurements; prints them as markdown tables."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rows = {key: Row(key, what, target) for key, what, target in ROWS}
        self.measures: list[tuple[str, Measure]] = []
        self.notes: list[str] = []
        self.sweep: dict[str, Any] = {}

    def ratio(self, key: str, a: Measure, b: Measure, case: str, memory: bool = False) -> None:
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
        row = self.rows[key]
        row.value, row.case, row.note = value, case, note

    def skip(self, keys: Sequence[str], why: str) -> None:
        for key in keys:
            self.rows[key].note = why

    def add(self, group: str, *measures: Measure) -> None:
        self.measures.extend((group, m) for m in measures)

    def judge(self) -> None:
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
            out.append(f"| {group} | {m.name} | {m.median:.4f} | {rng} | {len(m.seconds)} | {_mib(m.peak)} | "
                       f"{_mib(m.static_bytes)} | {_mib(m.torch_extra)} | {_mib(m.rss_extra)} |")
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
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


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / MiB:.1f}"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- machine


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"nproc": os.cpu_count(), "cpus_usable": _cores(), "cpu": cpu, "torch": torch.__version__,
            "threads": threads, "python": platform.python_version(), "loadavg": load}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int,
                fewer: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Run each function ``warmup + reps`` times, interleaved and rotated (A B C, B C A, ...); keep the timed ones.

    ``fewer`` caps the timed repetitions of some (slow, precision-insensitive) functions: they take part in
    the first rounds only. Returns per name its wall-clock durations (seconds) in round order, so
    ``a[i] / b[i]`` pairs measurements taken back to back.
    """
    names = list(fns)
    limit = {n: min(reps, (fewer or {}).get(n, reps)) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + reps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if round_ >= warmup and len(times[name]) >= limit[name]:
                continue
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if round_ >= warmup:
                times[name].append(dt)
    return times


# ------------------------------------------------------------------------------------------- memory


def tensor_bytes(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared storage counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def static_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None, inputs: Sequence[Any]) -> int:
    """Bytes alive before a step: parameters, buffers, existing gradients, optimizer state, input tensors."""
    ts: list[torch.Tensor] = list(module.parameters()) + list(module.buffers())
    ts += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            ts += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for x in inputs:
        if isinstance(x, torch.Tensor):
            ts.append(x)
        elif isinstance(x, dict):
            ts += [v for v in x.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(ts)


def torch_peak_extra(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated through torch's CPU allocator while ``fn`` runs, above the level before it."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    peak = 0
    for e in events:
        if e.get("name") == "[memory]":
            args = e.get("args", {})
            if args.get("Device Type", 0) == 0:  # CPU
                peak = max(peak, int(args.get("Total Allocated", 0)))
    return peak


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_peak_extra(fn: Callable[[], Any]) -> int | None:
    """Growth of the process's peak resident set while ``fn`` runs (bytes), or ``None`` off Linux.

    glibc serves allocations below its mmap threshold from heap arenas that keep freed memory resident, so
    the free heap is trimmed (``malloc_trim``) and the threshold lowered to 64 KiB for the measurement (every
    tensor is then its own mapping, returned at free), then set back to 32 MiB (glibc's ceiling of its
    dynamic threshold).
    """
    if _status_kib("VmHWM") is None:
        return None
    if not _mallopt(_M_MMAP_THRESHOLD, 64 * 1024):
        return None
    _mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    try:
        gc.collect()
        _malloc_trim()  # hand the free heap back first, or the step would reuse it without growing the RSS
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        hwm = _status_kib("VmHWM")
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 32 * MiB)
        _mallopt(_M_TRIM_THRESHOLD, 64 * MiB)
    if before is None or hwm is None:
        return None
    return max(0, hwm - before)


def measure_memory(m: Measure, fn: Callable[[], Any], static: int) -> None:
    """Fill ``m``'s memory fields: torch's allocator peak from one run of ``fn``, the RSS peak from another.

    Two runs, because the profiler's own trace buffers would land in the resident set.
    """
    m.static_bytes = static
    m.torch_extra = torch_peak_extra(fn)
    m.rss_extra = rss_peak_extra(fn)


def warm_profiler() -> None:
    """Start and stop the profiler once, so its one-time setup does not land in the first measurement."""
    x = torch.ones(4)
    torch_peak_extra(lambda: x + 1)


# ------------------------------------------------------------------------------------------- layer cases


class OneLayer(nn.Module):
    """A model with one bias-free ``(out, in)`` linear layer named ``proj`` (what the adapters wrap)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DenseDashLinear(nn.Module):
    """The authors' LoRA-Dash pattern (Subspace-Tuning): PEFT-style LoRA plus a dash term built densely.

    ``y = W x + (α/r)·lora_B(lora_A(x)) + x @ (U_s diag(c) V_sᵀ)ᵀ``: the ``(out, in)`` dash matrix is
    rebuilt every forward and kept for backward (its gradient is a weight-sized ``(out, in)`` tensor).
    """

    def __init__(self, base: nn.Linear, r: int, s: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        n, m = base.weight.shape
        self.base = base
        self.lora_A = nn.Linear(m, r, bias=False)
        self.lora_B = nn.Linear(r, n, bias=False)
        self.scaling = alpha / r
        U, V = _orthonormal(n, s, gen), _orthonormal(m, s, gen)
        self.register_buffer("U_s", U)  # (out, s)
        self.register_buffer("Vh_s", V.T.contiguous())  # (s, in)
        self.c = nn.Parameter(torch.zeros(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in the authors' layer: in-place adds onto the base output; the dense (out, in) product every call.
        result = self.base(x)
        h = x.to(self.lora_A.weight.dtype)
        result += (((h @ self.lora_A.weight.T) @ self.lora_B.weight.T) * self.scaling).to(result.dtype)
        dense = self.U_s @ torch.diag(self.c) @ self.Vh_s  # (out, in)
        result += (x @ dense.to(x.dtype).T).to(result.dtype)
        return result


def _orthonormal(n: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, s)`` random orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(n, s, generator=gen))
    return q.contiguous()


def set_dash_directions(layer: TSDLinear, U: torch.Tensor, V: torch.Tensor) -> None:
    """Switch ``layer`` to its dash phase with the given directions ``U (out, s)``, ``V (in, s)`` (no SVD)."""
    s = U.shape[1]
    ranked = ThinSVD(U, torch.ones(s, device=U.device), V.T.contiguous())
    idx = torch.arange(s, device=U.device)
    if "dash_count" in inspect.signature(layer.apply_switch).parameters:
        layer.apply_switch(ranked, idx, 0, 0, s)
    else:  # the first layer API: apply_switch(svd, init_idx, dash_idx)
        layer.apply_switch(ranked, None, idx)  # type: ignore[call-arg]


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Give every trainable adapter tensor small random values (B and c start at zero; costs are the same)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "dash_c" in name or name.endswith(".c") or name == "c"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def _tsd_one_layer(n: int, m: int, method: str, st: Settings, gen: torch.Generator) -> nn.Module:
    """``OneLayer`` with our adapter; ``dash`` is moved to its dash phase with random orthonormal directions."""
    model = OneLayer(n, m).requires_grad_(False)
    cfg = TSDConfig(method=method, r=st.rank, dash_directions=st.dash, target_modules=["proj"],
                    prelaunch_steps=1 if method == "dash" else None)
    attach(model, cfg)
    if method == "dash":
        layer = model.proj
        assert isinstance(layer, TSDLinear)
        set_dash_directions(layer, _orthonormal(n, st.dash, gen), _orthonormal(m, st.dash, gen))
    _randomize(model, gen)
    return model


def _peft_one_layer(n: int, m: int, st: Settings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=st.rank, lora_alpha=2 * st.rank, lora_dropout=0.0, target_modules=["proj"], bias="none")
    return get_peft_model(OneLayer(n, m), cfg)


def _dense_one_layer(n: int, m: int, st: Settings, gen: torch.Generator) -> nn.Module:
    base = nn.Linear(m, n, bias=False).requires_grad_(False)
    model = DenseDashLinear(base, st.rank, st.dash, 2.0 * st.rank, gen)
    _randomize(model, gen)
    return model


@dataclass
class StepCase:
    """A model with its optimizer and inputs; ``step()`` runs one training step."""

    name: str
    model: nn.Module
    step: Callable[[], None]
    static: Callable[[], int]


def layer_step_case(name: str, model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor,
                    tsd: bool) -> StepCase:
    """Forward, backward of a given output gradient (as from the layers above), AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        y = model(x)
        y.backward(grad_out)
        opt.step()
        if tsd:
            schedule.step(model, opt)
        opt.zero_grad(set_to_none=True)

    return StepCase(name, model, step, lambda: static_bytes(model, opt, [x, grad_out]))


def _compare(report: Report, group: str, cases: list[StepCase], st: Settings, memory: bool = True,
             fewer: dict[str, int] | None = None) -> dict[str, Measure]:
    """Time the cases interleaved, then measure each one's peak memory; returns the measurements by name."""
    log(f"{group}: timing {', '.join(c.name for c in cases)} ({st.reps} reps)")
    times = interleaved({c.name: c.step for c in cases}, st.reps, st.warmup, fewer)
    out = {c.name: Measure(c.name, times[c.name]) for c in cases}
    if memory:
        for c in cases:
            measure_memory(out[c.name], c.step, c.static())
        report.add(group, *out.values())
    return out


# ------------------------------------------------------------------------------------------- sections


def run_layers(report: Report, st: Settings, peft_ok: bool) -> None:
    """Targets 1 and 2 per layer, and target 4's layer-level forward overhead."""
    keys = [("T1.1", "T1.2", "T1.3", "T1.4", "T2.1", "T2.2", "T4.5"),
            ("T1.5", "T1.6", "T1.7", "T1.8", "T2.3", "T2.4", "T4.6")]
    for (n, m), (k_t, k_m, k_dt, k_dm, k_pt, k_pm, k_inf) in zip(st.layer_shapes, keys, strict=True):
        shape = f"{n}×{m}, {st.tokens} tok"
        gen = torch.Generator().manual_seed(n * 7 + m)
        x = torch.randn(st.tokens, m, generator=gen).requires_grad_(st.input_grad)
        g = torch.randn(st.tokens, n, generator=gen)
        cases = [
            layer_step_case("lora", _tsd_one_layer(n, m, "lora", st, gen), x, g, tsd=True),
            layer_step_case("dash", _tsd_one_layer(n, m, "dash", st, gen), x, g, tsd=True),
            layer_step_case("dense-dash", _dense_one_layer(n, m, st, gen), x, g, tsd=False),
        ]
        if peft_ok:
            cases.append(layer_step_case("peft-lora", _peft_one_layer(n, m, st), x, g, tsd=False))
        # The dense pattern is 2-3× slower and only needs to show that it is: fewer repetitions.
        res = _compare(report, f"layer step {n}×{m}", cases, st, fewer={"dense-dash": 3})
        report.ratio(k_t, res["dash"], res["lora"], shape)
        report.ratio(k_m, res["dash"], res["lora"], shape, memory=True)
        report.ratio(k_dt, res["dense-dash"], res["lora"], shape)
        report.ratio(k_dm, res["dense-dash"], res["lora"], shape, memory=True)
        if peft_ok:
            report.ratio(k_pt, res["lora"], res["peft-lora"], shape)
            report.ratio(k_pm, res["lora"], res["peft-lora"], shape, memory=True)
        else:
            report.skip([k_pt, k_pm], "peft not installed")
        # Target 4 at layer level: inference forward of the unmerged dash layer vs the plain base layer.
        dash_model = cases[1].model
        base = dash_model.proj.base_layer
        x_inf = x.detach()

        def fwd(mod: nn.Module, inp: torch.Tensor = x_inf) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    mod(inp)
            return run

        times = interleaved({"base": fwd(base), "dash (unmerged)": fwd(dash_model)}, min(st.reps, 3), st.warmup)
        mb, md = Measure("base linear forward", times["base"]), Measure("dash unmerged forward",
                                                                         times["dash (unmerged)"])
        report.add(f"layer forward {n}×{m}", mb, md)
        report.ratio(k_inf, md, mb, shape)
        del cases, res, dash_model, base
        gc.collect()


def _bert(st: Settings, seed: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(**st.minilm, max_position_embeddings=512, num_labels=3)
    return BertForSequenceClassification(cfg)


def _smol(st: Settings, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**st.smol, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=100000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _bert_batch(st: Settings, vocab: int) -> dict[str, torch.Tensor]:
    b, t = st.minilm_batch
    gen = torch.Generator().manual_seed(11)
    return {"input_ids": torch.randint(5, vocab, (b, t), generator=gen),
            "attention_mask": torch.ones(b, t, dtype=torch.int64),
            "labels": torch.randint(0, 3, (b,), generator=gen)}


def _smol_batch(st: Settings, vocab: int) -> dict[str, torch.Tensor]:
    b, t = st.smol_batch
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(3, vocab, (b, t), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _ours(model: nn.Module, method: str, targets: list[str], st: Settings, gen: torch.Generator) -> nn.Module:
    cfg = TSDConfig(method=method, r=st.rank, dash_directions=st.dash, target_modules=targets,
                    prelaunch_steps=1 if method == "dash" else None)
    attach(model, cfg)
    _randomize(model, gen)
    if method == "dash":
        schedule.switch(model)  # the real switch: SVD of every target, ranked by the (random) B A
        _randomize(model, gen)  # c ≠ 0
    return model


def _peft(model: nn.Module, targets: list[str], st: Settings, gen: torch.Generator) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=st.rank, lora_alpha=2 * st.rank, lora_dropout=0.0, target_modules=targets, bias="none")
    model = get_peft_model(model, cfg)
    _randomize(model, gen)
    return model


def model_step_case(name: str, model: nn.Module, batch: dict[str, torch.Tensor], tsd: bool) -> StepCase:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        if tsd:
            schedule.step(model, opt)
        opt.zero_grad(set_to_none=True)

    return StepCase(name, model, step, lambda: static_bytes(model, opt, [batch]))


def run_models(report: Report, st: Settings, peft_ok: bool, hf_ok: bool) -> None:
    """Whole-model training steps: MiniLM dash vs lora vs PEFT; SmolLM2 ours vs PEFT."""
    if not hf_ok:
        report.skip(["T1.9", "T1.10", "T2.5", "T2.6", "T2.7", "T2.8"], "transformers not installed")
        return
    gen = torch.Generator().manual_seed(5)
    b, t = st.minilm_batch
    case = f"{st.minilm['num_hidden_layers']} layers, {b}×{t} tok"
    batch = _bert_batch(st, st.minilm["vocab_size"])
    cases = [model_step_case("lora", _ours(_bert(st, 0), "lora", BERT_TARGETS, st, gen), batch, True),
             model_step_case("dash", _ours(_bert(st, 0), "dash", BERT_TARGETS, st, gen), batch, True)]
    if peft_ok:
        cases.append(model_step_case("peft-lora", _peft(_bert(st, 0), BERT_TARGETS, st, gen), batch, False))
    res = _compare(report, "MiniLM step", cases, st)
    report.ratio("T1.9", res["dash"], res["lora"], case)
    report.ratio("T1.10", res["dash"], res["lora"], case, memory=True)
    if peft_ok:
        report.ratio("T2.5", res["lora"], res["peft-lora"], case)
        report.ratio("T2.6", res["lora"], res["peft-lora"], case, memory=True)
    else:
        report.skip(["T2.5", "T2.6"], "peft not installed")
    del cases, res
    gc.collect()

    if not peft_ok:
        report.skip(["T2.7", "T2.8"], "peft not installed")
        return
    b, t = st.smol_batch
    case = f"{st.smol['num_hidden_layers']} layers, {b}×{t} tok"
    batch = _smol_batch(st, st.smol["vocab_size"])
    log("SmolLM2: building two random models")
    cases = [model_step_case("lora", _ours(_smol(st, 0), "lora", LLAMA_TARGETS, st, gen), batch, True),
             model_step_case("peft-lora", _peft(_smol(st, 0), LLAMA_TARGETS, st, gen), batch, False)]
    res = _compare(report, "SmolLM2 step", cases, st)
    report.ratio("T2.7", res["lora"], res["peft-lora"], case)
    report.ratio("T2.8", res["lora"], res["peft-lora"], case, memory=True)
    del cases, res
    gc.collect()


class SmolLinears(nn.Module):
    """The 7 target linears of each SmolLM2 decoder layer, random weights (no attention, no embeddings)."""

    def __init__(self, layers: int, hidden: int, kv: int, inter: int) -> None:
        super().__init__()
        shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
                  "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                  "down_proj": (hidden, inter)}
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, (o, i) in shapes.items()})
            for _ in range(layers))


def _reset_switch(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.phase.fill_(PHASE_PRELAUNCH)


def _floor(model: nn.Module) -> None:
    """What the switch cannot avoid: one fp32 thin SVD per matrix plus the low-rank projections, in turn."""
    for _, layer in adapted_layers(model):
        svd = thin_svd(layer.weight_view())
        projections(svd, (layer.lora_B.detach() * layer.scaling, layer.lora_A.detach()))


def switch_model(st: Settings) -> nn.Module:
    """SmolLM2's 210 target matrices (random weights, seed 3) with dash adapters whose B A is random."""
    hidden, kv, inter = st.switch_dims
    torch.manual_seed(3)
    model = SmolLinears(st.switch_layers, hidden, kv, inter).requires_grad_(False)
    attach(model, TSDConfig(method="dash", r=st.rank, dash_directions=st.dash, target_modules=SMOL_TARGETS,
                            prelaunch_steps=1))
    _randomize(model, torch.Generator().manual_seed(3))
    return model


def _dash_indices(model: nn.Module) -> list[torch.Tensor]:
    return [layer.dash_idx.clone() for _, layer in adapted_layers(model)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    return sum(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def run_switch(report: Report, st: Settings, cache_root: Path | None) -> None:
    """Target 3 (cold switch vs its floor, warm switch with the SVD cache, peak extra memory) and target 5."""
    model = switch_model(st)
    layers = adapted_layers(model)
    hidden, kv, inter = st.switch_dims
    case = f"{len(layers)} matrices ({st.switch_layers} layers of {hidden}/{kv}/{inter})"
    workers = schedule.switch_workers(layers[0][1])
    selected: dict[str, list[torch.Tensor]] = {}

    def pooled() -> None:
        _reset_switch(model)
        schedule.switch(model)
        selected["pooled"] = _dash_indices(model)

    def serial() -> None:
        _reset_switch(model)
        schedule.switch(model, workers=1)
        selected["serial"] = _dash_indices(model)

    log(f"switch: default ({workers} workers) vs serial vs Σ(SVD + projections), {len(layers)} matrices, "
        f"{st.switch_reps} reps")
    fns = {"switch (default)": pooled, "serial switch (workers=1)": serial,
           "Σ SVD + projections": lambda: _floor(model)}
    times = interleaved(fns, st.switch_reps, 0)
    m_pool, m_serial, m_floor = (Measure(name, times[name]) for name in fns)
    report.ratio("T3.1", m_pool, m_floor, case)
    report.value("T3.2", m_pool.median, case, note=f"{workers} layers at a time, 1 intra-op thread each")
    report.ratio("T3.6", m_pool, m_serial, case)
    report.rows["T3.6"].note = (f"{workers} workers; same dash directions as the serial switch in "
                                f"{_same(selected['pooled'], selected['serial'])}/{len(layers)} matrices (the "
                                "SVD's thread count changes its last bits; near-ties in the ranking can flip)")
    run_switch_distributed(report, st, case, m_pool, m_serial, selected["pooled"])

    # Peak extra memory: the serial switch (in this thread, where the profiler sees its allocations) vs one
    # layer's SVD + projections (the largest matrix). The default switch holds at most `workers` layers' SVDs
    # at once by construction (one per pool thread; finished layers keep only the selected directions).
    measure_memory(m_serial, serial, 0)
    big = max((layer for _, layer in layers), key=lambda la: la.out_features * la.in_features)

    def one_layer() -> None:
        svd = thin_svd(big.weight_view())
        projections(svd, (big.lora_B.detach() * big.scaling, big.lora_A.detach()))

    m_one = Measure(f"one layer SVD + projections ({big.out_features}×{big.in_features})")
    measure_memory(m_one, one_layer, 0)
    all_svds = sum(4 * min(la.out_features, la.in_features) * (la.out_features + la.in_features + 1)
                   for _, la in layers)
    report.value("T3.5", (m_serial.torch_extra or 0) / max(1, m_one.torch_extra or 0), case,
                 note=f"serial switch {_mib(m_serial.torch_extra)} MiB vs one layer {_mib(m_one.torch_extra)} MiB "
                      f"(torch); RSS {_mib(m_serial.rss_extra)} vs {_mib(m_one.rss_extra)} MiB; keeping all "
                      f"{len(layers)} SVDs would take {_mib(all_svds)} MiB; the default switch keeps at most "
                      f"{workers} layers' SVDs (pool threads; not visible to the profiler)")

    # Warm: a second run of the same base model reads every SVD from the content-keyed cache.
    with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
        cache_dir = Path(tmp)
        _reset_switch(model)
        t0 = time.perf_counter()
        schedule.switch(model, svd_cache=cache_dir)
        fill = time.perf_counter() - t0
        warm = []
        for _ in range(max(3, st.switch_reps)):
            _reset_switch(model)
            t0 = time.perf_counter()
            schedule.switch(model, svd_cache=cache_dir)
            warm.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in (cache_dir / "svd").glob("*.safetensors"))
    m_warm = Measure("warm switch (SVD cache)", warm)
    report.value("T3.3", m_warm.median, case, note=f"cache {size / MiB:.0f} MiB on disk; min–max "
                                                   f"{min(warm):.3f}–{max(warm):.3f} s")
    report.value("T3.4", fill, case)
    report.add("switch", m_pool, m_serial, m_floor, m_one, m_warm, Measure("cache fill (cold + write)", [fill]))


def _distributed_switch_worker(rank: int, world: int, port: int, st: Settings, reps: int, out: str) -> None:
    """One rank of target 5: the same model on every rank, the switch's layers split across the ranks."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, st.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = switch_model(st)
        times = []
        for _ in range(reps):
            _reset_switch(model)
            dist.barrier()
            t0 = time.perf_counter()
            schedule.switch(model)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({f"{i}": t for i, t in enumerate(_dash_indices(model))}, f"{out}/idx.safetensors")
            Path(out, "times.json").write_text(json.dumps(times), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def run_switch_distributed(report: Report, st: Settings, case: str, m_pool: Measure, m_serial: Measure,
                           pooled_idx: list[torch.Tensor]) -> None:
    """Target 5: the switch split across 2 gloo processes (the cores shared between them) vs 1 process."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log(f"switch: {world} processes (gloo), {max(1, st.threads // world)} thread(s) each, {st.switch_reps} reps")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_switch_worker, args=(world, port, st, st.switch_reps, tmp), nprocs=world, join=True)
        times = json.loads(Path(tmp, "times.json").read_text(encoding="utf-8"))
        idx = load_file(str(Path(tmp, "idx.safetensors")))
    m_dist = Measure(f"switch, {world} processes", times)
    same = _same([idx[str(i)] for i in range(len(pooled_idx))], pooled_idx)
    report.ratio("T5.1", m_dist, m_serial, case)
    report.rows["T5.1"].note = f"same dash directions as the 1-process default switch in {same}/{len(pooled_idx)}"
    report.ratio("T5.2", m_dist, m_pool, case)
    report.add("switch", m_dist)


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    ta = [(n, type(m).__name__) for n, m in a.named_modules()]
    tb = [(n, type(m).__name__) for n, m in b.named_modules()]
    pa = [(n, tuple(p.shape), p.dtype) for n, p in a.named_parameters()]
    pb = [(n, tuple(p.shape), p.dtype) for n, p in b.named_parameters()]
    return ta == tb and pa == pb


def run_inference(report: Report, st: Settings, hf_ok: bool) -> None:
    """Target 4 on the whole MiniLM: merged vs base, unmerged dash and lora vs base (inference forward)."""
    if not hf_ok:
        report.skip(["T4.1", "T4.2", "T4.3", "T4.4"], "transformers not installed")
        return
    gen = torch.Generator().manual_seed(9)
    base = _bert(st, 0).eval()
    dash = _ours(copy.deepcopy(base), "dash", BERT_TARGETS, st, gen).eval()
    lora = _ours(copy.deepcopy(base), "lora", BERT_TARGETS, st, gen).eval()
    merged = merge(_ours(copy.deepcopy(base), "dash", BERT_TARGETS, st, gen)).eval()
    batch = {k: v for k, v in _bert_batch(st, st.minilm["vocab_size"]).items() if k != "labels"}

    def fwd(mod: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                mod(**batch)
        return run

    b, t = st.minilm_batch
    case = f"{st.minilm['num_hidden_layers']} layers, {b}×{t} tok"
    log("inference: MiniLM base / merged / unmerged dash / unmerged lora")
    times = interleaved({"base": fwd(base), "merged dash": fwd(merged), "unmerged dash": fwd(dash),
                         "unmerged lora": fwd(lora)}, max(st.reps, 7), st.warmup + 1)
    ms = {k: Measure(f"{k} forward", v) for k, v in times.items()}
    report.add("MiniLM forward", *ms.values())
    report.ratio("T4.1", ms["merged dash"], ms["base"], case)
    report.value("T4.2", float(_same_structure(base, merged)), case)
    report.ratio("T4.3", ms["unmerged dash"], ms["base"], case)
    report.ratio("T4.4", ms["unmerged lora"], ms["base"], case)


# ------------------------------------------------------------------------------------------- impl


class TwoStepTSDLinear(TSDLinear):
    """The previous ``TSDLinear`` forward, kept for comparison: ``result + B' (A' drop(x))``.

    The current forward accumulates with ``torch.addmm(result, A' drop(x), B'ᵀ)`` instead: one ``(tokens, out)``
    temporary and one elementwise pass fewer, where the base output and the adapter share a dtype (fp32
    models) and autocast is off.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._merged:
            return result
        B, A = self.factors()
        h = self.dropout(x.to(A.dtype))
        return result + torch.nn.functional.linear(torch.nn.functional.linear(h, A), B).to(result.dtype)


class InplaceAddmmTSDLinear(TSDLinear):
    """Candidate forward: as the current ``torch.addmm`` forward but accumulating into the base output in place.

    No ``(tokens, out)`` temporary at all. Valid because ``nn.Linear`` / ``Conv1D`` do not save their output
    for backward; a base layer that did would make autograd raise at backward (never a silent error).
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._merged:
            return result
        B, A = self.factors()
        h = self.dropout(x.to(A.dtype))
        z = torch.nn.functional.linear(h, A)
        if result.dtype == A.dtype and not torch.is_autocast_enabled(x.device.type) and result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), B.T)
            return result
        return result + torch.nn.functional.linear(z, B).to(result.dtype)


IMPLS: dict[str, type[TSDLinear]] = {"current": TSDLinear, "two-step": TwoStepTSDLinear,
                                     "addmm_": InplaceAddmmTSDLinear}


def with_impl(model: nn.Module, impl: str) -> nn.Module:
    """Swap the forward of every adapter of ``model`` to the candidate ``impl`` (state untouched)."""
    for _, layer in adapted_layers(model):
        layer.__class__ = IMPLS[impl]
    return model


def run_impl(st: Settings) -> str:
    """Forward implementations (current addmm / previous two-step / in-place addmm) for lora and dash, per layer."""
    lines = [f"Candidate adapter forwards (training step, {st.tokens} tokens, fp32; median s, peak MiB = static "
             "+ step, torch allocator; max |Δy| vs the current forward)", "",
             "| layer | method | impl | median s | min s | peak MiB | time / current | peak / current | max |Δy| |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, m in st.layer_shapes:
        gen = torch.Generator().manual_seed(n + m)
        x = torch.randn(st.tokens, m, generator=gen).requires_grad_(st.input_grad)
        g = torch.randn(st.tokens, n, generator=gen)
        cases, ref_out = [], {}
        for method in ("lora", "dash"):
            g_state = gen.get_state()
            for impl in IMPLS:
                gen.set_state(g_state)  # same weights and adapters for every impl of a method
                torch.manual_seed(n * 31 + m)  # nn.Linear's own initialization draws from the global generator
                model = with_impl(_tsd_one_layer(n, m, method, st, gen), impl)
                with torch.no_grad():
                    y = model(x.detach())
                if impl == "current":
                    ref_out[method] = y
                diff = float((y - ref_out[method]).abs().max())
                cases.append((method, impl, diff, layer_step_case(f"{method}/{impl}", model, x, g, tsd=True)))
                del y
        res = _compare(Report(st), f"impl {n}×{m}", [c for *_, c in cases], st)
        for method, impl, diff, case in cases:
            r, c = res[case.name], res[f"{method}/current"]
            lines.append(f"| {n}×{m} | {method} | {impl} | {r.median:.4f} | {min(r.seconds):.4f} | {_mib(r.peak)} | "
                         f"{r.median / c.median:.3f} | {(r.peak or 0) / (c.peak or 1):.3f} | {diff:.2e} |")
        del cases, res
        gc.collect()
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sweep


def run_sweep(report: Report, st: Settings) -> dict[str, Any]:
    """How the step cost grows with the layer size, with s and with r (square layers, fp32)."""
    out: dict[str, Any] = {"tokens": st.tokens, "sizes": [], "s": [], "r": []}
    for d in st.sweep_sizes:
        gen = torch.Generator().manual_seed(d)
        x, g = torch.randn(st.tokens, d, generator=gen), torch.randn(st.tokens, d, generator=gen)
        cases = [layer_step_case("lora", _tsd_one_layer(d, d, "lora", st, gen), x, g, True),
                 layer_step_case("dash", _tsd_one_layer(d, d, "dash", st, gen), x, g, True),
                 layer_step_case("dense-dash", _dense_one_layer(d, d, st, gen), x, g, False)]
        res = _compare(report, f"sweep size {d}×{d}", cases, st, memory=False)
        row = {"d": d, **{k: v.median for k, v in res.items()}}
        if d <= st.sweep_svd_max:
            w = torch.randn(d, d, generator=gen)
            svd_t = interleaved({"svd": lambda w=w: thin_svd(w)}, max(1, min(3, st.reps)), 1)["svd"]
            row["thin_svd"] = statistics.median(svd_t)
        out["sizes"].append(row)
    d = st.sweep_dim
    gen = torch.Generator().manual_seed(17)
    x, g = torch.randn(st.tokens, d, generator=gen), torch.randn(st.tokens, d, generator=gen)
    base_st = dataclasses.replace(st)
    cases = [layer_step_case("lora", _tsd_one_layer(d, d, "lora", base_st, gen), x, g, True)]
    for s in st.sweep_s:
        cases.append(layer_step_case(f"dash s={s}", _tsd_one_layer(d, d, "dash", dataclasses.replace(st, dash=s),
                                                                    gen), x, g, True))
    res = _compare(report, f"sweep s ({d}×{d}, r={st.rank})", cases, st, memory=False)
    for s in st.sweep_s:
        out["s"].append({"s": s, "dash": res[f"dash s={s}"].median, "lora": res["lora"].median})
    del cases, res
    cases = []
    for r in st.sweep_r:
        sr = dataclasses.replace(st, rank=r)
        cases.append(layer_step_case(f"lora r={r}", _tsd_one_layer(d, d, "lora", sr, gen), x, g, True))
        cases.append(layer_step_case(f"dash r={r}", _tsd_one_layer(d, d, "dash", sr, gen), x, g, True))
    res = _compare(report, f"sweep r ({d}×{d}, s={st.dash})", cases, st, memory=False)
    for r in st.sweep_r:
        out["r"].append({"r": r, "lora": res[f"lora r={r}"].median, "dash": res[f"dash r={r}"].median})
    report.sweep = out
    return out


def sweep_tables(sw: dict[str, Any]) -> str:
    lines = [f"Sweep (fp32, {sw['tokens']} tokens, median seconds per training step)", "",
             "| d (d×d layer) | lora | dash | dense-dash | dash/lora | dense/lora | thin SVD of d×d |",
             "|---|---|---|---|---|---|---|"]
    for r in sw["sizes"]:
        svd = f"{r['thin_svd']:.3f}" if "thin_svd" in r else "—"
        lines.append(f"| {r['d']} | {r['lora']:.4f} | {r['dash']:.4f} | {r['dense-dash']:.4f} | "
                     f"{r['dash'] / r['lora']:.3f} | {r['dense-dash'] / r['lora']:.3f} | {svd} |")
    lines += ["", "| s | lora | dash | dash/lora |", "|---|---|---|---|"]
    for r in sw["s"]:
        lines.append(f"| {r['s']} | {r['lora']:.4f} | {r['dash']:.4f} | {r['dash'] / r['lora']:.3f} |")
    lines += ["", "| r | lora | dash (s fixed) | dash/lora |", "|---|---|---|---|"]
    for r in sw["r"]:
        lines.append(f"| {r['r']} | {r['lora']:.4f} | {r['dash']:.4f} | {r['dash'] / r['lora']:.3f} |")
    return "\n".join(lines)


def plot_sweep(sw: dict[str, Any], path: Path, st: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    ax = axes[0]
    ds = [r["d"] for r in sw["sizes"]]
    for key, style in (("lora", "o-"), ("dash", "s--"), ("dense-dash", "^-")):
        ax.plot(ds, [r[key] for r in sw["sizes"]], style, label=f"{key} step")
    svd = [(r["d"], r["thin_svd"]) for r in sw["sizes"] if "thin_svd" in r]
    if svd:
        ax.plot([a for a, _ in svd], [b for _, b in svd], "x:", label="thin SVD (once, at the switch)")
    ax.set(xscale="log", yscale="log", xlabel="d (d×d layer)", ylabel="seconds",
           title=f"cost vs layer size ({sw['tokens']} tokens)")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.legend(fontsize=7)
    ax = axes[1]
    ss = [r["s"] for r in sw["s"]]
    ax.plot(ss, [r["dash"] / r["lora"] for r in sw["s"]], "s-", label="dash / lora step time")
    ax.axhline(1.03, color="grey", ls=":", label="target 1.03")
    ax.set(xscale="log", xlabel="s (dash directions)", ylabel="ratio",
           title=f"dash overhead vs s ({st.sweep_dim}², r={st.rank})")
    ax.set_xticks(ss, [str(s) for s in ss])
    ax.legend(fontsize=7)
    ax = axes[2]
    rs = [r["r"] for r in sw["r"]]
    ax.plot(rs, [r["lora"] for r in sw["r"]], "o-", label="lora")
    ax.plot(rs, [r["dash"] for r in sw["r"]], "s--", label=f"dash (s={st.dash})")
    ax.set(xscale="log", xlabel="r (LoRA rank)", ylabel="seconds per step",
           title=f"cost vs r ({st.sweep_dim}²)")
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.legend(fontsize=7)
    for ax in axes:
        ax.minorticks_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- command line

SECTIONS = ("layers", "models", "switch", "inference")
EXTRA_SECTIONS = ("impl",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-tsd bench",
        description="Measure issue 5's performance ratios on the CPU in one run (interleaved repetitions, "
                    "medians): dash vs lora and the authors' dense dash (target 1), ours vs PEFT (2), the "
                    "switch cold / warm / memory (3), merged and unmerged inference (4). Prints markdown "
                    "tables on stdout, progress on stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="every row on tiny shapes with few repetitions (seconds; a smoke test, not a measurement)")
    p.add_argument("--only", nargs="+", choices=SECTIONS + EXTRA_SECTIONS, default=list(SECTIONS),
                   metavar="SECTION",
                   help=f"run only these sections ({', '.join(SECTIONS)}; rows of the others print n/a), or "
                        "'impl': compare candidate forward implementations of the adapter layer (not run by "
                        "default)")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep the step cost over layer size, s and r (about 3 more minutes on 2 cores)")
    p.add_argument("--sweep-only", action="store_true", help="run the sweep and nothing else")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write the sweep's plot (PNG) here")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number as JSON")
    p.add_argument("--tokens", type=int, default=None, help="tokens per layer-level step (default 2048)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1)")
    p.add_argument("--switch-reps", type=int, default=None, help="repetitions of the cold switch (default 2)")
    p.add_argument("--switch-layers", type=int, default=None,
                   help="SmolLM2 layers whose 7 target matrices the switch section decomposes (default 30: 210)")
    p.add_argument("-r", "--rank", type=int, default=None, help="LoRA rank r (default 8)")
    p.add_argument("-s", "--dash", type=int, default=None, help="dash directions s (default 8)")
    p.add_argument("--smol-layers", type=int, default=None,
                   help="decoder layers of the SmolLM2-shaped model (default 30, the real depth)")
    p.add_argument("--smol-batch", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"),
                   help="SmolLM2 batch (default 4 128)")
    p.add_argument("--minilm-batch", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"),
                   help="MiniLM batch (default 16 128)")
    p.add_argument("--input-grad", action="store_true",
                   help="layer-level inputs require grad (a layer inside a network: backward also computes "
                        "the input gradient, one more full matmul for every variant); default off, the "
                        "stricter case for the adapters' relative overhead")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable CPU cores)")
    p.add_argument("--cache-root", type=Path, default=None,
                   help="folder for the temporary SVD cache of target 3 (default: the system temp folder)")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    st = Settings.quick_settings() if args.quick else Settings()
    for name in ("tokens", "reps", "warmup", "switch_reps", "rank", "dash"):
        value = getattr(args, name)
        if value is not None:
            setattr(st, name, value)
    if args.switch_layers is not None:
        st.switch_layers = args.switch_layers
    if args.smol_layers is not None:
        st.smol = {**st.smol, "num_hidden_layers": args.smol_layers}
    if args.smol_batch is not None:
        st.smol_batch = tuple(args.smol_batch)
    if args.minilm_batch is not None:
        st.minilm_batch = tuple(args.minilm_batch)
    st.input_grad = args.input_grad
    st.threads = args.threads or _cores()
    return st


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the tables. Returns the process exit status (0)."""
    args = build_parser().parse_args(argv)
    st = settings_from_args(args)
    if st.reps < 1 or st.tokens < 1 or st.rank < 1 or st.dash < 1:
        print("bench: --reps, --tokens, --rank and --dash must be ≥ 1", file=sys.stderr)
        return 2
    # Leave the caller's process as it was (thread count, global RNG): the bench also runs inside pytest.
    with intra_op_threads(st.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _run(args, st, argv if argv is not None else sys.argv[1:])


def _run(args: argparse.Namespace, st: Settings, argv: list[str]) -> int:
    warm_profiler()
    report = Report(st)
    info = machine_info(st.threads)
    t_start = time.perf_counter()
    peft_ok, hf_ok = _available("peft"), _available("transformers")
    sections = [] if args.sweep_only else list(args.only)
    cmd = "python -m lora_tsd.bench " + " ".join(argv)
    print(f"# lora-tsd bench: `{cmd.strip()}`\n")
    print(f"machine: {info['nproc']} CPUs ({info['cpus_usable']} usable), {info['cpu']}; torch {info['torch']}, "
          f"{st.threads} threads; Python {info['python']}; load average at start {info['loadavg']}")
    print(f"settings: r={st.rank}, s={st.dash}, {st.tokens} tokens per layer step, {st.reps} timed reps "
          f"(+{st.warmup} warm-up), fp32, input grad {'on' if st.input_grad else 'off'}"
          f"{', QUICK (tiny shapes; numbers mean nothing)' if st.quick else ''}\n", flush=True)
    report.notes.append(f"layer A = {st.layer_shapes[0][0]}×{st.layer_shapes[0][1]}, layer B = "
                        f"{st.layer_shapes[1][0]}×{st.layer_shapes[1][1]} (out×in), no bias, fp32.")
    if "layers" in sections:
        run_layers(report, st, peft_ok)
    if "models" in sections:
        run_models(report, st, peft_ok, hf_ok)
    if "switch" in sections:
        run_switch(report, st, args.cache_root)
    if "inference" in sections:
        run_inference(report, st, hf_ok)
    impl = run_impl(st) if "impl" in sections else None
    for key, _, _ in ROWS:  # rows of sections not run
        row = report.rows[key]
        if row.value is None and not row.note:
            row.note = "section not run"
    sweep = None
    if args.sweep or args.sweep_only:
        sweep = run_sweep(report, st)
    elapsed = time.perf_counter() - t_start
    report.notes.append(f"wall time {elapsed:.0f} s; load average at end {os.getloadavg()}")
    if sections:
        print(report.tables())
    if impl is not None:
        print()
        print(impl)
    if sweep is not None:
        print()
        print(sweep_tables(sweep))
        if args.plot is not None:
            plot_sweep(sweep, args.plot, st)
            print(f"\nplot written to {args.plot}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
