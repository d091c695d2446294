"""Content fingerprints of weights: the key that ties an adapter to the base weights it was trained on
(and, later, the key of the on-disk SVD cache).
"""

from __future__ import annotations

import hashlib

import torch

FINGERPRINT_BYTES = 32


def weight_fingerprint(weight: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's shape, dtype and raw bytes (32 bytes).

    Exact by design: any changed element, a transposed layout or another dtype gives another fingerprint.
    """
    t = weight.detach()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    # viewing as uint8 works for every dtype (bf16 has no numpy counterpart) and copies nothing on CPU.
    h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def fingerprint_tensor(digest: bytes) -> torch.Tensor:
    """A digest as a ``(32,)`` uint8 tensor, so it can live in a module buffer and ride in ``state_dict``."""
    return torch.tensor(list(digest), dtype=torch.uint8)


def fingerprint_hex(buffer: torch.Tensor) -> str:
    return bytes(buffer.cpu().tolist()).hex()
