"""The fused adapter update (lora_tsd.fused) against the plain autograd-traced forward (``layer.fused = False``,
the factors()-based computation): outputs and gradients over AdamW steps before and after the switch, and
gradcheck of the autograd Function in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_tsd
from lora_tsd.fused import FusedAdapterUpdate, add_update, concat_factors, project

FP32_TOL = 1e-6
BF16_TOL = 2e-2  # relative to the largest |value|: a bf16 base rounds its output and input gradient to ~3 digits


def tiny_model(method: str, dropout: float, fused: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12)).to(dtype)
    cfg = lora_tsd.TSDConfig(method=method, r=4, dash_directions=3, target_modules=["0", "2"],
                             prelaunch_steps=1, dropout=dropout)
    lora_tsd.attach(model, cfg)
    for _, layer in lora_tsd.adapted_layers(model):
        layer.fused = fused
    return model


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{p}": getattr(layer, p).grad.clone() for name, layer in lora_tsd.adapted_layers(model)
            for p in ("lora_A", "lora_B", "dash_c")}


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["dash", "tsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base"])
def test_fused_update_matches_the_plain_forward_over_optimizer_steps(method, dropout, train, dtype):
    models = {f: tiny_model(method, dropout, f, dtype) for f in (True, False)}
    opts = {f: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for f, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    checked_switched = False
    for step in range(4):  # step 0 is the pre-launch; lora_tsd.step switches after it
        x = torch.randn(5, 7, 16, generator=gen).to(dtype)
        w = torch.randn(5, 7, 12, generator=gen).to(dtype)
        out, grads = {}, {}
        for fused, model in models.items():
            model.train(train)
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(100 + step)  # the same dropout masks for both
            y = model(xi)
            layer = model[2]
            assert (type(y.grad_fn).__name__ == "FusedAdapterUpdateBackward") == fused
            (y.float() * w.float()).sum().backward()
            out[fused], grads[fused] = y.detach(), {"x": xi.grad.clone(), **adapter_grads(model)}
            opts[fused].step()
            opts[fused].zero_grad()
            lora_tsd.step(model, opts[fused])
            checked_switched = checked_switched or layer.is_switched
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        scale = 1.0 if dtype == torch.float32 else max(float(out[False].float().abs().max()), 1.0)
        assert max_gap(out[True], out[False]) <= tol * scale, step
        for key, ref in grads[False].items():
            scale = 1.0 if dtype == torch.float32 else max(float(ref.float().abs().max()), 1e-3)
            assert max_gap(grads[True][key], ref) <= tol * scale, (step, key)
        if step >= 2:  # after the switch c gets a real gradient: the comparison above is not of zeros
            assert all(float(g.abs().max()) > 1e-4 for k, g in grads[False].items() if k.endswith("dash_c"))
    assert checked_switched
    for (name, a), (_, b) in zip(lora_tsd.adapted_layers(models[True]), lora_tsd.adapted_layers(models[False]),
                                 strict=True):
        for p in ("lora_A", "lora_B", "dash_c"):
            assert max_gap(getattr(a, p), getattr(b, p)) <= 1e-5, (name, p)


def test_fused_update_matches_factors_reference_directly():
    """Against a hand-written reference built from ``concat_factors``: y = result + (h A'ᵀ) B'ᵀ."""
    gen = torch.Generator().manual_seed(3)
    r, s, n_in, n_out = 3, 2, 9, 7
    t = {k: torch.randn(*shape, generator=gen) for k, shape in
         dict(result=(2, 5, n_out), h=(2, 5, n_in), A=(r, n_in), B=(n_out, r), c=(s,), U=(n_out, s),
              V=(n_in, s), g=(2, 5, n_out)).items()}
    leaves = {k: t[k].clone().requires_grad_(True) for k in ("result", "h", "A", "B", "c")}
    Bp, Ap = concat_factors(leaves["A"], leaves["B"], 0.5, leaves["c"], t["U"], t["V"])
    ref = leaves["result"] + (leaves["h"] @ Ap.T) @ Bp.T
    ref_grads = torch.autograd.grad(ref, list(leaves.values()), t["g"])
    fused_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    f = fused_leaves
    y = FusedAdapterUpdate.apply(f["result"], f["h"], None, f["A"], f["B"], f["c"], t["U"], t["V"], 0.5)
    grads = torch.autograd.grad(y, list(f.values()), t["g"])
    assert max_gap(y, ref) <= FP32_TOL
    for name, a, b in zip(leaves, grads, ref_grads, strict=True):
        assert max_gap(a, b) <= FP32_TOL, name


@pytest.mark.parametrize("separate", [False, True], ids=["shared-input", "own-dash-input"])
def test_fused_update_passes_gradcheck(separate):
    gen = torch.Generator().manual_seed(2)
    r, s, n_in, n_out = 3, 2, 6, 5

    def leaf(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    result, h = leaf(4, n_out), leaf(4, n_in)
    h_dash = leaf(4, n_in) if separate else None
    A, B, c = leaf(r, n_in), leaf(n_out, r), leaf(s)
    U, V = leaf(n_out, s, grad=False), leaf(n_in, s, grad=False)

    def fn(result, h, h_dash, A, B, c):  # noqa: ANN001, ANN202
        return FusedAdapterUpdate.apply(result, h, h_dash, A, B, c, U, V, 0.75)

    assert torch.autograd.gradcheck(fn, (result, h, h_dash, A, B, c))


def test_plain_pieces_compose_to_the_dense_update():
    """project + add_update = result + h (B'A')ᵀ with the dense (out, in) product (a naive reference)."""
    gen = torch.Generator().manual_seed(4)
    A, B, c = torch.randn(3, 8, generator=gen), torch.randn(6, 3, generator=gen), torch.randn(2, generator=gen)
    U, V = torch.randn(6, 2, generator=gen), torch.randn(8, 2, generator=gen)
    h, hd, result = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(4, 6, generator=gen)
    Bp, Ap = concat_factors(A, B, 2.0, c, U, V)
    dense = 2.0 * B @ A + U @ torch.diag(c) @ V.T
    assert max_gap(add_update(result, project(h, None, Ap, 3), Bp), result + h @ dense.T) <= 1e-5
    own = result + 2.0 * h @ (B @ A).T + hd @ (U @ torch.diag(c) @ V.T).T
    assert max_gap(add_update(result, project(h, hd, Ap, 3), Bp), own) <= 1e-5


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["dash", "tsd"])
def test_fused_update_under_autocast_matches_the_plain_forward(method, dropout):
    """fp32 weights, the step under bf16 autocast (``lora-tsd train --bf16``): the node runs and replays autocast's
    dtypes, so outputs and gradients match the plain forward's autograd to the last bits of a bf16 gemm."""
    models = {f: tiny_model(method, dropout, f, torch.float32) for f in (True, False)}
    opts = {f: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for f, m in models.items()}
    gen = torch.Generator().manual_seed(5)
    gaps = []
    for step in range(4):
        x, w = torch.randn(5, 7, 16, generator=gen), torch.randn(5, 7, 12, generator=gen)
        out, grads = {}, {}
        for fused, model in models.items():
            model.train()
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(100 + step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(xi)
            assert y.dtype == torch.bfloat16
            assert (type(y.grad_fn).__name__ == "FusedAdapterUpdateBackward") == fused
            (y.float() * w).sum().backward()
            out[fused], grads[fused] = y.detach(), {"x": xi.grad.clone(), **adapter_grads(model)}
            for key, g in grads[fused].items():
                assert g.dtype == torch.float32, key  # each gradient in its input's dtype
            opts[fused].step()
            opts[fused].zero_grad()
            lora_tsd.step(model, opts[fused])
        gaps.append(max_gap(out[True], out[False]))
        for key, ref in grads[False].items():
            gaps.append(max_gap(grads[True][key], ref) / max(float(ref.abs().max()), 1e-3))
    # The same bf16 gemms on the same bf16 inputs: equal up to a bf16 rounding of a differently blocked sum.
    assert max(gaps) <= 1e-2, gaps


def saved_bytes_under_autocast(model: nn.Module, tokens: int) -> int:
    """Bytes autograd keeps for backward after one forward under bf16 autocast (each tensor counted once)."""
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    x = torch.randn(tokens, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    return sum(saved.values())


def test_fused_update_under_autocast_keeps_no_more_per_token_memory_than_the_plain_forward():
    """The node keeps its input in autocast's dtype, as autocast's own cast for the gemm would be: what it keeps
    beyond the plain forward (the fp32 factors A', B') does not grow with the number of tokens."""
    extra = {}
    for tokens in (64, 512):
        kept = {}
        for fused in (True, False):
            model = tiny_model("dash", 0.0, fused, torch.float32)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            for _ in range(2):  # pre-launch step, then switched: the dash term exists
                model(torch.randn(8, 16)).sum().backward()
                opt.step()
                opt.zero_grad()
                lora_tsd.step(model, opt)
            assert model[2].is_switched
            kept[fused] = saved_bytes_under_autocast(model, tokens)
        extra[tokens] = kept[True] - kept[False]
    assert extra[64] == extra[512], extra
