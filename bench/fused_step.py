"""Per-layer training step of lora vs dash with the unfused update vs dash with the fused update (issue 20), CPU.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/fused_step.py [--threads 1] [--reps 30]

One bias-free linear layer ``(out, in)`` with our adapter (rank r, s dash directions; the dash layers in their dash
phase with random orthonormal directions and the same weights, adapters and c), a batch of ``batch × seq`` tokens in
fp32 (an input that requires no grad unless ``--input-grad``), one training step = forward, backward of a fixed
output gradient, AdamW, ``lora_tsd.step``. The three variants run interleaved and rotated (warm-up first); prints
the median seconds of each, the ratios of the medians (in parentheses: the median of the ratios of calls made back
to back), and the largest output and gradient gaps between the fused and the unfused dash layer. ``--device cuda``
runs the same on a GPU (CUDA-event timing).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lora_tsd.app.bench.forward_impls import with_impl
from lora_tsd.app.bench.measure import Clock, interleaved
from lora_tsd.app.bench.steps import layer_step
from lora_tsd.app.bench.workloads import OneLayer, attach_adapters


def build(n: int, m: int, method: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The ``(n, m)`` layer with ``method``'s adapter, the same random state for every variant of a shape."""
    torch.manual_seed(n * 31 + m)  # nn.Linear's own initialization
    gen = torch.Generator().manual_seed(n + m)
    return attach_adapters(OneLayer(n, m).to(device), method, ["proj"], args.rank, args.dash, gen)


def gaps(fused: torch.nn.Module, unfused: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """Largest |Δy| and |Δ grad| (x, A, B, c) of one forward/backward of the two dash layers."""
    outs = []
    for model in (fused, unfused):
        xi = x.detach().clone().requires_grad_(True)
        y = model(xi)
        layer = model.proj
        grads = torch.autograd.grad(y, [xi, layer.lora_A, layer.lora_B, layer.dash_c], g)
        outs.append((y.detach(), grads))
    dy = float((outs[0][0] - outs[1][0]).abs().max())
    dg = max(float((a - b).abs().max()) for a, b in zip(outs[0][1], outs[1][1], strict=True))
    return dy, dg


def ratio(times: dict[str, list[float]], a: str, b: str) -> str:
    """``median(a) / median(b)`` and, in parentheses, the median of the ratios of calls made back to back."""
    paired = statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
    return f"{statistics.median(times[a]) / statistics.median(times[b]):.3f} ({paired:.3f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1024x1024", "2816x1024"], help="out x in of the layer")
    p.add_argument("--batch", type=int, nargs=2, default=[4, 256], metavar=("BATCH", "SEQ"))
    p.add_argument("-r", "--rank", type=int, default=16)
    p.add_argument("-s", "--dash", type=int, default=8)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--input-grad", action="store_true", help="the input requires grad (a layer above the first)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    b, t = args.batch
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s), fp32, r={args.rank} "
          f"s={args.dash}, batch {b}x{t} tokens, input grad {args.input_grad}, {args.reps} interleaved reps after "
          f"{args.warmup} warm-up")
    print("| layer | lora median s | dash unfused median s | dash fused median s | unfused/lora | fused/lora | "
          "fused/unfused | max |Δy| | max |Δgrad| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, m = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(n * 7 + m)
        x = torch.randn(b, t, m, generator=gen).to(device).requires_grad_(args.input_grad)
        g = torch.randn(b, t, n, generator=gen).to(device)
        models = {"lora": build(n, m, "lora", args, device),
                  "dash-unfused": with_impl(build(n, m, "dash", args, device), "unfused"),
                  "dash-fused": build(n, m, "dash", args, device)}
        dy, dg = gaps(models["dash-fused"], models["dash-unfused"], x, g)
        steps = {k: layer_step(k, mod, x, g, tsd=True) for k, mod in models.items()}
        times = interleaved(steps, args.reps, args.warmup, clock=Clock(device))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {n}x{m} | {med['lora']:.4f} | {med['dash-unfused']:.4f} | {med['dash-fused']:.4f} | "
              f"{ratio(times, 'dash-unfused', 'lora')} | {ratio(times, 'dash-fused', 'lora')} | "
              f"{ratio(times, 'dash-fused', 'dash-unfused')} | {dy:.1e} | {dg:.1e} |", flush=True)


if __name__ == "__main__":
    main()
