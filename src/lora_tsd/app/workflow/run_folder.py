"""One writer per run folder: an advisory lock (``fcntl.flock``) held by the process that trains in it.

A second ``lora-tsd train`` on the same ``--output-dir`` (a ``--resume``, or an ``--overwrite`` that would delete
the folder under the running one) is refused with the holder's pid instead of interleaving logs or deleting
checkpoints being written. The lock dies with its process (a killed run leaves no stale lock), so
``--resume`` after a kill always gets it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

from lora_tsd.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, as before
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunFolderLock"]

#: The lock file inside a run folder (holds the writer's pid, for the message).
LOCK_FILE = ".lora-tsd.lock"


class RunFolderLock:
    """The exclusive lock of one run folder; :meth:`acquire` refuses when another live process holds it."""

    def __init__(self) -> None:
        self._handle: IO[str] | None = None

    def acquire(self, folder: Path) -> None:
        """Lock ``folder`` (which exists), replacing a lock this object already holds elsewhere."""
        handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                handle.close()
                raise ConfigError(f"run folder {str(folder)!r} is in use by another lora-tsd process (pid {holder}); "
                                  "wait for it to finish or stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.release()
        self._handle = handle

    def check_free(self, folder: Path) -> None:
        """Refuse if another process holds ``folder``'s lock (without keeping it: the folder is about to go)."""
        if (folder / LOCK_FILE).is_file():
            probe = RunFolderLock()
            probe.acquire(folder)
            self.release()
            self._handle = probe._handle

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()  # closing drops the flock
            self._handle = None
