"""TSD math against naive dense references (method.md §1)."""

from __future__ import annotations

import pytest
import torch

import lora_tsd
from lora_tsd.directions import projections, thin_svd


def dense_rates(W: torch.Tensor, dW: torch.Tensor, eps: float = 1e-8, svd_dtype=torch.float32) -> torch.Tensor:
    """Reference: |u_iᵀ ΔW v_i| / (σ_i + eps·σ_1), one direction at a time, evaluated in float64.

    The method takes an fp32 SVD (method.md §2), so the reference uses one too; with ``svd_dtype=float64``
    it measures how much the fp32 decomposition itself moves the rates.
    """
    U, S, Vh = (t.double() for t in torch.linalg.svd(W.to(svd_dtype), full_matrices=False))
    p = torch.stack([U[:, i] @ dW.double() @ Vh[i] for i in range(S.numel())])
    return p.abs() / (S + eps * S[0])


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)], ids=["tall", "wide", "square"])
def test_change_rates_match_dense_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=gen)
    B = torch.randn(shape[0], 4, generator=gen)
    A = torch.randn(4, shape[1], generator=gen)
    dW = B @ A
    ref = dense_rates(W, dW)
    dense = lora_tsd.change_rates(W, dW)
    low_rank = lora_tsd.change_rates(W, (B, A))
    assert dense.shape == (min(shape),)
    assert torch.allclose(dense.double(), ref, rtol=1e-5, atol=0)
    assert torch.allclose(low_rank.double(), ref, rtol=1e-5, atol=0)
    assert torch.allclose(low_rank, dense, rtol=1e-5, atol=0)
    # Against a float64 SVD the fp32 decomposition's own error dominates: small norm-wise.
    ref64 = dense_rates(W, dW, svd_dtype=torch.float64)
    assert (low_rank.double() - ref64).norm() / ref64.norm() < 1e-4


def test_change_rates_of_a_known_core_direction():
    # ΔW = 3·u_2 v_2ᵀ changes only direction 2, at rate 3/σ_2.
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    rates = lora_tsd.change_rates(W, 3.0 * torch.outer(U[:, 2], Vh[2]))
    expected = torch.zeros(12)
    expected[2] = 3.0 / S[2]
    assert torch.allclose(rates, expected, atol=1e-5)


def test_eps_keeps_rank_deficient_weights_finite():
    W = torch.zeros(8, 6)
    W[0, 0] = 2.0  # rank 1: σ_2.. = 0
    rates = lora_tsd.change_rates(W, torch.randn(8, 6))
    assert torch.isfinite(rates).all()
    assert rates[1:].max() > 1e6  # zero singular values get a large but finite rate


def test_svd_is_fp32_for_half_precision_weights():
    W = torch.randn(16, 8).to(torch.bfloat16)
    svd = thin_svd(W)
    assert svd.U.dtype == svd.S.dtype == svd.Vh.dtype == torch.float32
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, W.float(), atol=1e-5)


def test_projection_shape_mismatch_is_an_error():
    svd = thin_svd(torch.randn(8, 6))
    with pytest.raises(lora_tsd.ConfigError, match="does not match"):
        projections(svd, torch.randn(6, 8))


def test_selectors():
    rates = torch.tensor([0.1, 0.5, 0.5, 0.05, 0.9])
    assert lora_tsd.select_directions(rates, 3).tolist() == [4, 1, 2]  # tie 1/2: lower index first
    assert lora_tsd.select_directions(rates, 2, selector="top").tolist() == [0, 1]
    assert lora_tsd.select_directions(rates, 2, selector="bottom").tolist() == [4, 3]
    W = torch.randn(7, 5)
    assert lora_tsd.select_directions(W, 2, selector="bottom").tolist() == [4, 3]
    r1 = lora_tsd.select_directions(W, 5, selector="random", seed=3)
    r2 = lora_tsd.select_directions(W, 5, selector="random", seed=3)
    r3 = lora_tsd.select_directions(W, 5, selector="random", seed=4)
    assert r1.tolist() == r2.tolist() and sorted(r1.tolist()) == [0, 1, 2, 3, 4]
    assert r1.tolist() != r3.tolist()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: lora_tsd.select_directions(torch.rand(5), 6), "cannot select 6 directions out of 5"),
        (lambda: lora_tsd.select_directions(torch.rand(5), 2, selector="best"), "unknown selector 'best'"),
        (lambda: lora_tsd.select_directions(torch.rand(5, 4), 2), "pass the rates"),
        (lambda: lora_tsd.select_directions(torch.rand(5), 2, selector="random"), "needs a seed"),
        (lambda: lora_tsd.select_directions(torch.tensor([1.0, float("nan")]), 1), "NaN"),
    ],
)
def test_selector_errors(call, message):
    with pytest.raises(lora_tsd.TSDError, match=message):
        call()


