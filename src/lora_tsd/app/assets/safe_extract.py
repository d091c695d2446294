"""Archive extraction that can only write inside its target folder.

Every member of a wheel (zip) or source archive (tar) that lora-tsd copies out goes through
:func:`confined_destination`: a name that is absolute, climbs with ``..``, or is empty after the folder prefix
is refused with an error naming the member, so a crafted archive cannot write outside the cache (the
``tarfile`` data filter's rule, applied to the streamed reads this project does). Links and devices are never
written: only regular files are copied, by :func:`copy_tar_member` and :func:`copy_zip_member`.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from lora_tsd.app.errors import AssetNotAvailableError

__all__ = ["confined_destination", "copy_tar_member", "copy_zip_member"]

_CHUNK = 1 << 20


def confined_destination(target: Path, relative: str, *, archive: str | Path) -> Path:
    """``target / relative``, refused unless it stays inside ``target``.

    Args:
        target: the folder being filled.
        relative: the member's name after the folder prefix (``/``-separated, as archives spell it).
        archive: the archive's name, for the message.

    Raises:
        AssetNotAvailableError: ``relative`` is empty, absolute (``/etc/x``, ``//x``, ``C:\\x``) or has a ``..``
            part: the archive is not the expected one.
    """
    pure = PurePosixPath(relative.replace("\\", "/"))
    bad = (not relative or pure.is_absolute() or relative.startswith(("/", "\\")) or ".." in pure.parts
           or (pure.parts and ":" in pure.parts[0]))
    if bad:
        raise AssetNotAvailableError(f"{archive}: member {relative!r} would be written outside {target}; the "
                                     f"archive is not the expected one (delete it and fetch it again)")
    destination = target.joinpath(*pure.parts)
    if not destination.resolve().is_relative_to(target.resolve()):  # a symlinked folder inside target
        raise AssetNotAvailableError(f"{archive}: member {relative!r} resolves outside {target}")
    return destination


def _copy_stream(source: object, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "xb") as sink:  # "x": never follow or replace something already there
        while chunk := source.read(_CHUNK):  # type: ignore[attr-defined]
            sink.write(chunk)


def copy_tar_member(stream: tarfile.TarFile, member: tarfile.TarInfo, target: Path, relative: str,
                    *, archive: str | Path) -> None:
    """Copy one regular-file member of a (streamed) tar archive to ``target/relative``; skip folders (made as
    needed), links and devices (never written)."""
    if member.isdir():  # made as needed for the files inside
        return
    destination = confined_destination(target, relative, archive=archive)
    if not member.isfile():
        return
    source = stream.extractfile(member)
    if source is None:  # pragma: no cover - isfile() members always have data
        return
    _copy_stream(source, destination)


def copy_zip_member(wheel: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, relative: str,
                    *, archive: str | Path) -> None:
    """Copy one file member of a zip (wheel) to ``target/relative``; folders and symlinks are not written."""
    if member.is_dir():
        return
    destination = confined_destination(target, relative, archive=archive)
    if (member.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink member
        return
    with wheel.open(member) as source:
        _copy_stream(source, destination)
