"""How the benchmarks measure: interleaved timing (CPU clock or CUDA events) and peak memory of one call.

- Timing: :func:`interleaved` runs the variants of one comparison in rotated rounds (A B C, B C A, ...), so a
  slow phase of a shared machine hits every variant alike; :class:`Clock` reads ``time.perf_counter`` on a
  CPU and CUDA events on a GPU (no synchronization between the calls of a round).
- Memory on the CPU: the bytes alive before a step (:func:`static_bytes`) plus the peak the step allocates above
  them, read from torch's CPU allocator through the profiler (:func:`torch_peak_extra`) and cross-checked
  with the growth of the process's peak resident set (:func:`rss_peak_extra`, Linux and glibc only).
- Memory on a GPU: the growth of ``torch.cuda.max_memory_allocated`` (:func:`cuda_peak_extra`).

Imports only torch (the GPU bench script runs where the application's other dependencies are missing).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

MiB = 1024 * 1024


@dataclass
class Measure:
    """Absolute numbers of one variant: its timed durations (seconds) and peak memory (bytes)."""

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


# ------------------------------------------------------------------------------------------- timing


class Clock:
    """Times calls on ``device``: CUDA events there, else ``time.perf_counter``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> Callable[[], float]:
        """Run ``fn`` now; the returned function gives its duration in seconds (read it after :meth:`sync`).

        On a GPU the duration is read later so that timing a call never waits for the device.
        """
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return lambda: start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return lambda: dt


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, fewer: dict[str, int] | None = None,
                clock: Clock | None = None) -> dict[str, list[float]]:
    """Run each function ``warmup + reps`` times, interleaved and rotated (A B C, B C A, ...); keep the timed ones.

    Args:
        fns: the variants of one comparison, by name.
        reps: timed calls per variant.
        warmup: untimed rounds first (rotated as well).
        fewer: caps the timed calls of some (slow, precision-insensitive) variants: they take part in the first
            rounds only.
        clock: how to time a call (default: the CPU clock).

    Returns:
        Per name its durations (seconds) in round order, so ``a[i] / b[i]`` pairs calls made back to back.
    """
    clock = clock or Clock()
    names = list(fns)
    limit = {n: min(reps, (fewer or {}).get(n, reps)) for n in names}
    readings: dict[str, list[Callable[[], float]]] = {n: [] for n in names}
    for round_ in range(warmup + reps):
        if round_ == warmup:
            clock.sync()  # the warm-up's queued device work must not land in the first timed call
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if round_ >= warmup and len(readings[name]) >= limit[name]:
                continue
            reading = clock.time(fns[name])
            if round_ >= warmup:
                readings[name].append(reading)
    clock.sync()
    return {n: [read() for read in r] for n, r in readings.items()}


# ------------------------------------------------------------------------------------------- static memory


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared storage counts once; ``None`` is skipped)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def static_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None, inputs: Iterable[Any]) -> int:
    """Bytes alive before a step: parameters, buffers, existing gradients, optimizer state, input tensors.

    ``inputs`` holds tensors or dicts of tensors (a batch); anything else in them is ignored.
    """
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


# ------------------------------------------------------------------------------------------- CPU peak memory


def torch_peak_extra(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated through torch's CPU allocator while ``fn`` runs, above the level before it.

    Read from the profiler's memory events (every allocation and free with the running total); ``tracemalloc``
    cannot see these allocations.
    """
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_bytes(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or ``None`` off Linux."""
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
    if _status_bytes("VmHWM") is None:
        return None
    if not _mallopt(_M_MMAP_THRESHOLD, 64 * 1024):
        return None
    _mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    try:
        gc.collect()
        _malloc_trim()  # hand the free heap back first, or the step would reuse it without growing the RSS
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_bytes("VmRSS")
        fn()
        hwm = _status_bytes("VmHWM")
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


# ------------------------------------------------------------------------------------------- GPU peak memory


def cuda_peak_extra(device: torch.device, fn: Callable[[], Any]) -> int | None:
    """Growth of ``torch.cuda.max_memory_allocated`` while ``fn`` runs (bytes); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
