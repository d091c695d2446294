"""Issue 5, targets 1–3 on one NVIDIA GPU (H100/H200) at LLaMA-7B shapes in bf16, random weights, < 5 minutes.

    PYTHONPATH=src python bench/gpu_bench.py                 # on the GPU machine
    PYTHONPATH=src python bench/gpu_bench.py --device cpu --tiny   # a seconds-long smoke test anywhere

Precision modes (both run by default, ``--mode`` picks one):

- ``autocast``: fp32 weights and adapters, the step under ``torch.autocast("cuda", dtype=torch.bfloat16)``
  (every matmul in bf16, as HF Trainer's ``bf16=True``);
- ``bf16``: frozen base weights stored in bf16, adapters in fp32 (our default and PEFT's
  ``autocast_adapter_dtype``), no autocast.

Measures: (1) training step (forward + backward of a given output gradient + AdamW) of a dash-phase layer vs a
plain-LoRA layer of the same rank, with the authors' dense-dash pattern, at 4096×4096 and 11008×4096;
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
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_tsd import adapted_layers, attach, directions  # the core needs only torch, safetensors, numpy
from lora_tsd import switching as schedule
from lora_tsd.app.bench.forward_impls import IMPLS, with_impl
from lora_tsd.app.bench.workloads import DenseDashLinear, OneLayer, set_dash_directions
from lora_tsd.config import TSDConfig
from lora_tsd.directions import ThinSVD, change_rates, projections, select_directions, thin_svd
from lora_tsd.layer import PHASE_PRELAUNCH

MiB = 1024 * 1024
RESULTS: dict[str, Any] = {"rows": [], "errors": [], "info": {}}


FAKE_DRIVERS = False  # --fake-drivers: on a CPU, run the cuSOLVER-only paths with LAPACK standing in


def _cusolver(device: torch.device) -> bool:
    """Whether the cuSOLVER driver comparisons run: on CUDA, or on a CPU under ``--fake-drivers``."""
    return device.type == "cuda" or FAKE_DRIVERS


def _fake_cusolver_drivers() -> None:
    """Let ``torch.linalg.svd(..., driver=...)`` run on CPU tensors (LAPACK for every driver): a smoke test of
    the CUDA-only code paths of this script, including the library's checked ``gesvda``, without a GPU."""
    global FAKE_DRIVERS
    FAKE_DRIVERS = True
    real = torch.linalg.svd

    def svd(a: torch.Tensor, full_matrices: bool = True, *, driver: str | None = None, out: Any = None) -> Any:
        return real(a, full_matrices=full_matrices) if a.device.type == "cpu" else real(
            a, full_matrices=full_matrices, driver=driver)

    torch.linalg.svd = svd


