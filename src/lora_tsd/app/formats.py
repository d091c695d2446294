"""How the application names files and writes JSON: slugs for file and folder names, and JSON-safe numbers."""

from __future__ import annotations

import math
import re
import zlib
from typing import Any


def slug(text: str, sep: str = "_", keep: str = "._-", limit: int | None = None, fallback: str = "",
         strip: bool = True) -> str:
    """``text`` as a file or folder name: runs of characters other than letters, digits and ``keep`` become
    ``sep`` (stripped from the ends unless ``strip`` is false). Past ``limit`` characters the name is cut and a
    CRC-32 of the whole text appended, so two long names stay apart. An empty result gives ``fallback``."""
    name = re.sub(f"[^A-Za-z0-9{re.escape(keep)}]+", sep, text)
    if strip:
        name = name.strip(sep)
    if limit is not None and len(name) > limit:
        name = f"{name[:limit - 9]}-{zlib.crc32(text.encode()):08x}"
    return name or fallback


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively: strict JSON has none."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def option_flags(name: str, value: Any) -> list[str]:
    """The command-line words that set option ``name`` to ``value``: ``--name value``, ``--name v1 v2`` for a
    list, ``--name`` / ``--no-name`` for a bool, nothing for None (the flag spelling the CLI generates)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [] if value is None else [flag, str(value)]
