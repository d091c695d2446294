"""Does re-quantizing the Init residual help? Error of the weight a quantized base stands for, both ways (CPU).

    PYTHONPATH=src python bench/quantized_residual.py [--size 1024] [--r 16]

For a weight ``W`` ``(size, size)`` (random with a decaying spectrum, like trained LLM weights: σ_i ∝ i^-0.5 plus
Gaussian noise) and the r directions an Init-style method moves into the adapter (``top``: PiSSA; ``spread``:
every (size/r)-th direction, like task-specific ones spread over the spectrum), the effective base after the
switch is ``Q(W) − U_T Σ_T V_Tᵀ`` (kept, the default) or ``Q(W − U_T Σ_T V_Tᵀ)`` (``requantize_residual``). Prints
the relative Frobenius error of each against the exact residual ``W − U_T Σ_T V_Tᵀ`` per quantization kind.
"""

from __future__ import annotations

import argparse
import json

import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt, Params4bit

from lora_tsd.quantized import dequantized_weight, quantization_error, requantize


def quantized(weight: torch.Tensor, kind: str) -> torch.nn.Module:
    out, inp = weight.shape
    if kind == "int8":
        layer = Linear8bitLt(inp, out, bias=False, has_fp16_weights=False)
        layer.load_state_dict({"weight": weight.half()})
        return layer.to("cpu")
    layer = Linear4bit(inp, out, bias=False, compute_dtype=torch.float32, quant_type=kind)
    layer.weight = Params4bit(weight.clone(), requires_grad=False, quant_type=kind).to("cpu")
    return layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    n = args.size
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    sigma = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
    W = (U * sigma) @ V.T + 0.002 * torch.randn(n, n, generator=gen)
    W = W * (0.02 / W.std())  # LLM-like scale
    svd = torch.linalg.svd(W, full_matrices=False)
    picks = {"top": torch.arange(args.r), "spread": torch.arange(args.r) * (n // args.r)}
    report = {}
    for kind in ("nf4", "fp4", "int8"):
        for name, idx in picks.items():
            component = (svd.U[:, idx] * svd.S[idx]) @ svd.Vh[idx]
            residual = W - component
            layer = quantized(W, kind)
            kept = float((dequantized_weight(layer) - component - residual).norm() / residual.norm())
            assert abs(kept - quantization_error(layer, W) * W.norm() / residual.norm()) < 1e-4
            requantized = requantize(layer, residual)
            report[f"{kind}/{name}"] = {"kept_Q(W)": round(kept, 5), "requantized_Q(W_res)": round(requantized, 5)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
