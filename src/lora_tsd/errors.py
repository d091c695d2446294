"""Exception types of lora-tsd.

Every error a user can trigger derives from :class:`TSDError`, so a command-line front end can turn it
into a one-line message and a non-zero exit without a traceback. The subclasses also derive from the
builtin a Python user would expect (``ValueError`` for bad values), so ``except ValueError`` keeps working.
The application (:mod:`lora_tsd.app`) adds its own subclasses for data and assets.
"""

from __future__ import annotations


class TSDError(Exception):
    """Base class of every error lora-tsd raises on bad input."""


class ConfigError(TSDError, ValueError):
    """A configuration value is invalid (unknown method, r out of range, ...)."""


class TargetError(TSDError, ValueError):
    """No module (or an unsuitable module) matches ``target_modules``."""


class NonFiniteError(TSDError, FloatingPointError):
    """A weight, adapter value or loss is NaN or infinite."""


class AdapterFormatError(TSDError, ValueError):
    """An adapter or checkpoint directory is missing files, truncated, tampered with or of the wrong shape."""


class BaseMismatchError(TSDError, ValueError):
    """An adapter is being loaded onto a base model whose weights differ from the ones it was trained on."""