def test_tsd_set_metrics():
    reference = list(range(16))  # true ranking 0, 1, ..., 15
    predicted = [0, 1, 2, 3, 20, 21, 22, 23]
    assert lora_tsd.tsd_recall(predicted, reference) == 1.0  # true top-4 ⊂ predicted top-8
    assert lora_tsd.tsd_accuracy(predicted, reference) == 0.5  # 4 of the predicted 8 in the true top-16
    assert lora_tsd.tsd_recall([0, 1, 2, 9, 20, 21, 22, 23], reference) == 0.75
    assert lora_tsd.overlap([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    with pytest.raises(lora_tsd.ConfigError, match="fewer than the 16"):
        lora_tsd.tsd_accuracy(predicted, list(range(10)))


# --- the CUDA SVD path (cuSOLVER gesvda, checked, else gesvd), exercised through a stand-in for the driver ---


def _gram_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An approximate thin SVD through the eigenvectors of ``WᵀW`` in fp32 (the way approximate drivers fail):
    squaring the condition number, it loses the small singular directions of an ill-conditioned weight."""
    evals, V = torch.linalg.eigh(W.T @ W)
    order = evals.flip(0).clamp_min(0).sqrt(), V.flip(1)
    S, V = order
    U = (W @ V) / S.clamp_min(1e-30)
    return U, S, V.T


def _driver_stub(calls: list[str], fast):
    def svd(W, full_matrices=False, driver=None):
        calls.append(driver)
        assert full_matrices is False
        if driver == "gesvda":
            return fast(W)
        assert driver == "gesvd"
        return torch.linalg.svd(W, full_matrices=False)
    return svd


def _weight(n: int, m: int, smallest: float) -> torch.Tensor:
    """``(n, m)`` fp32 weight with singular values log-spaced from 1 down to ``smallest``."""
    gen = torch.Generator().manual_seed(n * m)
    U, _ = torch.linalg.qr(torch.randn(n, min(n, m), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, min(n, m), generator=gen, dtype=torch.float64))
    S = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), min(n, m), dtype=torch.float64)
    return ((U * S) @ V.T).float()


def test_svd_error_accepts_lapack_and_rejects_a_gram_svd_of_an_ill_conditioned_weight():
    from lora_tsd.directions import ThinSVD, svd_error, svd_tolerance

    assert svd_tolerance((4096, 4096)) == pytest.approx(4.88e-4, rel=1e-2)
    assert svd_tolerance((11008, 4096)) == pytest.approx(8.0e-4, rel=1e-2)
    for smallest in (1e-1, 1e-6):
        W = _weight(192, 96, smallest)
        assert svd_error(W, ThinSVD(*torch.linalg.svd(W, full_matrices=False))) < 1e-5
    tol = svd_tolerance((192, 96))
    assert svd_error(_weight(192, 96, 1e-1), ThinSVD(*_gram_svd(_weight(192, 96, 1e-1)))) < tol
    assert svd_error(_weight(192, 96, 1e-6), ThinSVD(*_gram_svd(_weight(192, 96, 1e-6)))) > 100 * tol
    # The loss is in the small directions: the large ones stay orthonormal, the small ones do not.
    U, _, _ = _gram_svd(_weight(192, 96, 1e-6))
    gram = U.T @ U - torch.eye(96)
    assert gram[:8, :8].abs().max() < tol < gram[-8:, -8:].abs().max()


@pytest.mark.parametrize("shape", [(192, 96), (96, 192)], ids=["tall", "wide"])
def test_checked_fast_svd_keeps_an_accurate_fast_result(shape):
    from lora_tsd.directions import checked_fast_svd

    W = _weight(*shape, 1e-1)
    calls: list[str] = []

    def gram_any(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if w.shape[0] >= w.shape[1]:
            return _gram_svd(w)
        U, S, Vh = _gram_svd(w.T)  # wᵀ = U S Vh  ⇒  w = Vhᵀ S Uᵀ
        return Vh.T, S, U.T

    svd = checked_fast_svd(W, _driver_stub(calls, gram_any))
    assert calls == ["gesvda"]
    assert torch.allclose((svd.U * svd.S) @ svd.Vh, W, atol=1e-5)


def test_checked_fast_svd_falls_back_to_gesvd_when_the_fast_result_is_inaccurate():
    from lora_tsd.directions import checked_fast_svd

    W = _weight(192, 96, 1e-6)
    calls: list[str] = []
    svd = checked_fast_svd(W, _driver_stub(calls, _gram_svd))
    assert calls == ["gesvda", "gesvd"]
    ref = torch.linalg.svd(W, full_matrices=False)
    assert torch.equal(svd.U, ref.U) and torch.equal(svd.S, ref.S) and torch.equal(svd.Vh, ref.Vh)
    # The fallback matters for the method: the inaccurate factors put the top change rates elsewhere.
    from lora_tsd.directions import ThinSVD

    gen = torch.Generator().manual_seed(1)
    B, A = torch.randn(192, 4, generator=gen), torch.randn(4, 96, generator=gen)

    def top8(f: ThinSVD) -> set[int]:
        rates = (projections(f, (B, A)).abs() / (f.S + 1e-8 * f.S[0])).nan_to_num(posinf=float("inf"))
        return set(rates.double().nan_to_num(nan=0.0).topk(8).indices.tolist())

    assert top8(svd) != top8(ThinSVD(*_gram_svd(W)))


def test_checked_fast_svd_falls_back_when_the_fast_driver_raises_or_returns_nan():
    from lora_tsd.directions import checked_fast_svd

    W = _weight(64, 48, 1e-1)

    def raises(w):
        raise RuntimeError("cusolver error: CUSOLVER_STATUS_NOT_SUPPORTED")

    def nan(w):
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U, S.clone().fill_(float("nan")), Vh

    for fast in (raises, nan):
        calls: list[str] = []
        svd = checked_fast_svd(W, _driver_stub(calls, fast))
        assert calls == ["gesvda", "gesvd"]
        assert torch.isfinite(svd.S).all()
