"""Issue 5, targets 1–3 on one NVIDIA GPU (H100/H200) at LLaMA-7B shapes in bf16, random weights, < 5 minutes.

    PYTHONPATH=src python bench/gpu_bench.py                 # on the GPU machine
    PYTHONPATH=src python bench/gpu_bench.py --device cpu --tiny   # a seconds-long smoke test anywhere

Precision modes (both run by default, ``--mode`` picks one):

- ``autocast``: fp32 weights and adapters, the step under ``torch.autocast("cuda", dtype=torch.bfloat16)``
  (every matmul in bf16, as HF Trainer's ``bf16=True``);
- ``bf16``: frozen base weights stored in bf16, adapters in fp32 (our default and PEFT's
  ``autocast_adapter_dtype``), no autocast.

Measures: (1) training step (forward + backward of a given output gradient + AdamW) of a dash-phase layer (with
the fused update of ``lora_tsd.fused``, and without it: ``dash-unfused``) vs a plain-LoRA layer of the same rank,
with the authors' dense-dash pattern, at 4096×4096 and 11008×4096;
(2) our ``lora`` layer vs PEFT's LoRA layer, and whole 2-layer LLaMA-7B-shaped models (ours vs PEFT, dash vs
lora), when transformers/peft are importable; (3) the thin SVD of each shape with every cuSOLVER driver, the
switch of one LLaMA-7B decoder layer's targets (q, k, v, up, down) cold vs Σ(SVD + projections), warm with the
SVD cache (needs safetensors), and the switch's peak extra memory. Timing: CUDA events around each step,
warm-up first, variants interleaved, medians. Memory: ``torch.cuda.max_memory_allocated`` growth during the
step plus the bytes of the tensors alive before it (parameters, buffers, optimizer state, inputs).

Depends on torch and lora_tsd only; transformers, peft and safetensors parts are skipped (and say so) when
those packages are missing. Prints a table; writes ``$OUT/gpu_bench.json`` when ``$OUT`` is set (or
``--json PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from lora_tsd.app.bench.gpu_steps import GpuResults, impl_section, layer_section, model_section
from lora_tsd.app.bench.gpu_svd import svd_accuracy_section, svd_section, switch_section, use_stand_in_drivers
from lora_tsd.app.bench.machine import available, usable_cores
from lora_tsd.app.bench.measure import Clock
from lora_tsd.app.bench.workloads import free_memory


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, few reps (a smoke test, numbers mean nothing)")
    p.add_argument("--mode", choices=["autocast", "bf16", "both"], default="both",
                   help="autocast: fp32 weights + bf16 autocast; bf16: bf16 base weights, fp32 adapters")
    p.add_argument("--sections", nargs="+", default=["layers", "models", "svd", "switch"],
                   choices=["layers", "impl", "models", "svd", "svdacc", "switch"],
                   help="impl: candidate adapter forwards; svdacc: TSD ranking accuracy of each SVD driver")
    p.add_argument("--model-reps", type=int, default=None, help="timed steps of the whole models (default --reps)")
    p.add_argument("--reps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="tokens per layer step")
    p.add_argument("--svd-reps", type=int, default=2)
    p.add_argument("--switch-reps", type=int, default=1, help="cold switch / floor repetitions (GPU: stable)")
    p.add_argument("-r", "--rank", type=int, default=8)
    p.add_argument("-s", "--dash", type=int, default=8)
    p.add_argument("--llama-layers", type=int, default=2, help="decoder layers of the LLaMA-7B-shaped model")
    p.add_argument("--model-batch", type=int, nargs=2, default=[2, 1024], metavar=("BATCH", "SEQ"))
    p.add_argument("--budget-s", type=float, default=230.0,
                   help="skip the remaining sections once this many seconds have passed")
    p.add_argument("--fake-drivers", action="store_true",
                   help="with --device cpu: run the cuSOLVER-only code paths with LAPACK for every driver (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="output JSON (default $OUT/gpu_bench.json if $OUT)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections in the order of the plan below, within the time budget. Returns the exit status."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.fake_drivers:
        if device.type != "cpu":
            print("--fake-drivers is for --device cpu", file=sys.stderr)
            return 2
        use_stand_in_drivers()
    args.shapes = [(4096, 4096), (11008, 4096)]
    args.llama = (4096, 11008, 32, 32000)  # hidden, intermediate, heads, vocab
    if args.tiny:
        args.shapes, args.llama = [(64, 64), (172, 64)], (64, 172, 4, 128)
        args.tokens, args.reps, args.warmup, args.model_batch = [32], 3, 1, [2, 16]
        args.svd_reps, args.switch_reps = 1, 1
    if device.type == "cpu":
        torch.set_num_threads(usable_cores())
    peft_ok, hf_ok = available("peft"), available("transformers")
    info = {"torch": torch.__version__, "device": str(device), "peft": peft_ok, "transformers": hf_ok,
            "tiny": args.tiny}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, memory_GiB=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    cuda=torch.version.cuda)
    for name in ("peft", "transformers", "safetensors"):
        with contextlib.suppress(Exception):
            info[f"{name}_version"] = importlib.import_module(name).__version__
    results = GpuResults()
    results.info = info
    print("gpu_bench:", json.dumps(info), flush=True)
    modes = ["autocast", "bf16"] if args.mode == "both" else [args.mode]
    clock = Clock(device)
    t0 = time.perf_counter()
    out = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)

    # Order: the targets first (1–2 per layer, 3 the switch), then whole models, then SVD drivers.
    plan: list[tuple[str, Callable[[], None]]] = []
    common = (results, args, device, clock)
    for mode in modes:
        if "layers" in args.sections:
            plan.append((f"layers {mode}", lambda mode=mode: layer_section(*common, mode, peft_ok)))
    for mode in modes:
        if "impl" in args.sections:
            plan.append((f"impl {mode}", lambda mode=mode: impl_section(*common, mode)))
    if "svdacc" in args.sections:
        plan.append(("svd accuracy", lambda: svd_accuracy_section(*common)))
    if "switch" in args.sections:
        plan.append(("switch (fp32 weights)", lambda: switch_section(*common, "autocast")))
    for mode in modes:
        if "models" in args.sections:
            if hf_ok:
                plan.append((f"models {mode}", lambda mode=mode: model_section(*common, mode, peft_ok)))
            else:
                results.errors.append("transformers missing: whole-model rows skipped")
    if "svd" in args.sections:
        plan.append(("svd drivers", lambda: svd_section(*common)))
    for name, fn in plan:
        if time.perf_counter() - t0 > args.budget_s:
            results.errors.append(f"skipped {name}: time budget {args.budget_s:.0f} s spent")
            print(f"== skipped {name} (time budget)", flush=True)
            continue
        print(f"== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        try:
            fn()
        except Exception as err:  # keep going: one failing section must not lose the others
            results.errors.append(f"{name}: {type(err).__name__}: {err}")
            traceback.print_exc()
            free_memory(device)
        if out is not None:
            results.write(out)
    results.wall_s = time.perf_counter() - t0
    results.print_summary()
    if out is not None:
        results.write(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
