"""Errors of the application: bad task data and assets that cannot be fetched.

They derive from the core's :class:`~lora_tsd.errors.TSDError`, so the command line turns them into one-line
messages like every other error of lora-tsd.
"""

from __future__ import annotations

from lora_tsd.errors import TSDError


class DataError(TSDError, ValueError):
    """A dataset or task file is malformed, empty, or has labels out of range."""


class AssetNotAvailableError(TSDError, FileNotFoundError):
    """A model or dataset is neither cached nor reachable; the message says how to get it."""
