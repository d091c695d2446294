"""Issue 20's GPU targets in one short run, on random LLaMA-7B-shaped weights (nothing is downloaded).

    PYTHONPATH=src python bench/gpu_scale_check.py                 # sized for < 5 min on an H100 (untimed)
    PYTHONPATH=src python bench/gpu_scale_check.py --tiny --device cpu   # seconds: a smoke run of every section

Sections (bf16 weights, r = 16, s = 8, all seven projections, batch 4 x 1024 tokens unless --tiny):
1. per layer: dash (switched) / LoRA training-step time for the 4096x4096, 11008x4096 and 4096x11008 shapes, with
   the fused update (``lora_tsd.fused``, the default) and without it ("unfused");
2. whole model (4 decoder layers): dash / LoRA step time, eager (fused and unfused) and ``torch.compile``-d;
3. the gradient probe's peak memory, all layers at once vs grouped (``group_size`` = layers / 8), against a
   LoRA step's.
Prints one JSON object (and writes it to $OUT/gpu_scale_check.json when $OUT is set). Targets of the issue:
per-layer dash/LoRA <= 1.05, whole-model <= 1.02; the grouped probe's peak no more than 1.15 x a LoRA step's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lora_tsd
from lora_tsd.app.bench.model_cases import random_llama

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 2048}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 128, "max_position_embeddings": 64}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict[str, Callable[[], None]], reps: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each function, interleaved round by round after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def adapter_config(method: str, **extra: object) -> lora_tsd.TSDConfig:
    return lora_tsd.TSDConfig(**{"method": method, "r": 16, "dash_directions": 8, "target_modules": PROJECTIONS,
                                 **extra})


def switched(model: torch.nn.Module) -> None:
    """Dash after its switch (nonzero c): the rank-(r+s) path that costs the extra kernels."""
    lora_tsd.switch(model)
    with torch.no_grad():
        for _, layer in lora_tsd.adapted_layers(model):
            layer.dash_c.fill_(0.01)


def unfused(model: torch.nn.Module) -> None:
    """The plain (autograd-traced) dash update instead of :class:`lora_tsd.fused.FusedAdapterUpdate`, to compare."""
    for _, layer in lora_tsd.adapted_layers(model):
        layer.fused = False


def train_step(model: torch.nn.Module, batch: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def layer_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    h, f = args.sizes["hidden_size"], args.sizes["intermediate_size"]
    out = {}
    for shape in ((h, h), (f, h), (h, f)):
        steps = {}
        for method in ("lora", "dash", "dash_unfused"):
            layer = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=dtype))
            lora_tsd.attach(layer, adapter_config(method.removesuffix("_unfused"), prelaunch_steps=1,
                                                  target_modules=["0"]))
            if method != "lora":
                switched(layer)
            if method == "dash_unfused":
                unfused(layer)
            x = torch.randn(args.tokens, shape[1], device=device, dtype=dtype)
            g = torch.randn(args.tokens, shape[0], device=device, dtype=dtype)
            opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-5)

            def step(layer=layer, x=x, g=g, opt=opt) -> None:
                layer(x).backward(g)
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[method] = step
        t = median_seconds(steps, args.reps, device)
        out[f"{shape[0]}x{shape[1]}"] = round(t["dash"] / t["lora"], 4)
        out[f"{shape[0]}x{shape[1]} unfused"] = round(t["dash_unfused"] / t["lora"], 4)
    return out


def model_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    batch = torch.randint(3, args.sizes["vocab_size"], (args.batch, args.seq), device=device)
    steps = {}
    for compiled in (False, True):
        for method in ("lora", "dash") + (() if compiled else ("dash_unfused",)):
            model = random_llama({**args.sizes, "num_hidden_layers": args.layers}, seed=0, device=device).to(dtype)
            model.train()
            lora_tsd.attach(model, adapter_config(method.removesuffix("_unfused"), prelaunch_steps=1))
            if method != "lora":
                switched(model)
            if method == "dash_unfused":
                unfused(model)
            if compiled:
                model.compile()
            steps[f"{method}{'_compiled' if compiled else ''}"] = train_step(model, batch)
    t = median_seconds(steps, args.reps, device)
    return {"dash/lora": round(t["dash"] / t["lora"], 4), "dash_unfused/lora": round(t["dash_unfused"] / t["lora"], 4),
            "dash_compiled/lora_compiled": round(t["dash_compiled"] / t["lora_compiled"], 4),
            "dash_compiled/dash": round(t["dash_compiled"] / t["dash"], 4),
            "lora_step_ms": round(1000 * t["lora"], 2), "dash_step_ms": round(1000 * t["dash"], 2)}


def peak_of(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device)


def probe_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, float | None]:
    sizes = {**args.sizes, "num_hidden_layers": args.layers}
    batches = [torch.randint(3, sizes["vocab_size"], (args.batch, args.seq), device=device) for _ in range(2)]

    def loss_fn(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(ids, labels=ids).loss

    peaks: dict[str, int | None] = {}
    for name in ("lora_step", "probe_all", "probe_grouped"):
        model = random_llama(sizes, seed=0, device=device).to(dtype)
        model.train()
        if name == "lora_step":
            lora_tsd.attach(model, adapter_config("lora"))
            step = train_step(model, batches[0])
            step()  # optimizer state allocated
            peaks[name] = peak_of(step, device)
        else:
            lora_tsd.attach(model, adapter_config("tsd", init_estimator="gradient"))
            n = len(lora_tsd.adapted_layers(model))
            size = None if name == "probe_all" else max(1, n // 8)
            peaks[name] = peak_of(lambda m=model, s=size: lora_tsd.gradient_probe(m, batches, loss_fn, None, s),
                                  device)
        del model
    base = peaks["lora_step"]
    return {**{f"{k}_gib": None if v is None else round(v / 2**30, 3) for k, v in peaks.items()},
            **{f"{k}/lora_step": None if v is None or not base else round(v / base, 3)
               for k, v in peaks.items() if k != "lora_step"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 20; 2 with --tiny)")
    parser.add_argument("--sections", default="layer,model,probe", help="comma-separated subset")
    args = parser.parse_args(argv)
    args.sizes = TINY if args.tiny else LLAMA_7B
    args.batch, args.seq = (2, 16) if args.tiny else (4, 1024)
    args.tokens, args.layers = args.batch * args.seq, (2 if args.tiny else 4)
    args.reps = args.reps or (2 if args.tiny else 20)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    started = time.time()
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "sizes": args.sizes, "tokens": args.tokens}
    sections = {"layer": layer_section, "model": model_section, "probe": probe_section}
    for name in args.sections.split(","):
        report[name] = sections[name](args, device, dtype)
    report["wall_s"] = round(time.time() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_scale_check.json").write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
