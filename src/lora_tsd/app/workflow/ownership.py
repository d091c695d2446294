"""Which folders lora-tsd may delete or replace: only the ones it created itself.

When lora-tsd creates a run folder or an export folder it writes :data:`OWNER_MARKER` into it. ``--overwrite``
deletes a folder only if it carries that marker, and never the run an export reads from (the run folder, its
``adapter/``, anything inside it, or a folder that contains it). A user's own folder, even an empty-looking
one, is never deleted: the message says to remove it by hand or choose another path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError

__all__ = ["OWNER_MARKER", "check_replaceable", "claim_folder", "created_by_lora_tsd"]

#: Written into every folder lora-tsd creates (run and export folders); its presence permits ``--overwrite``.
OWNER_MARKER = ".lora-tsd-owner.json"


def claim_folder(folder: Path, kind: str) -> None:
    """Mark ``folder`` (just created by lora-tsd) as lora-tsd's own ``kind`` (``'run'`` or ``'export'``)."""
    atomic_write_json(folder / OWNER_MARKER, {"created_by": "lora-tsd", "kind": kind})


def created_by_lora_tsd(folder: Path) -> bool:
    """Whether ``folder`` carries lora-tsd's owner marker (a regular file holding a JSON object)."""
    marker = folder / OWNER_MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("created_by") == "lora-tsd"
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(folder: Path, flag: str = "--overwrite", protected: tuple[Path, ...] = (),
                      what: str = "folder") -> None:
    """Raise :class:`ConfigError` unless lora-tsd may delete ``folder`` to replace it.

    Args:
        folder: an existing path the caller wants to replace.
        flag: the option that asked for it, for the message.
        protected: folders that must survive (an export's source run): ``folder`` may be none of them, lie
            inside one, or contain one.
        what: what a replaceable folder is (``'run folder'``, ``'export folder'``), for the message.
    """
    if folder.is_symlink():
        raise ConfigError(f"{flag} refuses to replace {str(folder)!r}: it is a symbolic link (give the real folder)")
    if not folder.is_dir():
        raise ConfigError(f"{flag} refuses to replace {str(folder)!r}: it is not a folder")
    real = Path(os.path.realpath(folder))
    for keep in protected:
        keep_real = Path(os.path.realpath(keep))
        if real == keep_real or real.is_relative_to(keep_real) or keep_real.is_relative_to(real):
            raise ConfigError(f"{flag} refuses to replace {str(folder)!r}: it is, is inside or contains the run "
                              f"{str(keep)!r} being read; choose another folder")
    if not created_by_lora_tsd(folder):
        raise ConfigError(f"{flag} refuses to delete {str(folder)!r}: it is not a lora-tsd {what} (lora-tsd did not "
                          f"create it: no {OWNER_MARKER}); remove it yourself or choose another folder")
