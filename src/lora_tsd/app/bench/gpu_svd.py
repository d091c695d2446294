"""The GPU bench's SVD sections (``bench/gpu_bench.py``): the thin SVD of each shape with every cuSOLVER driver
(time, accuracy), which driver ranks task-specific directions like an fp64 SVD, and the switch of one LLaMA-7B
decoder layer's targets (cold vs Σ(SVD + projections), torch's default driver, warm with the SVD cache, peak extra
memory).

The cuSOLVER comparisons run on CUDA only, or on a CPU after :func:`use_stand_in_drivers` (LAPACK standing in for
every driver: a smoke test of those code paths without a GPU). Imports only torch and the core :mod:`lora_tsd`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from lora_tsd import directions
from lora_tsd.directions import ThinSVD, change_rates, select_directions, thin_svd
from lora_tsd.inject import adapted_layers
from lora_tsd.switching import switch

from .gpu_steps import GpuResults, weight_dtype
from .machine import available
from .measure import Clock, MiB, cuda_peak_extra, interleaved
from .switch_cases import count_equal, dash_indices, svd_and_projections, switch_floor
from .workloads import PrelaunchSnapshot, attach_adapters, free_memory

_stand_in_drivers = False  # set by use_stand_in_drivers()


def use_stand_in_drivers() -> None:
    """Let ``torch.linalg.svd(..., driver=...)`` run on CPU tensors (LAPACK for every driver), for this process.

    A smoke test of the CUDA-only code paths, the library's checked ``gesvda`` included, without a GPU.
    """
    global _stand_in_drivers
    _stand_in_drivers = True
    real = torch.linalg.svd

    def svd(a: torch.Tensor, full_matrices: bool = True, *, driver: str | None = None, out: Any = None) -> Any:
        return real(a, full_matrices=full_matrices) if a.device.type == "cpu" else real(
            a, full_matrices=full_matrices, driver=driver)

    torch.linalg.svd = svd


def cusolver_drivers_run(device: torch.device) -> bool:
    """Whether the cuSOLVER driver comparisons run: on CUDA, or on a CPU after :func:`use_stand_in_drivers`."""
    return device.type == "cuda" or _stand_in_drivers


def library_svd(w: torch.Tensor) -> tuple[ThinSVD, list[str]]:
    """The library's CUDA SVD (``directions.checked_fast_svd``, what ``thin_svd`` calls), with the drivers it used."""
    used: list[str] = []

    def spy(a: torch.Tensor, full_matrices: bool = False, driver: str | None = None) -> Any:
        used.append(str(driver))
        return torch.linalg.svd(a, full_matrices=full_matrices, driver=driver)

    return directions.checked_fast_svd(w, svd_fn=spy), used


def svd_accuracy_section(results: GpuResults, args: argparse.Namespace, device: torch.device,
                         clock: Clock) -> None:
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
        drivers: list[str | None] = [None, "gesvdj", "gesvda", "gesvd"] if cusolver_drivers_run(device) else [None]
        variants: list[str | None] = [*drivers, "library"] if cusolver_drivers_run(device) else drivers
        for drv in variants:
            try:
                t0 = time.perf_counter()
                if drv == "library":
                    svd, used = library_svd(w)
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
                results.rows.append(row)
                print(f"  σ→{smallest:g} {name:<8} ({'+'.join(used)}) {dt:6.3f} s  top-8 = ref top-8: {same8}/8, "
                      f"in ref top-16: {in16}/8, max rel σ err {s_err:.1e}, max |UᵀU − I| {orth:.1e}, "
                      f"svd_error {err:.1e} (tol {row['tolerance']:.1e})", flush=True)
            except RuntimeError as err:
                results.errors.append(f"svd accuracy {drv}: {err}")
        del w, B, A, ref_svd
        free_memory(device)


