"""A content-keyed on-disk cache of thin SVDs (issue 5, target 3: a warm switch in seconds).

The switch decomposes every adapted base weight once (``directions.thin_svd``, fp32). The pretrained
weights are the same for every run on the same base model (a grid of seeds, methods, or a resumed run), so
the decomposition is cached on disk, keyed by the weight's *content*:

    <cache_dir>/svd/<sha256 hex of shape, dtype and bytes>.safetensors   (tensors U, S, Vh, fp32)

The key is :func:`lora_tsd.fingerprint.weight_fingerprint`: any changed element, another dtype or a
transposed layout gives another key, so a changed weight can never hit a stale entry. Files are written
atomically (temporary file + rename), so concurrent writers (the ranks of a distributed run) and crashes
leave either a complete file or none. A file that cannot be read or does not match the weight's shape is
ignored with a warning and recomputed (and rewritten).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .atomic import atomic_write
from .directions import ThinSVD, thin_svd
from .fingerprint import weight_fingerprint

SVD_SUBDIR = "svd"
_KEYS = ("U", "S", "Vh")


def svd_cache_path(weight: torch.Tensor, cache_dir: str | os.PathLike) -> Path:
    """Where the SVD of ``weight`` ``(out, in)`` lives (or would live) in ``cache_dir``."""
    return Path(cache_dir) / SVD_SUBDIR / f"{weight_fingerprint(weight).hex()}.safetensors"


def cached_thin_svd(weight: torch.Tensor, cache_dir: str | os.PathLike | None) -> ThinSVD:
    """:func:`lora_tsd.directions.thin_svd` of ``weight``, read from / written to an on-disk cache.

    Args:
        weight: an ``(out, in) = (n, m)`` weight of any float dtype, on any device (pass the layer's
            ``weight_view()`` so HF ``Conv1D`` weights are keyed in the ``(out, in)`` layout the SVD uses).
        cache_dir: the cache's root folder (created on first write); ``None`` disables the cache.

    Returns:
        ``ThinSVD(U (n, k), S (k,), Vh (k, m))``, fp32, on ``weight``'s device, ``k = min(n, m)``; a hit
        returns exactly the tensors a miss computed and stored.
    """
    if cache_dir is None:
        return thin_svd(weight)
    path = svd_cache_path(weight, cache_dir)
    if path.exists():
        svd = _read(path, tuple(weight.shape))
        if svd is not None:
            return ThinSVD(*(t.to(weight.device) for t in svd))
    svd = thin_svd(weight)
    _write(path, svd)
    return svd


def _read(path: Path, shape: tuple[int, ...]) -> ThinSVD | None:
    """The cached SVD in ``path``, or ``None`` (with a warning) when it is unreadable or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
        U, S, Vh = (tensors[k] for k in _KEYS)
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        warnings.warn(f"ignoring unreadable SVD cache file {path} ({err}); recomputing it", stacklevel=3)
        return None
    n, m = shape
    k = min(n, m)
    if not (U.shape == (n, k) and S.shape == (k,) and Vh.shape == (k, m)
            and all(t.dtype == torch.float32 for t in (U, S, Vh))):
        warnings.warn(f"ignoring SVD cache file {path}: its shapes {tuple(U.shape)}, {tuple(S.shape)}, "
                      f"{tuple(Vh.shape)} do not fit a {n}×{m} weight; recomputing it", stacklevel=3)
        return None
    # Cheap sanity checks (O(k), not a re-hash of the file): a damaged file must not yield a bogus ranking.
    if not (torch.isfinite(S).all() and bool((S >= 0).all()) and bool((S[:-1] >= S[1:]).all())):
        warnings.warn(f"ignoring SVD cache file {path}: its singular values are not finite, non-negative "
                      "and descending; recomputing it", stacklevel=3)
        return None
    return ThinSVD(U, S, Vh)


def _write(path: Path, svd: ThinSVD) -> None:
    from safetensors.torch import save_file

    tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in zip(_KEYS, svd, strict=True)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    except OSError as err:  # a read-only or full cache must not fail the switch
        warnings.warn(f"could not write SVD cache file {path} ({err}); continuing without caching it",
                      stacklevel=3)
