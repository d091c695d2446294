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
