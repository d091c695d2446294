"""Targets 3 and 5 (``--only switch``): the switch on SmolLM2's 210 target matrices, cold vs its floor (one thin SVD
per matrix plus the projections), default (layers in parallel) vs serial, warm with the SVD cache, its peak extra
memory, and split across 2 gloo processes sharing the cores."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lora_tsd.directions import projections, thin_svd
from lora_tsd.inject import adapted_layers
from lora_tsd.layer import TSDLinear
from lora_tsd.switching import switch, switch_workers

from .measure import Measure, MiB, interleaved, measure_memory
from .report import Report, log, mib
from .settings import Settings
from .workloads import PrelaunchSnapshot, attach_adapters

SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SmolLinears(nn.Module):
    """The 7 target linears of each SmolLM2 decoder layer, random weights (no attention, no embeddings)."""

    def __init__(self, layers: int, hidden: int, kv: int, inter: int) -> None:
        super().__init__()
        shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
                  "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                  "down_proj": (hidden, inter)}
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, (o, i) in shapes.items()})
            for _ in range(layers))


def switch_model(st: Settings) -> nn.Module:
    """SmolLM2's 210 target matrices (random weights, seed 3) with pre-launch dash adapters whose B A is random."""
    hidden, kv, inter = st.switch_dims
    torch.manual_seed(3)
    model = SmolLinears(st.switch_layers, hidden, kv, inter)
    return attach_adapters(model, "dash", SMOL_TARGETS, st.rank, st.dash, torch.Generator().manual_seed(3),
                           dash_phase=None)


def svd_and_projections(layer: TSDLinear) -> None:
    """What the switch cannot avoid for one layer: its fp32 thin SVD plus the low-rank projections of ``B A``."""
    svd = thin_svd(layer.weight_view())
    projections(svd, (layer.lora_B.detach() * layer.scaling, layer.lora_A.detach()))


def switch_floor(model: nn.Module) -> None:
    """:func:`svd_and_projections` of every adapted layer in turn (the cold switch's floor)."""
    for _, layer in adapted_layers(model):
        svd_and_projections(layer)


def dash_indices(model: nn.Module) -> list[torch.Tensor]:
    """Each layer's selected dash directions (indices in its descending-σ order)."""
    return [layer.dash_idx.clone() for _, layer in adapted_layers(model)]