def svd_section(results: GpuResults, args: argparse.Namespace, device: torch.device, clock: Clock) -> None:
    """Thin SVD per shape with each cuSOLVER driver (CUDA) — what the switch's cost is made of."""
    gen = torch.Generator().manual_seed(2)
    drivers: list[str | None] = [None, "gesvdj", "gesvda", "gesvd"] if cusolver_drivers_run(device) else [None]
    if cusolver_drivers_run(device):
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
                results.rows.append({"section": "svd", "shape": f"{n}x{m}", "driver": drv or "default",
                                     "median_s": statistics.median(t), "rel_err": err, "orth_err": orth})
                print(f"  svd {n}x{m} driver={drv or 'default':<8} {statistics.median(t):8.3f} s  "
                      f"rel. reconstruction error {err:.1e}, max |UᵀU − I| {orth:.1e}", flush=True)
            except RuntimeError as err:  # a driver may not exist for this build / shape
                results.errors.append(f"svd {n}x{m} {drv}: {err}")
                print(f"  svd {n}x{m} driver={drv}: failed ({str(err)[:80]})", flush=True)
        del w
        free_memory(device)


def switch_section(results: GpuResults, args: argparse.Namespace, device: torch.device, clock: Clock,
                   mode: str) -> None:
    """The switch on one LLaMA-7B decoder layer's targets (q, k, v 4096²; up 11008×4096; down 4096×11008)."""
    wdtype = weight_dtype(mode)
    h, inter, _, _ = args.llama
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    model = nn.ModuleDict({k: nn.Linear(i, o, bias=False) for k, (o, i) in shapes.items()}).to(device, wdtype)
    attach_adapters(model, "dash", list(shapes), args.rank, args.dash, torch.Generator().manual_seed(4),
                    dash_phase=None)
    prelaunch = PrelaunchSnapshot(model)  # every repetition switches the same pre-launch state
    layers = adapted_layers(model)

    def cold() -> None:
        prelaunch.restore()
        switch(model)

    if cusolver_drivers_run(device):  # the same switch with torch's default driver (gesvdj), as before checked gesvda
        cold()
        ref_idx = dash_indices(model)

        def default_driver(w: torch.Tensor) -> ThinSVD:
            return ThinSVD(*torch.linalg.svd(w, full_matrices=False))

        with mock.patch.object(directions, "checked_fast_svd", default_driver):
            t_default = interleaved({"default": cold}, max(2, args.switch_reps), 1, clock=clock)["default"]
        agree = count_equal(ref_idx, dash_indices(model))
        results.rows.append({"section": "switch with torch's default driver gesvdj (1 LLaMA-7B layer)",
                             "cold_s": statistics.median(t_default), "layers_same_selection": agree,
                             "layers": len(layers)})
        print(f"  switch with torch's default driver: {statistics.median(t_default):.3f} s, same dash directions "
              f"as the library's default in {agree}/{len(layers)} layers", flush=True)
    times = interleaved({"cold": cold, "floor": lambda: switch_floor(model)}, args.switch_reps, 0, clock=clock)
    c, f = statistics.median(times["cold"]), statistics.median(times["floor"])
    extra = cuda_peak_extra(device, cold)
    big = max((la for _, la in layers), key=lambda la: la.out_features * la.in_features)
    one_extra = cuda_peak_extra(device, lambda: svd_and_projections(big))
    label = "fp32" if wdtype == torch.float32 else "bf16"
    row = {"section": f"switch ({label} weights, 1 LLaMA-7B layer, {len(layers)} matrices)", "cold_s": c,
           "floor_s": f, "cold/floor": c / f, "cold_s_x32_layers": 32 * c,
           "peak_extra_MiB": None if extra is None else extra / MiB,
           "one_layer_peak_extra_MiB": None if one_extra is None else one_extra / MiB}
    if available("safetensors"):
        with tempfile.TemporaryDirectory() as tmp:
            def cached(tmp: str = tmp) -> None:
                prelaunch.restore()
                switch(model, svd_cache=Path(tmp))

            cached()  # fills the cache
            warm = interleaved({"warm": cached}, max(2, args.switch_reps), 0, clock=clock)["warm"]
        row["warm_s"] = statistics.median(warm)
        row["warm_s_x32_layers"] = 32 * row["warm_s"]
    else:
        row["warm_s"] = None
        results.errors.append("safetensors missing: warm switch (SVD cache) not measured")
    results.rows.append(row)
    print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    free_memory(device)
