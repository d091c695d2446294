"""What a benchmark runs on: the usable CPU cores, the CPU model, versions, and which optional packages import."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
from pathlib import Path
from typing import Any

import torch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def available(module: str) -> bool:
    """Whether ``module`` imports (optional packages: peft, transformers, safetensors)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def machine_info(threads: int) -> dict[str, Any]:
    """CPU count and model, torch and Python versions, the torch thread count, the load average."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"nproc": os.cpu_count(), "cpus_usable": usable_cores(), "cpu": cpu, "torch": torch.__version__,
            "threads": threads, "python": platform.python_version(), "loadavg": load}