def count_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    """In how many layers two selections agree exactly."""
    return sum(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def run_switch(report: Report, st: Settings, cache_root: Path | None) -> None:
    """Target 3 (cold switch vs its floor, warm switch with the SVD cache, peak extra memory) and target 5."""
    model = switch_model(st)
    prelaunch = PrelaunchSnapshot(model)  # every repetition switches the same pre-launch state
    layers = adapted_layers(model)
    hidden, kv, inter = st.switch_dims
    case = f"{len(layers)} matrices ({st.switch_layers} layers of {hidden}/{kv}/{inter})"
    workers = switch_workers(layers[0][1])
    selected: dict[str, list[torch.Tensor]] = {}

    # The restore is timed with the switch: ~17 ms for the 210 layers, well under 1 % of a cold switch.
    def pooled() -> None:
        prelaunch.restore()
        switch(model)
        selected["pooled"] = dash_indices(model)

    def serial() -> None:
        prelaunch.restore()
        switch(model, workers=1)
        selected["serial"] = dash_indices(model)

    log(f"switch: default ({workers} workers) vs serial vs Σ(SVD + projections), {len(layers)} matrices, "
        f"{st.switch_reps} reps")
    fns = {"switch (default)": pooled, "serial switch (workers=1)": serial,
           "Σ SVD + projections": lambda: switch_floor(model)}
    times = interleaved(fns, st.switch_reps, 0)
    m_pool, m_serial, m_floor = (Measure(name, times[name]) for name in fns)
    report.ratio("T3.1", m_pool, m_floor, case)
    report.value("T3.2", m_pool.median, case, note=f"{workers} layers at a time, 1 intra-op thread each")
    report.ratio("T3.6", m_pool, m_serial, case)
    report.rows["T3.6"].note = (f"{workers} workers; same dash directions as the serial switch in "
                                f"{count_equal(selected['pooled'], selected['serial'])}/{len(layers)} matrices (the "
                                "SVD's thread count changes its last bits; near-ties in the ranking can flip)")
    run_switch_distributed(report, st, case, m_pool, m_serial, selected["pooled"])

    # Peak extra memory: the serial switch (in this thread, where the profiler sees its allocations) vs one
    # layer's SVD + projections (the largest matrix). The default switch holds at most `workers` layers' SVDs
    # at once by construction (one per pool thread; finished layers keep only the selected directions).
    measure_memory(m_serial, serial, 0)
    big = max((layer for _, layer in layers), key=lambda la: la.out_features * la.in_features)
    m_one = Measure(f"one layer SVD + projections ({big.out_features}×{big.in_features})")
    measure_memory(m_one, lambda: svd_and_projections(big), 0)
    all_svds = sum(4 * min(la.out_features, la.in_features) * (la.out_features + la.in_features + 1)
                   for _, la in layers)
    report.value("T3.5", (m_serial.torch_extra or 0) / max(1, m_one.torch_extra or 0), case,
                 note=f"serial switch {mib(m_serial.torch_extra)} MiB vs one layer {mib(m_one.torch_extra)} MiB "
                      f"(torch); RSS {mib(m_serial.rss_extra)} vs {mib(m_one.rss_extra)} MiB; keeping all "
                      f"{len(layers)} SVDs would take {mib(all_svds)} MiB; the default switch keeps at most "
                      f"{workers} layers' SVDs (pool threads; not visible to the profiler)")

    # Warm: a second run of the same base model reads every SVD from the content-keyed cache.
    with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
        cache_dir = Path(tmp)
        prelaunch.restore()
        t0 = time.perf_counter()
        switch(model, svd_cache=cache_dir)
        fill = time.perf_counter() - t0
        warm = []
        for _ in range(max(3, st.switch_reps)):
            prelaunch.restore()
            t0 = time.perf_counter()
            switch(model, svd_cache=cache_dir)
            warm.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in (cache_dir / "svd").glob("*.safetensors"))
    m_warm = Measure("warm switch (SVD cache)", warm)
    report.value("T3.3", m_warm.median, case, note=f"cache {size / MiB:.0f} MiB on disk; min–max "
                                                   f"{min(warm):.3f}–{max(warm):.3f} s")
    report.value("T3.4", fill, case)
    report.add("switch", m_pool, m_serial, m_floor, m_one, m_warm, Measure("cache fill (cold + write)", [fill]))


def _distributed_switch_worker(rank: int, world: int, port: int, st: Settings, reps: int, out: str) -> None:
    """One rank of target 5: the same model on every rank, the switch's layers split across the ranks."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, st.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = switch_model(st)
        prelaunch = PrelaunchSnapshot(model)
        times = []
        for _ in range(reps):
            prelaunch.restore()
            dist.barrier()
            t0 = time.perf_counter()
            switch(model)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({f"{i}": t for i, t in enumerate(dash_indices(model))}, f"{out}/idx.safetensors")
            Path(out, "times.json").write_text(json.dumps(times), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def run_switch_distributed(report: Report, st: Settings, case: str, m_pool: Measure, m_serial: Measure,
                           pooled_idx: list[torch.Tensor]) -> None:
    """Target 5: the switch split across 2 gloo processes (the cores shared between them) vs 1 process."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log(f"switch: {world} processes (gloo), {max(1, st.threads // world)} thread(s) each, {st.switch_reps} reps")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_switch_worker, args=(world, port, st, st.switch_reps, tmp), nprocs=world, join=True)
        times = json.loads(Path(tmp, "times.json").read_text(encoding="utf-8"))
        idx = load_file(str(Path(tmp, "idx.safetensors")))
    m_dist = Measure(f"switch, {world} processes", times)
    same = count_equal([idx[str(i)] for i in range(len(pooled_idx))], pooled_idx)
    report.ratio("T5.1", m_dist, m_serial, case)
    report.rows["T5.1"].note = f"same dash directions as the 1-process default switch in {same}/{len(pooled_idx)}"
    report.ratio("T5.2", m_dist, m_pool, case)
    report.add("switch", m_dist)