def _available(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- timing


class Clock:
    """Times a callable on ``device``: CUDA events (or perf_counter on CPU); synchronizes at the end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], None]) -> Callable[[], float]:
        """Run ``fn`` now; the returned function gives its duration in seconds (after a sync)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return lambda: start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return lambda: dt


def interleaved(clock: Clock, fns: dict[str, Callable[[], None]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Warm-up rounds, then ``reps`` rounds of A, B, C, ... (rotated each round); seconds per call."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    clock.sync()
    pending: dict[str, list[Callable[[], float]]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            pending[n].append(clock.time(fns[n]))
    clock.sync()
    return {n: [f() for f in v] for n, v in pending.items()}


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def peak_extra(device: torch.device, fn: Callable[[], None]) -> int | None:
    """``max_memory_allocated`` growth while ``fn`` runs (bytes); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ------------------------------------------------------------------------------------------- cases


def _rand_adapters(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "dash_c" in name or name.endswith(".c") or name == "c"):
                p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.device, p.dtype))


def _orthonormal(n: int, s: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, s, generator=gen))
    return q.contiguous().to(device)


def _fake_switch(model: nn.Module, s: int, gen: torch.Generator) -> None:
    """Dash phase with random orthonormal directions (the real switch is timed in target 3)."""
    for _, layer in adapted_layers(model):
        n, m = layer.out_features, layer.in_features
        dev = layer.lora_A.device
        set_dash_directions(layer, _orthonormal(n, s, gen, dev), _orthonormal(m, s, gen, dev))


def _ours(model: nn.Module, method: str, targets: list[str], r: int, s: int, gen: torch.Generator) -> nn.Module:
    cfg = TSDConfig(method=method, r=r, dash_directions=s, target_modules=targets,
                    prelaunch_steps=1 if method == "dash" else None)
    attach(model, cfg)
    if method == "dash":
        _fake_switch(model, s, gen)
    _rand_adapters(model, gen)
    return model


def _peft(model: nn.Module, targets: list[str], r: int, gen: torch.Generator) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    _rand_adapters(model, gen)
    return model


def _dense(n: int, m: int, r: int, s: int, dtype: torch.dtype, device: torch.device,
           gen: torch.Generator) -> nn.Module:
    base = nn.Linear(m, n, bias=False).to(device, dtype).requires_grad_(False)
    model = DenseDashLinear(base, r, s, 2.0 * r, gen).to(device)
    model.base.to(dtype)
    _rand_adapters(model, gen)
    return model


class Step:
    """One training step of ``model``: ``forward(inputs)`` → backward → AdamW (→ lora_tsd.step)."""

    def __init__(self, model: nn.Module, run: Callable[[], torch.Tensor], grad: torch.Tensor | None,
                 autocast: bool, device: torch.device, tsd: bool, inputs: list[Any]) -> None:
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.run, self.grad, self.autocast, self.device, self.tsd = run, grad, autocast, device, tsd
        self.inputs = inputs

    def __call__(self) -> None:
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            out = self.run()
        if self.grad is None:
            out.backward()
        else:
            out.backward(self.grad)
        self.opt.step()
        if self.tsd:
            schedule.step(self.model, self.opt)
        self.opt.zero_grad(set_to_none=True)

    def static(self) -> int:
        ts = list(self.model.parameters()) + list(self.model.buffers())
        for st in self.opt.state.values():
            ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
        for x in self.inputs:
            ts += list(x.values()) if isinstance(x, dict) else [x]
        return tensor_bytes(ts)


def compare(title: str, steps: dict[str, Step], clock: Clock, args: argparse.Namespace,
            pairs: list[tuple[str, str, str, str]]) -> None:
    """Time ``steps`` interleaved, measure their peak memory, record the ratio rows named in ``pairs``."""
    times = interleaved(clock, dict(steps), args.reps, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem: dict[str, int | None] = {}
    for k, s in steps.items():
        extra = peak_extra(s.device, s)
        mem[k] = None if extra is None else s.static() + extra
    for k in steps:
        RESULTS["rows"].append({"section": title, "variant": k, "median_ms": med[k] * 1e3,
                                "min_ms": min(times[k]) * 1e3, "peak_MiB": None if mem[k] is None else mem[k] / MiB})
    for key, a, b, target in pairs:
        if a in med and b in med:
            row = {"section": title, "ratio": key, "time": med[a] / med[b], "target": target}
            if mem[a] and mem[b]:
                row["memory"] = mem[a] / mem[b]
            RESULTS["rows"].append(row)
    _print_section(title)


def _print_section(title: str) -> None:
    for row in RESULTS["rows"]:
        if row["section"] != title:
            continue
        if "variant" in row:
            peak = "" if row["peak_MiB"] is None else f"{row['peak_MiB']:.0f} MiB"
            print(f"  {title:<38} {row['variant']:<16} {row['median_ms']:9.3f} ms (min {row['min_ms']:.3f}) {peak}")
        else:
            mem = f", memory {row['memory']:.3f}" if "memory" in row else ""
            print(f"  {title:<38} {row['ratio']:<28} time {row['time']:.3f}{mem}  (target {row['target']})")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------- sections


def layer_section(args: argparse.Namespace, device: torch.device, clock: Clock, mode: str, peft_ok: bool) -> None:
    autocast = mode == "autocast"
    wdtype = torch.float32 if autocast else torch.bfloat16
    for n, m in args.shapes:
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(n + m + tokens)
            x = torch.randn(tokens, m, generator=gen).to(device, wdtype)
            g = torch.randn(tokens, n, generator=gen).to(device, wdtype)

            def one(method: str, n: int = n, m: int = m, gen: torch.Generator = gen) -> nn.Module:
                model = OneLayer(n, m).to(device, wdtype)
                return _ours(model, method, ["proj"], args.rank, args.dash, gen)

            def mk(model: nn.Module, tsd: bool, x: torch.Tensor = x, g: torch.Tensor = g) -> Step:
                return Step(model, lambda: model(x), g, autocast, device, tsd, [x, g])

            steps = {"lora": mk(one("lora"), True), "dash": mk(one("dash"), True),
                     "dense-dash": mk(_dense(n, m, args.rank, args.dash, wdtype, device, gen), False)}
            if peft_ok:
                steps["peft-lora"] = mk(_peft(OneLayer(n, m).to(device, wdtype), ["proj"], args.rank, gen), False)
            compare(f"{mode} layer {n}x{m} {tokens}tok", steps, clock, args,
                    [("T1 dash/lora", "dash", "lora", "<=1.03 time, <=1.02 mem"),
                     ("T1 dense-dash/lora", "dense-dash", "lora", ">>1 expected"),
                     ("T2 ours/peft lora", "lora", "peft-lora", "<=1.02")])
            del steps
            _free(device)


def impl_section(args: argparse.Namespace, device: torch.device, clock: Clock, mode: str) -> None:
    """Candidate adapter forwards (lora_tsd.bench.IMPLS: current, addmm, in-place addmm), lora and dash."""
    autocast = mode == "autocast"
    wdtype = torch.float32 if autocast else torch.bfloat16
    for n, m in args.shapes:
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(n + m + tokens)
            x = torch.randn(tokens, m, generator=gen).to(device, wdtype)
            g = torch.randn(tokens, n, generator=gen).to(device, wdtype)
            steps: dict[str, Step] = {}
            for method in ("lora", "dash"):
                for impl in IMPLS:
                    gen.manual_seed(n + m)
                    torch.manual_seed(n + m)
                    model = with_impl(_ours(OneLayer(n, m).to(device, wdtype), method, ["proj"], args.rank,
                                            args.dash, gen), impl)
                    steps[f"{method}/{impl}"] = Step(model, lambda model=model, x=x: model(x), g, autocast,
                                                     device, True, [x, g])
            pairs = [(f"{meth}: {impl}/current", f"{meth}/{impl}", f"{meth}/current", "report")
                     for meth in ("lora", "dash") for impl in IMPLS if impl != "current"]
            pairs += [(f"dash/lora ({impl})", f"dash/{impl}", f"lora/{impl}", "<=1.03") for impl in IMPLS]
            compare(f"{mode} impl {n}x{m} {tokens}tok", steps, clock, args, pairs)
            del steps
            _free(device)


def _library_svd(w: torch.Tensor) -> tuple[ThinSVD, list[str]]:
    """The library's CUDA SVD (``directions.checked_fast_svd``, what ``thin_svd`` calls), with the drivers it used."""
    used: list[str] = []

    def spy(a: torch.Tensor, full_matrices: bool = False, driver: str | None = None) -> Any:
        used.append(str(driver))
        return torch.linalg.svd(a, full_matrices=full_matrices, driver=driver)

    return directions.checked_fast_svd(w, svd_fn=spy), used


def svd_accuracy_section(args: argparse.Namespace, device: torch.device, clock: Clock) -> None:
    """Which SVD ranks TSDs like an fp64 SVD: every cuSOLVER driver and the library's checked ``gesvda``, on
    weights with a decaying spectrum (σ 1 → 1e-3) and an ill-conditioned one (σ 1 → 1e-7, as near-rank-deficient
    pretrained matrices are), where the check should send the library to ``gesvd``."""
    n, m = args.shapes[0]
    k = min(n, m)
    for smallest in (1e-3, 1e-7):
        torch.manual_seed(7)
        q1 = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, device=device))[0]
        q2 = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, device=device))[0]
        sigma = torch.logspace(0, float(torch.tensor(smallest).log10()), k, dtype=torch.float64, device=device)
        w = ((q1 * sigma) @ q2.T).float()
        del q1, q2
        B = torch.randn(n, args.rank, device=device) * 1e-2
        A = torch.randn(args.rank, m, device=device) * 1e-2
        ref_svd = ThinSVD(*(t.float() for t in torch.linalg.svd(w.double(), full_matrices=False)))
        ref = change_rates(w, (B, A), svd=ref_svd)
        ref_top = select_directions(ref, 16)
        drivers: list[str | None] = [None, "gesvdj", "gesvda", "gesvd"] if _cusolver(device) else [None]
        variants: list[str | None] = [*drivers, "library"] if _cusolver(device) else drivers
        for drv in variants:
            try:
                t0 = time.perf_counter()
                if drv == "library":
                    svd, used = _library_svd(w)
                else:
                    svd, used = ThinSVD(*torch.linalg.svd(w, full_matrices=False, driver=drv)), [str(drv)]
                clock.sync()
                dt = time.perf_counter() - t0
                rates = change_rates(w, (B, A), svd=svd)
                top = select_directions(rates, 8)
                same8 = len(set(top.tolist()) & set(ref_top[:8].tolist()))
                in16 = len(set(top.tolist()) & set(ref_top.tolist()))
                s_err = float(((svd.S - ref_svd.S).abs() / ref_svd.S).max())
                orth = float((svd.U.T @ svd.U - torch.eye(k, device=device)).abs().max())
                err = directions.svd_error(w, svd)
                name = drv or "default"
                row = {"section": f"svd accuracy ({n}x{m} fp32, σ 1→{smallest:g}, vs fp64 SVD)", "driver": name,
                       "drivers_called": "+".join(used), "seconds": dt, "top8_same": same8,
                       "top8_in_ref_top16": in16, "max_rel_sigma_err": s_err, "max_UtU_minus_I": orth,
                       "svd_error": err, "tolerance": directions.svd_tolerance((n, m))}
                RESULTS["rows"].append(row)
                print(f"  σ→{smallest:g} {name:<8} ({'+'.join(used)}) {dt:6.3f} s  top-8 = ref top-8: {same8}/8, "
                      f"in ref top-16: {in16}/8, max rel σ err {s_err:.1e}, max |UᵀU − I| {orth:.1e}, "
                      f"svd_error {err:.1e} (tol {row['tolerance']:.1e})", flush=True)
            except RuntimeError as err:
                RESULTS["errors"].append(f"svd accuracy {drv}: {err}")
        del w, B, A, ref_svd
        _free(device)


