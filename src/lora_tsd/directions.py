"""Task-specific-direction math (method.md §1): pure tensor functions, no ``nn.Module``.

Conventions
-----------
- A weight ``W`` is ``(out, in) = (n, m)``, as ``nn.Linear`` stores it; ``k = min(n, m)``.
- The thin SVD is ``W = U diag(S) Vh`` with ``U (n, k)``, ``S (k,)`` descending, ``Vh (k, m)``; all of it
  in fp32 whatever the weight's dtype (bf16/fp16 SVDs are not accurate enough to rank directions).
- The *core direction* i is the rank-1 matrix ``u_i v_iᵀ``; the projection of a change ``ΔW`` on it is
  ``p_i = u_iᵀ ΔW v_i`` and its *change rate* is ``|p_i| / (S_i + ε)``, with ``ε = eps · S_1``.

Everything else in the library calls these functions; nothing re-derives them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .errors import ConfigError, NonFiniteError

SELECTORS = ("tsd", "top", "bottom", "random")
DEFAULT_EPS = 1e-8

LowRankDelta = tuple[torch.Tensor, torch.Tensor]


class ThinSVD(NamedTuple):
    """``W = U diag(S) Vh``: ``U (n, k)``, ``S (k,)`` descending, ``Vh (k, m)``, all fp32."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def thin_svd(weight: torch.Tensor) -> ThinSVD:
    """Thin SVD of an ``(out, in)`` weight, computed in fp32 on the weight's device.

    On CUDA: :func:`checked_fast_svd` (cuSOLVER ``gesvda`` when it passes an accuracy check, else ``gesvd``);
    elsewhere LAPACK's default driver.

    Raises :class:`NonFiniteError` on NaN/inf input instead of letting LAPACK fail obscurely.
    """
    if weight.ndim != 2:
        raise ConfigError(f"thin_svd expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise NonFiniteError("weight contains NaN or inf values; cannot compute its SVD")
    if w.is_cuda:
        return checked_fast_svd(w)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return ThinSVD(U, S, Vh)


def svd_error(weight: torch.Tensor, svd: ThinSVD) -> float:
    """How far ``svd`` is from an exact thin SVD of the ``(n, m)`` fp32 ``weight``, as one number.

    The largest of ``max|UᵀU − I|``, ``max|Vh Vhᵀ − I|`` and ``‖W − U diag(S) Vh‖_F / ‖W‖_F``. Orthogonality
    catches what a reconstruction residual misses: an approximate method that recovers the small singular
    directions through ``WᵀW`` reconstructs ``W`` well yet returns non-orthogonal ``u_i`` there, and those
    near-null directions are exactly where change rates (``|p_i| / σ_i``) are largest. Cost: three
    matmuls of ``W``'s size, negligible next to the SVD on a GPU.
    """
    U, S, Vh = svd
    eye = torch.eye(S.shape[0], dtype=U.dtype, device=U.device)
    orth = max(float((U.T @ U - eye).abs().max()), float((Vh @ Vh.T - eye).abs().max()))
    residual = torch.addmm(weight, U * S, Vh, alpha=-1)  # W − U diag(S) Vh, one weight-sized buffer
    recon = float(torch.linalg.matrix_norm(residual) / torch.linalg.matrix_norm(weight).clamp_min(1e-30))
    return max(orth, recon)


def svd_tolerance(shape: tuple[int, int]) -> float:
    """Largest :func:`svd_error` accepted from the fast driver: ``64 · eps_fp32 · sqrt(max(n, m))``.

    About 5e-4 at 4096 and 8e-4 at 11008. Measured on an H100 (docs/performance.md): the accurate QR driver
    ``gesvd`` reaches ~1e-4 at those sizes and ``gesvda`` ~5e-6 on well-conditioned weights, while torch's
    default Jacobi driver (``gesvdj``) stops at ~2e-3, which is enough to reorder near-tied change rates.
    """
    return 64 * torch.finfo(torch.float32).eps * max(shape) ** 0.5


def checked_fast_svd(weight: torch.Tensor,
                     svd_fn: Callable[..., tuple[torch.Tensor, ...]] = torch.linalg.svd) -> ThinSVD:
    """Thin SVD of an fp32 CUDA ``(n, m)`` weight: cuSOLVER ``gesvda``, checked, else ``gesvd``.

    ``gesvda`` is ~8× faster than the other drivers at LLaMA-7B shapes on an H100, but cuSOLVER documents it
    as approximate for ill-conditioned matrices; its result is kept only when :func:`svd_error` is within
    :func:`svd_tolerance`, otherwise the QR-based ``gesvd`` recomputes it (never torch's default ``gesvdj``,
    which is both slower and less accurate). ``svd_fn`` exists for tests on machines without a GPU.
    """
    tol = svd_tolerance(tuple(weight.shape))
    try:
        fast = ThinSVD(*svd_fn(weight, full_matrices=False, driver="gesvda"))
    except RuntimeError:  # a cuSOLVER build without gesvda, or a failed convergence
        fast = None
    if fast is not None and torch.isfinite(fast.S).all() and svd_error(weight, fast) <= tol:
        return fast
    return ThinSVD(*svd_fn(weight, full_matrices=False, driver="gesvd"))


def projections(svd: ThinSVD, delta: torch.Tensor | LowRankDelta) -> torch.Tensor:
    """Projections ``p_i = u_iᵀ ΔW v_i`` of a change on the k core directions, shape ``(k,)`` fp32.

    ``delta`` is either a dense ``(out, in)`` tensor or a low-rank pair ``(B (out, r), A (r, in))`` with
    ``ΔW = B A``. The pair path never forms ``ΔW``: ``p = rowsum((Uᵀ B) ⊙ (A V)ᵀ)``, cost
    ``O(k·r·(n+m))`` instead of ``O(n·m·k)``.
    """
    # Accumulate in float64: small projections of a large change cancel, and fp32 sums lose their relative
    # accuracy there. The low-rank path costs O(k·r·(n+m)), so float64 is cheap.
    U, _, Vh = (t.to(torch.float64) for t in svd)
    if isinstance(delta, (tuple, list)):
        B, A = delta
        B = B.detach().to(torch.float64)
        A = A.detach().to(torch.float64)
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ConfigError(f"low-rank delta needs B (out, r) and A (r, in), got {tuple(B.shape)} and "
                              f"{tuple(A.shape)}")
        _check_shape(U, Vh, (B.shape[0], A.shape[1]))
        # (k, r) and (k, r): row i of each pairs u_iᵀB with A v_i.
        return ((U.T @ B) * (Vh @ A.T)).sum(dim=1).to(torch.float32)
    d = delta.detach().to(torch.float64)
    _check_shape(U, Vh, tuple(d.shape))
    return ((U.T @ d) * Vh).sum(dim=1).to(torch.float32)


def _check_shape(U: torch.Tensor, Vh: torch.Tensor, shape: tuple[int, ...]) -> None:
    if shape != (U.shape[0], Vh.shape[1]):
        raise ConfigError(f"delta of shape {shape} does not match the weight's shape {(U.shape[0], Vh.shape[1])}")


def rates_from_projections(p: torch.Tensor, S: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``|p_i| / (S_i + eps·S_1)``; the relative ε keeps rank-deficient weights (S_i = 0) finite."""
    floor = eps * S[0].clamp_min(torch.finfo(S.dtype).tiny) if S.numel() else S.new_tensor(0.0)
    return p.abs() / (S + floor)


def change_rates(
    weight: torch.Tensor,
    delta: torch.Tensor | LowRankDelta,
    eps: float = DEFAULT_EPS,
    svd: ThinSVD | None = None,
) -> torch.Tensor:
    """Change rates of ``delta`` on the core directions of ``weight``, shape ``(k,)``.

    Args:
        weight: pretrained weight ``(out, in)``.
        delta: the change, a dense ``(out, in)`` tensor or a pair ``(B (out, r), A (r, in))``, ``ΔW = B A``.
        eps: relative floor, ``ε = eps · σ_1``.
        svd: a precomputed :func:`thin_svd` of ``weight`` (skips the decomposition).

    Returns:
        The k = min(out, in) rates ordered by descending singular value (index i ↔ σ_i).
    """
    svd = thin_svd(weight) if svd is None else svd
    return rates_from_projections(projections(svd, delta), svd.S, eps)


def select_directions(
    rates_or_weight: torch.Tensor,
    k: int,
    selector: str = "tsd",
    seed: int | None = None,
) -> torch.Tensor:
    """Indices of ``k`` core directions, most important first, as a ``(k,)`` int64 tensor.

    Args:
        rates_or_weight: a ``(K,)`` vector of change rates (any selector), or a 2-D ``(out, in)`` weight
            (``top``/``bottom``/``random`` only need its K = min(out, in)).
        k: how many directions to select, ``0 ≤ k ≤ K``.
        selector: ``tsd`` (highest change rate; ties → lower index first), ``top`` (largest σ),
            ``bottom`` (smallest σ, smallest first), ``random`` (seeded permutation).
        seed: seed of the ``random`` selector (required for it, so every process agrees).
    """
    if selector not in SELECTORS:
        raise ConfigError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
    x = rates_or_weight
    if x.ndim == 1:
        total = x.shape[0]
    elif x.ndim == 2:
        if selector == "tsd":
            raise ConfigError("selector 'tsd' ranks by change rate: pass the rates from change_rates(), "
                              "not a weight")
        total = min(x.shape)
    else:
        raise ConfigError(f"expected a (k,) rate vector or an (out, in) weight, got shape {tuple(x.shape)}")
    if not 0 <= k <= total:
        raise ConfigError(f"cannot select {k} directions out of {total}")
    if selector == "tsd":
        if not torch.isfinite(x).all():
            raise NonFiniteError("change rates contain NaN or inf")
        # stable sort on the negated rates: equal rates keep ascending index order.
        return torch.sort(-x.detach().float().cpu(), stable=True).indices[:k].to(torch.int64)
    if selector == "top":
        return torch.arange(k, dtype=torch.int64)
    if selector == "bottom":
        return torch.arange(total - 1, total - 1 - k, -1, dtype=torch.int64)
    if seed is None:
        raise ConfigError("selector 'random' needs a seed so that every process picks the same directions")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:k].to(torch.int64)


# ---------------------------------------------------------------------------------------------- metrics


def _as_list(indices: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]


def overlap(a: torch.Tensor | Sequence[int], b: torch.Tensor | Sequence[int]) -> float:
    """Share of the directions in ``a`` that are also in ``b``: ``|a ∩ b| / |a|``."""
    a_set, b_set = set(_as_list(a)), set(_as_list(b))
    if not a_set:
        raise ConfigError("overlap of an empty direction set is undefined")
    return len(a_set & b_set) / len(a_set)


def tsd_recall(
    predicted: torch.Tensor | Sequence[int],
    reference: torch.Tensor | Sequence[int],
    n_predicted: int = 8,
    n_reference: int = 4,
) -> float:
    """The paper's recall: share of the reference top-``n_reference`` inside the predicted top-``n_predicted``.

    Both arguments are rankings (most important first). The paper's binary event "the predicted top-8
    contain the true top-4" is ``tsd_recall(...) == 1.0``.
    """
    p, r = _as_list(predicted), _as_list(reference)
    _need(p, n_predicted, "predicted")
    _need(r, n_reference, "reference")
    return overlap(r[:n_reference], p[:n_predicted])


def tsd_accuracy(
    predicted: torch.Tensor | Sequence[int],
    reference: torch.Tensor | Sequence[int],
    n_predicted: int = 8,
    n_reference: int = 16,
) -> float:
    """The paper's accuracy: share of the predicted top-``n_predicted`` inside the reference top-``n_reference``."""
    p, r = _as_list(predicted), _as_list(reference)
    _need(p, n_predicted, "predicted")
    _need(r, n_reference, "reference")
    return overlap(p[:n_predicted], r[:n_reference])


def _need(ranking: list[int], n: int, what: str) -> None:
    if len(ranking) < n:
        raise ConfigError(f"the {what} ranking has {len(ranking)} directions, fewer than the {n} needed")