def model_section(args: argparse.Namespace, device: torch.device, clock: Clock, mode: str, peft_ok: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    autocast = mode == "autocast"
    wdtype = torch.float32 if autocast else torch.bfloat16
    h, inter, heads, vocab = args.llama
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=args.llama_layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    gen = torch.Generator().manual_seed(1)
    b, t = args.model_batch
    ids = torch.randint(3, vocab, (b, t), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}

    def build(kind: str) -> Step:
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device: seconds instead of a minute on the host
            model = LlamaForCausalLM(cfg)
        model.to(wdtype)
        model.train()
        if kind == "peft-lora":
            model = _peft(model, targets, args.rank, gen)
        else:
            model = _ours(model, kind, targets, args.rank, args.dash, gen)
        return Step(model, lambda: model(**batch).loss, None, autocast, device, kind != "peft-lora", [batch])

    kinds = ["lora", "dash"] + (["peft-lora"] if peft_ok else [])
    steps = {k: build(k) for k in kinds}
    if args.model_reps:
        args = argparse.Namespace(**{**vars(args), "reps": args.model_reps})
    compare(f"{mode} LLaMA-7B-shaped {args.llama_layers}-layer model {b}x{t}tok", steps, clock, args,
            [("T1 dash/lora (model)", "dash", "lora", "<=1.05"),
             ("T2 ours/peft lora (model)", "lora", "peft-lora", "<=1.02")])
    del steps
    _free(device)


def svd_section(args: argparse.Namespace, device: torch.device, clock: Clock) -> None:
    """Thin SVD per shape with each cuSOLVER driver (CUDA) — what the switch's cost is made of."""
    gen = torch.Generator().manual_seed(2)
    drivers: list[str | None] = [None, "gesvdj", "gesvda", "gesvd"] if _cusolver(device) else [None]
    if _cusolver(device):
        drivers.append("library")  # thin_svd: gesvda when it passes svd_error's check, else gesvd
    torch.linalg.svd(torch.randn(64, 64, device=device), full_matrices=False)  # cuSOLVER handle set-up
    wide = (args.shapes[-1][1], args.shapes[-1][0])  # down_proj's shape: gesvda works on the transpose
    for n, m in [*args.shapes, wide]:
        w = torch.randn(n, m, generator=gen).to(device)
        for drv in drivers:
            try:
                box: dict[str, Any] = {}

                def run(drv: str | None = drv, w: torch.Tensor = w, box: dict[str, Any] = box) -> None:
                    if drv == "library":
                        box["svd"] = thin_svd(w)
                    else:
                        box["svd"] = torch.linalg.svd(w, full_matrices=False, driver=drv)

                t: list[float] = []
                for _ in range(args.svd_reps):
                    t.append(clock.time(run)())
                    clock.sync()
                    if t[-1] > 10.0:  # slow driver: one reading is enough
                        break
                U, S, Vh = box.pop("svd")
                err = float(torch.linalg.matrix_norm(U * S @ Vh - w) / torch.linalg.matrix_norm(w))
                orth = float((U.T @ U - torch.eye(U.shape[1], device=device)).abs().max())
                del U, S, Vh
                RESULTS["rows"].append({"section": "svd", "shape": f"{n}x{m}", "driver": drv or "default",
                                        "median_s": statistics.median(t), "rel_err": err, "orth_err": orth})
                print(f"  svd {n}x{m} driver={drv or 'default':<8} {statistics.median(t):8.3f} s  "
                      f"rel. reconstruction error {err:.1e}, max |UᵀU − I| {orth:.1e}", flush=True)
            except RuntimeError as err:  # a driver may not exist for this build / shape
                RESULTS["errors"].append(f"svd {n}x{m} {drv}: {err}")
                print(f"  svd {n}x{m} driver={drv}: failed ({str(err)[:80]})", flush=True)
        del w
        _free(device)


def switch_section(args: argparse.Namespace, device: torch.device, clock: Clock, mode: str) -> None:
    """The switch on one LLaMA-7B decoder layer's targets (q, k, v 4096²; up 11008×4096; down 4096×11008)."""
    wdtype = torch.float32 if mode == "autocast" else torch.bfloat16
    h, inter, _, _ = args.llama
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    model = nn.ModuleDict({k: nn.Linear(i, o, bias=False) for k, (o, i) in shapes.items()}).to(device, wdtype)
    attach(model, TSDConfig(method="dash", r=args.rank, dash_directions=args.dash, target_modules=list(shapes),
                            prelaunch_steps=1))
    _rand_adapters(model, torch.Generator().manual_seed(4))
    layers = adapted_layers(model)

    def reset(layers: list = layers) -> None:
        for _, layer in layers:
            layer.phase.fill_(PHASE_PRELAUNCH)

    def cold(model: nn.Module = model) -> None:
        reset()
        schedule.switch(model)

    def floor(layers: list = layers) -> None:
        for _, layer in layers:
            svd = thin_svd(layer.weight_view())
            projections(svd, (layer.lora_B.detach() * layer.scaling, layer.lora_A.detach()))

    if _cusolver(device):  # the same switch with torch's default driver (gesvdj), as before checked gesvda
        from unittest import mock as _mock

        cold()
        ref_idx = [la.dash_idx.clone() for _, la in layers]

        def default_driver(w: torch.Tensor) -> ThinSVD:
            return ThinSVD(*torch.linalg.svd(w, full_matrices=False))

        with _mock.patch.object(directions, "checked_fast_svd", default_driver):
            t_default = interleaved(clock, {"default": cold}, max(2, args.switch_reps), 1)["default"]
        agree = sum(int(torch.equal(a, la.dash_idx)) for a, (_, la) in zip(ref_idx, layers, strict=True))
        RESULTS["rows"].append({"section": "switch with torch's default driver gesvdj (1 LLaMA-7B layer)",
                                "cold_s": statistics.median(t_default), "layers_same_selection": agree,
                                "layers": len(layers)})
        print(f"  switch with torch's default driver: {statistics.median(t_default):.3f} s, same dash directions "
              f"as the library's default in {agree}/{len(layers)} layers", flush=True)
    times = interleaved(clock, {"cold": cold, "floor": floor}, args.switch_reps, 0)
    c, f = statistics.median(times["cold"]), statistics.median(times["floor"])
    extra = peak_extra(device, cold)
    big = max((la for _, la in layers), key=lambda la: la.out_features * la.in_features)

    def one() -> None:
        svd = thin_svd(big.weight_view())
        projections(svd, (big.lora_B.detach() * big.scaling, big.lora_A.detach()))

    one_extra = peak_extra(device, one)
    label = "fp32" if wdtype == torch.float32 else "bf16"
    row = {"section": f"switch ({label} weights, 1 LLaMA-7B layer, {len(layers)} matrices)", "cold_s": c,
           "floor_s": f, "cold/floor": c / f, "cold_s_x32_layers": 32 * c,
           "peak_extra_MiB": None if extra is None else extra / MiB,
           "one_layer_peak_extra_MiB": None if one_extra is None else one_extra / MiB}
    if _available("safetensors"):
        with tempfile.TemporaryDirectory() as tmp:
            def cached(tmp: str = tmp) -> None:
                reset()
                schedule.switch(model, svd_cache=Path(tmp))

            cached()  # fills the cache
            warm = interleaved(clock, {"warm": cached}, max(2, args.switch_reps), 0)["warm"]
        row["warm_s"] = statistics.median(warm)
        row["warm_s_x32_layers"] = 32 * row["warm_s"]
    else:
        row["warm_s"] = None
        RESULTS["errors"].append("safetensors missing: warm switch (SVD cache) not measured")
    RESULTS["rows"].append(row)
    print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    _free(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
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
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.fake_drivers:
        if device.type != "cpu":
            print("--fake-drivers is for --device cpu", file=sys.stderr)
            return 2
        _fake_cusolver_drivers()
    args.shapes = [(4096, 4096), (11008, 4096)]
    args.llama = (4096, 11008, 32, 32000)  # hidden, intermediate, heads, vocab
    if args.tiny:
        args.shapes, args.llama = [(64, 64), (172, 64)], (64, 172, 4, 128)
        args.tokens, args.reps, args.warmup, args.model_batch = [32], 3, 1, [2, 16]
        args.svd_reps, args.switch_reps = 1, 1
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    peft_ok, hf_ok = _available("peft"), _available("transformers")
    info = {"torch": torch.__version__, "device": str(device), "peft": peft_ok, "transformers": hf_ok,
            "tiny": args.tiny}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, memory_GiB=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    cuda=torch.version.cuda)
    for name in ("peft", "transformers", "safetensors"):
        with contextlib.suppress(Exception):
            info[f"{name}_version"] = importlib.import_module(name).__version__
    RESULTS["info"] = info
    print("gpu_bench:", json.dumps(info), flush=True)
    modes = ["autocast", "bf16"] if args.mode == "both" else [args.mode]
    clock = Clock(device)
    t0 = time.perf_counter()
    out = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)

    # Order: the targets first (1–2 per layer, 3 the switch), then whole models, then SVD drivers.
    plan: list[tuple[str, Callable[[], None]]] = []
    for mode in modes:
        if "layers" in args.sections:
            plan.append((f"layers {mode}", lambda mode=mode: layer_section(args, device, clock, mode, peft_ok)))
    for mode in modes:
        if "impl" in args.sections:
            plan.append((f"impl {mode}", lambda mode=mode: impl_section(args, device, clock, mode)))
    if "svdacc" in args.sections:
        plan.append(("svd accuracy", lambda: svd_accuracy_section(args, device, clock)))
    if "switch" in args.sections:
        plan.append(("switch (fp32 weights)", lambda: switch_section(args, device, clock, "autocast")))
    for mode in modes:
        if "models" in args.sections:
            if hf_ok:
                plan.append((f"models {mode}", lambda mode=mode: model_section(args, device, clock, mode, peft_ok)))
            else:
                RESULTS["errors"].append("transformers missing: whole-model rows skipped")
    if "svd" in args.sections:
        plan.append(("svd drivers", lambda: svd_section(args, device, clock)))
    for name, fn in plan:
        if time.perf_counter() - t0 > args.budget_s:
            RESULTS["errors"].append(f"skipped {name}: time budget {args.budget_s:.0f} s spent")
            print(f"== skipped {name} (time budget)", flush=True)
            continue
        print(f"== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        try:
            fn()
        except Exception as err:  # keep going: one failing section must not lose the others
            RESULTS["errors"].append(f"{name}: {type(err).__name__}: {err}")
            traceback.print_exc()
            _free(device)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    RESULTS["wall_s"] = time.perf_counter() - t0
    print(f"\n== summary ({RESULTS['wall_s']:.0f} s)")
    for row in RESULTS["rows"]:
        if "ratio" in row:
            mem = f"{row['memory']:.3f}" if "memory" in row else "-"
            print(f"| {row['section']} | {row['ratio']} | {row['time']:.3f} | {mem} | {row['target']} |")
    for row in RESULTS["rows"]:
        if "cold_s" in row:
            print("| " + " | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                  + " |")
    for e in RESULTS["errors"]:
        print("note:", e)
    if out is not None:
        out.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
