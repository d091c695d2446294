"""``lora-tsd analyze``: what the task-specific directions (TSDs) of a fine-tune look like, and how early LoRA
finds them (method.md §1).

``spectrum``: for each adapted layer of one or two fine-tunes (a ``lora-tsd train`` run folder, a lora-tsd
adapter, a PEFT adapter, or a fully fine-tuned model folder), the change rate ``|u_iᵀ ΔW v_i| / σ_i`` of the
change ``ΔW`` against the pretrained weight's SVD, for every singular direction i:

- the spectrum (rate against i) and the sorted rates, per layer (PNG);
- where the top TSDs sit: their σ indices and relative positions ``i / (k − 1)`` (0 = largest σ);
- how many directions carry the change: ``n50`` / ``n90``, the fewest directions whose rates sum to 50 % /
  90 % of all rates, and the top-N share;
- ``core_energy_share``: the share of ``‖ΔW‖_F²`` that lies on the core directions ``u_i v_iᵀ`` at all;
- with two sources, the overlap ``|top-N(a) ∩ top-N(b)| / N`` per layer against chance ``N / k``.

``capture``: the paper's recall (reference top-4 inside predicted top-8) and accuracy (predicted top-8 inside
reference top-16) of LoRA's estimated TSDs, at steps along a LoRA run, against the TSDs of a full fine-tune
of the same model on the same data (the reference). The command runs the full fine-tune itself (a compact
loop on the workflow's runners, fine for MiniLM-sized models) or takes ``--reference`` (a fine-tuned model
folder); LoRA's snapshots come from its own compact LoRA loop or from the checkpoints of a run
(``--lora-run``: ``checkpoints/step-N/adapter`` plus the final ``adapter``).

All ranking math is :mod:`lora_tsd.directions` (``thin_svd``, ``change_rates``, ``select_directions``,
``tsd_recall``, ``tsd_accuracy``, ``overlap``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lora_tsd.atomic import atomic_write_json
from lora_tsd.directions import (
    DEFAULT_EPS,
    ThinSVD,
    overlap,
    projections,
    rates_from_projections,
    select_directions,
    thin_svd,
    tsd_accuracy,
    tsd_recall,
)
from lora_tsd.errors import ConfigError

Delta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# ------------------------------------------------------------------------------------------- per layer


def frobenius_sq(delta: Delta) -> float:
    """``‖ΔW‖_F²`` of a dense delta or of ``B A`` (as ``trace((BᵀB)(AAᵀ))``, never forming ``BA``)."""
    if isinstance(delta, tuple):
        B, A = (t.detach().to(torch.float64) for t in delta)
        return float(((B.T @ B) * (A @ A.T)).sum())
    return float(delta.detach().to(torch.float64).pow(2).sum())


def layer_spectrum(svd: ThinSVD, delta: Delta, top: int = 8, eps: float = DEFAULT_EPS,
                   reference_svd: ThinSVD | None = None) -> dict[str, Any]:
    """The change-rate spectrum of one layer and where its top-``top`` TSDs sit.

    Args:
        svd: :func:`~lora_tsd.directions.thin_svd` of the pretrained ``(out, in)`` weight.
        delta: the change, dense ``(out, in)`` or a pair ``(B (out, r), A (r, in))``.
        top: how many top TSDs to report.
        reference_svd: a float64 SVD of the same weight (:func:`float64_svd`); when given, the result also
            holds ``fp64_top_agreement``, the share of the top-``top`` TSDs that the fp32 SVD (the method's)
            and the float64 one agree on: near-null directions below fp32's resolution would show up here.
    """
    p = projections(svd, delta)
    rates = rates_from_projections(p, svd.S, eps)
    k = int(rates.numel())
    if not 0 < top <= k:
        raise ConfigError(f"--top {top} must be between 1 and the layer's {k} directions")
    order = select_directions(rates, k, "tsd")
    idx = order[:top].tolist()
    sorted_rates = rates[order].double()
    total = float(sorted_rates.sum())
    cumulative = (sorted_rates.cumsum(0) / total).tolist() if total > 0 else [1.0] * k
    n50 = next(i + 1 for i, c in enumerate(cumulative) if c >= 0.5 - 1e-12)
    n90 = next(i + 1 for i, c in enumerate(cumulative) if c >= 0.9 - 1e-12)
    energy = frobenius_sq(delta)
    median = float(sorted_rates[k // 2])
    extra = {}
    if reference_svd is not None:
        ref_rates = rates_from_projections(projections(reference_svd, delta), reference_svd.S, eps)
        extra["fp64_top_agreement"] = overlap(idx, select_directions(ref_rates, top, "tsd").tolist())
    return extra | {
        "k": k,
        "top_indices": idx,
        "top_rates": [float(rates[i]) for i in idx],
        "top_sigma": [float(svd.S[i]) for i in idx],
        "top_positions": [i / max(1, k - 1) for i in idx],
        "n50": n50,
        "n90": n90,
        "top_share": float(sorted_rates[:top].sum()) / total if total > 0 else math.nan,
        "top1_over_median": float(sorted_rates[0]) / median if median > 0 else math.inf,
        "core_energy_share": float(p.double().pow(2).sum()) / energy if energy > 0 else math.nan,
        "rates": [float(f"{float(r):.4g}") for r in rates],
        "sigma": [float(f"{float(s):.4g}") for s in svd.S],
        "ranking": order[: min(k, 64)].tolist(),
    }


def float64_svd(weight: torch.Tensor) -> ThinSVD:
    """Thin SVD of an ``(out, in)`` weight in float64 (factors kept in float64): the precision check's reference."""
    return ThinSVD(*torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False))


def _kind(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]


def aggregate(layers: Mapping[str, Mapping[str, Any]], top: int) -> dict[str, Any]:
    """Summary over layers (and per layer type): positions of the top TSDs, n50/n90, top-N share."""

    def summary(infos: list[Mapping[str, Any]]) -> dict[str, Any]:
        positions = sorted(p for info in infos for p in info["top_positions"])
        finite = [i["core_energy_share"] for i in infos if math.isfinite(i["core_energy_share"])]
        hist = [0] * 10
        for p in positions:
            hist[min(9, int(p * 10))] += 1
        return {
            "layers": len(infos),
            "mean_position": sum(positions) / len(positions),
            "median_position": positions[len(positions) // 2],
            "position_histogram_deciles": hist,
            "share_in_top_decile": sum(p < 0.1 for p in positions) / len(positions),
            "share_in_bottom_decile": sum(p >= 0.9 for p in positions) / len(positions),
            "share_is_top1_sigma": sum(1 for i in infos for j in i["top_indices"] if j == 0) / len(positions),
            "share_is_last_sigma": sum(1 for i in infos for j in i["top_indices"] if j == i["k"] - 1)
            / len(positions),
            "mean_n50": sum(i["n50"] for i in infos) / len(infos),
            "mean_n90": sum(i["n90"] for i in infos) / len(infos),
            "mean_k": sum(i["k"] for i in infos) / len(infos),
            "mean_top_share": sum(i["top_share"] for i in infos) / len(infos),
            "uniform_top_share": sum(top / i["k"] for i in infos) / len(infos),
            "mean_core_energy_share": sum(finite) / len(finite) if finite else math.nan,
        } | _agreement(infos)

    infos = list(layers.values())
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for name, info in layers.items():
        by_kind.setdefault(_kind(name), []).append(info)
    return {"all": summary(infos), "by_type": {kind: summary(v) for kind, v in by_kind.items()}}


def _agreement(infos: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Optional per-layer facts over layers: fp32-vs-float64 agreement of the top TSDs, the dash term's share,
    LoRA-Init's start ratio."""
    out: dict[str, Any] = {}
    values = [i["fp64_top_agreement"] for i in infos if "fp64_top_agreement" in i]
    if values:
        out |= {"mean_fp64_top_agreement": sum(values) / len(values), "min_fp64_top_agreement": min(values),
                "layers_fp64_top_equal": sum(v == 1.0 for v in values)}
    for fact in ("dash_share", "init_start_ratio"):
        values = sorted(i[fact] for i in infos if fact in i)
        if values:
            out |= {f"median_{fact}": values[len(values) // 2], f"min_{fact}": values[0], f"max_{fact}": values[-1]}
    return out


def overlap_report(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]], top: int) -> dict:
    """Per common layer: ``|top-N(a) ∩ top-N(b)| / N`` and the chance level ``N / k``."""
    common = [n for n in a if n in b]
    if not common:
        raise ConfigError("the two sources have no adapted layer in common")
    per_layer = {n: overlap(a[n]["top_indices"][:top], b[n]["top_indices"][:top]) for n in common}
    chance = {n: top / a[n]["k"] for n in common}
    counts = [round(v * top) for v in per_layer.values()]
    return {"top": top, "per_layer": per_layer, "chance": chance,
            "mean": sum(per_layer.values()) / len(common), "mean_chance": sum(chance.values()) / len(common),
            "shared_directions_min": min(counts), "shared_directions_max": max(counts),
            "shared_directions_median": sorted(counts)[len(counts) // 2]}


# ------------------------------------------------------------------------------------------- sources


def _out_in(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``(out, in)`` fp32 (HF Conv1D stores ``(in, out)``)."""
    from lora_tsd.base_layers import base_shape

    w = module.weight.detach()
    if tuple(w.shape) != base_shape(module):
        w = w.T
    return w.to(torch.float32).clone()


def target_names(model: nn.Module, target_modules: list[str] | str | None = None) -> list[str]:
    """The layers analyzed for a dense source: the library's default targets for the model type."""
    from lora_tsd.config import TSDConfig
    from lora_tsd.inject import resolve_targets

    return resolve_targets(model, TSDConfig(target_modules=target_modules))


@dataclasses.dataclass
class Source:
    """A fine-tune to analyze: ``kind`` is ``adapter`` (lora-tsd), ``peft`` or ``checkpoint`` (full model)."""

    label: str
    kind: str
    path: Path
    model: str | None
    num_labels: int | None


def _num_labels_from_adapter(directory: Path) -> int | None:
    from safetensors import safe_open

    from lora_tsd.adapter_io import SAVED_PREFIX, TENSORS_FILE

    with safe_open(str(directory / TENSORS_FILE), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
            if key.startswith(SAVED_PREFIX) and key.endswith(("classifier.weight", "score.weight",
                                                              "out_proj.weight")):
                return int(f.get_slice(key).get_shape()[0])
    return None


def resolve_source(path: str | Path, model: str | None = None, label: str | None = None) -> Source:
    """Recognize a run folder, a lora-tsd adapter, a PEFT adapter or a full model folder."""
    from lora_tsd.adapter_io import CONFIG_FILE, read_adapter_config

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a folder (give a run folder, an adapter or a model folder)")
    label = label or path.name
    if (path / "train_config.json").is_file():  # a `lora-tsd train` run folder
        from lora_tsd.app.workflow.run import read_run_config

        cfg = read_run_config(path)
        labels = None
        if (path / "summary.json").is_file():
            labels = json.loads((path / "summary.json").read_text(encoding="utf-8"))["data"].get("labels")
        inner = resolve_source(path / "adapter", model or cfg.model, label)
        return dataclasses.replace(inner, num_labels=len(labels) if labels else inner.num_labels)
    if (path / CONFIG_FILE).is_file():
        meta = read_adapter_config(path)
        return Source(label, "adapter", path, model or meta.get("base_model"), _num_labels_from_adapter(path))
    if (path / "adapter_config.json").is_file():
        meta = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        return Source(label, "peft", path, model or meta.get("base_model_name_or_path"), None)
    if (path / "config.json").is_file():
        if model is None:
            raise ConfigError(f"{path} is a full model folder: pass --model, the pretrained model it was tuned from")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        labels = config.get("id2label")
        return Source(label, "checkpoint", path, model, len(labels) if labels else None)
    raise ConfigError(f"{path} is neither a run folder, a lora-tsd adapter ({CONFIG_FILE}), a PEFT adapter "
                      "(adapter_config.json) nor a model folder (config.json)")


def dash_share(layer: nn.Module) -> float:
    """``‖c‖₂ / ‖(α/r)·B A‖_F``: the dash term's size next to the low-rank update of the same layer.

    ``U_s diag(c) V_sᵀ`` has orthonormal U_s and V_s, so its Frobenius norm is ``‖c‖₂``. A small share says the
    dash moved the weights little, whatever its change *rate* along its small-σ directions.
    """
    B, A = layer.lora_B.detach() * layer.scaling, layer.lora_A.detach()
    lora = math.sqrt(frobenius_sq((B, A)))
    return float(layer.dash_c.detach().double().norm()) / lora if lora > 0 else math.inf


def init_start_ratio(layer: nn.Module) -> float:
    """``‖A₀‖_F / ‖A_LoRA‖_F``: how large LoRA-Init's starting factors are next to the random A LoRA starts from.

    The switch sets ``(α/r)·B₀A₀ = U_T diag(σ_T) V_Tᵀ`` with the √σ split, so ``‖A₀‖_F = ‖B₀‖_F =
    √(Σσ_T / (α/r))``; LoRA starts from this layer's Kaiming-uniform A (``‖A‖_F ≈ √(r/3)``) and B = 0. The
    gradient of B is proportional to A and that of A to B, so a small ratio means LoRA-Init starts both factors
    near the saddle B = A = 0, where the low-rank update grows slowly.
    """
    count = int((layer.init_idx >= 0).sum())
    fresh = layer._fresh_A(layer.config.r, layer.init_A0.device)
    return float(layer.init_A0[:count].detach().double().norm() / fresh.double().norm())


def _load_base(model_name: str, num_labels: int | None):
    from lora_tsd.app.assets.models import load_model

    model, _, kind = load_model(model_name, num_labels=num_labels or 2)
    return model, kind


class SourceChanges(NamedTuple):
    """Per layer of a source: the pretrained ``(out, in)`` weight, the change, and facts only switched lora-tsd
    adapter layers have (``dash_share``: :func:`dash_share`; ``init_start_ratio``: :func:`init_start_ratio`)."""

    originals: dict[str, torch.Tensor]
    deltas: dict[str, Delta]
    layer_facts: dict[str, dict[str, float]]


def source_deltas(source: Source, target_modules: list[str] | str | None = None) -> SourceChanges:
    """Pretrained weights and changes per layer of a source (:class:`SourceChanges`).

    lora-tsd adapters give each layer's ``original_delta_factors()`` (the change relative to the *original*
    weight, init-style methods included); PEFT adapters and full checkpoints give dense ``W_tuned − W``.
    """
    if source.model is None:
        raise ConfigError(f"{source.path}: the base model is unknown; pass --model")
    base, kind = _load_base(source.model, source.num_labels)
    if source.kind == "adapter":
        from lora_tsd.adapter_io import load_adapter, read_adapter_config
        from lora_tsd.inject import adapted_layers

        names = list(read_adapter_config(source.path)["layers"])
        originals = {n: _out_in(base.get_submodule(n)) for n in names}
        load_adapter(base, source.path)
        deltas: dict[str, Delta] = {}
        facts: dict[str, dict[str, float]] = {}
        for name, layer in adapted_layers(base):
            B, A = layer.original_delta_factors()
            deltas[name] = (B.detach().float().cpu(), A.detach().float().cpu())
            if not layer.is_switched:
                continue
            if layer.dash_c is not None:
                facts.setdefault(name, {})["dash_share"] = dash_share(layer)
            if layer.config.init_size:
                facts.setdefault(name, {})["init_start_ratio"] = init_start_ratio(layer)
        return SourceChanges(originals, deltas, facts)
    names = target_names(base, target_modules)
    originals = {n: _out_in(base.get_submodule(n)) for n in names}
    if source.kind == "peft":
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, source.path).merge_and_unload()
    else:
        from lora_tsd.app.assets.models import load_model

        tuned, _, _ = load_model(source.path, kind=kind, num_labels=source.num_labels or 2)
    deltas = {}
    for name in names:
        delta = _out_in(tuned.get_submodule(name)) - originals[name]
        if bool(delta.any()):
            deltas[name] = delta
    if not deltas:
        raise ConfigError(f"{source.path}: no analyzed layer differs from the base model {source.model}")
    return SourceChanges({n: originals[n] for n in deltas}, deltas, {})


def spectra(originals: Mapping[str, torch.Tensor], deltas: Mapping[str, Delta], top: int,
            svds: dict[str, ThinSVD] | None = None,
            references: dict[str, ThinSVD] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`layer_spectrum` of every layer (``svds`` caches the SVDs of the pretrained weights).

    ``references`` (a cache like ``svds``, given only for the precision check) adds a float64 SVD of every
    weight (:func:`float64_svd`) and how many of the top TSDs the two agree on (slow for large models).
    """
    svds = {} if svds is None else svds
    out = {}
    for name, delta in deltas.items():
        if name not in svds:
            svds[name] = thin_svd(originals[name])
        if references is not None and name not in references:
            references[name] = float64_svd(originals[name])
        reference = None if references is None else references[name]
        out[name] = layer_spectrum(svds[name], delta, top, reference_svd=reference)
    return out


def _pick_layers(names: Sequence[str], limit: int) -> list[str]:
    if len(names) <= limit:
        return list(names)
    step = (len(names) - 1) / (limit - 1)
    return [names[round(i * step)] for i in range(limit)]


def write_spectrum_outputs(results: dict[str, dict[str, dict[str, Any]]], out: Path, top: int,
                           overlap_info: dict | None = None, max_layers: int = 36,
                           title: str = "", say: Callable[[str], None] = print) -> list[str]:
    """Plots for :func:`analyze_spectrum` results: spectra, sorted spectra, TSD positions, overlap."""
    try:
        from lora_tsd.app.experiments import plots
    except ImportError as err:
        say(f"plots skipped ({err}); pip install 'lora-tsd[plots]'")
        return []
    made = []
    for label, layers in results.items():
        shown = {n: layers[n] for n in _pick_layers(list(layers), max_layers)}
        slug = _slug(label)
        plots.plot_spectra(shown, out / f"spectra_{slug}.png", top,
                           title=f"{title}{label}: change rate per singular direction (red: top-{top} TSDs)")
        plots.plot_sorted_spectra(layers, out / f"spectra_sorted_{slug}.png",
                                  title=f"{title}{label}: sorted change rates per layer")
        made += [f"spectra_{slug}.png", f"spectra_sorted_{slug}.png"]
    plots.plot_tsd_positions({label: [p for info in layers.values() for p in info["top_positions"]]
                              for label, layers in results.items()}, out / "tsd_positions.png", top,
                             title=f"{title}where the top-{top} TSDs sit in the spectrum")
    made.append("tsd_positions.png")
    if overlap_info is not None:
        plots.plot_overlap(overlap_info["per_layer"], overlap_info["chance"], out / "overlap.png",
                           list(results), overlap_info["top"])
        made.append("overlap.png")
    return made


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "source"


def analyze_spectrum(paths: Sequence[str | Path], out: str | Path, model: str | None = None,
                     labels: Sequence[str] | None = None, top: int = 8,
                     target_modules: list[str] | str | None = None, max_layers: int = 36, plots: bool = True,
                     check_precision: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Spectra of one or two sources (and their TSD overlap); writes ``spectrum.json`` and PNGs into ``out``."""
    if not 1 <= len(paths) <= 2:
        raise ConfigError("analyze spectrum takes one or two sources")
    if labels is not None and len(labels) != len(paths):
        raise ConfigError("give one --labels entry per source")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [resolve_source(p, model, labels[i] if labels else None) for i, p in enumerate(paths)]
    if len(sources) == 2 and sources[0].label == sources[1].label:
        sources[1] = dataclasses.replace(sources[1], label=sources[1].label + "_2")
    svds: dict[str, ThinSVD] = {}
    references: dict[str, ThinSVD] | None = {} if check_precision else None  # both sources share the weights
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for source in sources:
        changes = source_deltas(source, target_modules)
        results[source.label] = spectra(changes.originals, changes.deltas, top, svds, references)
        for name, facts in changes.layer_facts.items():
            results[source.label][name].update(facts)
        say(f"{source.label}: {len(changes.deltas)} layers analyzed")
    overlap_info = overlap_report(*results.values(), top) if len(results) == 2 else None
    report = {
        "top": top,
        "sources": [{"label": s.label, "kind": s.kind, "path": str(s.path), "model": s.model} for s in sources],
        "summary": {label: aggregate(layers, top) for label, layers in results.items()},
        "overlap": overlap_info,
        "layers": results,
    }
    report["plots"] = write_spectrum_outputs(results, out, top, overlap_info, max_layers, say=say) if plots else []
    atomic_write_json(out / "spectrum.json", _clean(report))
    return report


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------- capture


def snapshot_steps(steps: int, every: int | None = None, explicit: Sequence[int] | None = None) -> list[int]:
    """Steps to measure at: ``explicit``, else 1, 2, 5 and every ``every`` (default steps // 10), and the last."""
    if explicit:
        chosen = sorted({int(s) for s in explicit if 1 <= int(s) <= steps})
        if not chosen:
            raise ConfigError(f"no snapshot step lies in 1..{steps}")
        return chosen
    every = every or max(1, steps // 10)
    return sorted({s for s in (1, 2, 5) if s <= steps} | set(range(every, steps + 1, every)) | {steps})


def train_with_snapshots(cfg: Any, mode: str, steps_to_snap: Iterable[int],
                         on_snapshot: Callable[[int, nn.Module], None],
                         device: torch.device | None = None) -> tuple[nn.Module, dict[str, float]]:
    """A compact training loop of the workflow (same data order, optimizer and schedule as ``train``):
    ``mode='full'`` trains every parameter (full fine-tune), ``mode='lora'`` plain LoRA; calls
    ``on_snapshot(step, model)`` after the chosen optimizer steps. Returns the model and its test metrics.
    """
    from transformers import get_linear_schedule_with_warmup

    from lora_tsd.app.workflow.backends import make_backend
    from lora_tsd.app.workflow.run import autocast, batch_indices, evaluate_split, head_modules, load_for_run
    from lora_tsd.switching import step as tsd_step

    if mode not in ("full", "lora"):
        raise ConfigError(f"mode must be 'full' or 'lora', got {mode!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task, model, _, _, runner = load_for_run(cfg)
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = make_backend("lora", dataclasses.replace(cfg, method="lora").tsd_config(
            head_modules(model, runner))).attach(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    wanted = set(steps_to_snap)
    torch.manual_seed(cfg.seed)  # dropout stream
    model.train()
    for opt_step in range(1, cfg.steps + 1):
        for micro in range(cfg.grad_accum):
            idx = batch_indices(len(task.train), cfg.batch_size, cfg.seed, (opt_step - 1) * cfg.grad_accum + micro)
            with autocast(cfg, device):
                loss = runner.loss(model, [task.train[i] for i in idx], device) / cfg.grad_accum
            loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if mode == "lora":
            tsd_step(model, optimizer)
        if opt_step in wanted:
            model.eval()
            on_snapshot(opt_step, model)
            model.train()
    metrics = evaluate_split(model, runner, task.test, cfg, device)
    return model, metrics


def _lora_factors(model: nn.Module) -> dict[str, Delta]:
    from lora_tsd.inject import adapted_layers

    out = {}
    for name, layer in adapted_layers(model):
        B, A = layer.original_delta_factors()
        out[name] = (B.detach().float().cpu(), A.detach().float().cpu())
    return out


def _rankings(svds: Mapping[str, ThinSVD], deltas: Mapping[str, Delta], keep: int) -> dict[str, list[int]]:
    """Top-``keep`` TSD ranking per layer; layers whose change is exactly zero have no ranking (left out).

    (With a warm-up schedule the first optimizer step has lr 0, so ΔW is still zero there.)
    """
    out = {}
    for name, delta in deltas.items():
        rates = rates_from_projections(projections(svds[name], delta), svds[name].S)
        if bool(rates.any()):
            out[name] = select_directions(rates, min(keep, int(rates.numel())), "tsd").tolist()
    return out


def capture_scores(predicted: Mapping[str, Sequence[int]], reference: Mapping[str, Sequence[int]],
                   n_pred: int = 8, n_recall: int = 4, n_acc: int = 16) -> dict[str, Any]:
    """Mean over layers of the paper's recall and accuracy, plus the share of layers with perfect recall."""
    names = [n for n in reference if n in predicted]
    if not names:
        raise ConfigError("the prediction and the reference have no layer in common")
    recall = [tsd_recall(predicted[n], reference[n], n_pred, n_recall) for n in names]
    accuracy = [tsd_accuracy(predicted[n], reference[n], n_pred, n_acc) for n in names]
    return {"recall": sum(recall) / len(names), "accuracy": sum(accuracy) / len(names),
            "recall_event": sum(r == 1.0 for r in recall) / len(names),
            "accuracy_at_least_0.75": sum(a >= 0.75 for a in accuracy) / len(names), "layers": len(names)}


def _chance(ks: Iterable[int], n_pred: int, n_recall: int, n_acc: int) -> dict[str, float]:
    """Expected recall and accuracy of a uniformly random top-n_pred set (mean over layers)."""
    ks = list(ks)
    return {"accuracy": sum(n_acc / k for k in ks) / len(ks), "recall": sum(n_pred / k for k in ks) / len(ks)}


def _lora_run_snapshots(run: Path, svds: Mapping[str, ThinSVD], keep: int) -> dict[int, dict[str, list[int]]]:
    """Rankings of a LoRA run's checkpoint adapters (``checkpoints/step-N/adapter``) and final adapter."""
    from lora_tsd.app.workflow.checkpoint import list_checkpoints

    found = [(step, path / "adapter") for step, path in list_checkpoints(run)]
    if (run / "summary.json").is_file():
        steps = json.loads((run / "summary.json").read_text(encoding="utf-8"))["config"]["steps"]
        found.append((steps, run / "adapter"))
    if not found:
        raise ConfigError(f"{run} has no checkpoints (train with --checkpoint-every N) and no final adapter")
    out = {}
    for step, adapter in sorted(found):
        source = resolve_source(run)
        source = dataclasses.replace(source, path=adapter)
        deltas = source_deltas(source).deltas
        out[step] = _rankings(svds, deltas, keep)
    return out


def analyze_capture(cfg: Any, out: str | Path, full_lr: float = 5e-5, snapshots: Sequence[int] | None = None,
                    every: int | None = None, lora_run: str | Path | None = None,
                    reference: str | Path | None = None, n_pred: int = 8, n_recall: int = 4, n_acc: int = 16,
                    top: int = 8, save_reference: bool = True, plots: bool = True,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """TSD capture along training (see the module docstring); writes ``capture.json`` and ``capture.png``.

    Args:
        cfg: a :class:`~lora_tsd.train.TrainConfig` (model, task, data, steps, LoRA lr and r, seed).
        full_lr: the learning rate of the reference full fine-tune.
        lora_run: take LoRA's snapshots from this run's checkpoints instead of training LoRA here.
        reference: a fully fine-tuned model folder as the reference instead of fine-tuning here.
    """
    from lora_tsd.app.assets.models import load_model
    from lora_tsd.app.workflow.run import read_run_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if lora_run is not None:
        run_cfg = read_run_config(lora_run)
        cfg = dataclasses.replace(cfg, model=run_cfg.model, task=run_cfg.task, data_seed=run_cfg.data_seed,
                                  max_train=run_cfg.max_train, max_length=run_cfg.max_length, r=run_cfg.r,
                                  steps=run_cfg.steps, seed=run_cfg.seed, lr=run_cfg.lr)
        if run_cfg.method != "lora":
            say(f"note: {lora_run} trained {run_cfg.method!r}, not plain LoRA; its ΔW is analyzed all the same")
    keep = max(n_pred, n_acc, top)
    steps = snapshot_steps(cfg.steps, every, snapshots)
    # Pretrained weights and their SVDs (once): the targets of the library's default (or the run's) config.
    probe, _, _ = load_model(cfg.model, num_labels=2)
    names = target_names(probe, cfg.target_modules)
    svds = {n: thin_svd(_out_in(probe.get_submodule(n))) for n in names}
    originals = {n: _out_in(probe.get_submodule(n)) for n in names}
    del probe

    full_traj: dict[int, dict[str, list[int]]] = {}
    result: dict[str, Any] = {"config": cfg.to_dict(), "full_lr": full_lr, "snapshot_steps": steps,
                              "n_pred": n_pred, "n_recall": n_recall, "n_acc": n_acc}
    if reference is None:
        say(f"full fine-tune of {cfg.model} on {cfg.task}: {cfg.steps} steps at lr {full_lr:g}")

        def full_snapshot(step: int, model: nn.Module) -> None:
            deltas = {n: _out_in(model.get_submodule(n)).cpu() - originals[n] for n in names}
            full_traj[step] = _rankings(svds, deltas, keep)

        full_cfg = dataclasses.replace(cfg, lr=full_lr, method="lora")
        model, metrics = train_with_snapshots(full_cfg, "full", steps, full_snapshot)
        result["full_ft_test"] = metrics
        say(f"full fine-tune: test {metrics}")
        ref_deltas = {n: _out_in(model.get_submodule(n)).cpu() - originals[n] for n in names}
        if save_reference:
            from transformers import AutoTokenizer

            from lora_tsd.app.assets.models import resolve_model

            model.save_pretrained(out / "full_ft")
            AutoTokenizer.from_pretrained(resolve_model(cfg.model)).save_pretrained(out / "full_ft")
        del model
    else:
        source = resolve_source(reference, cfg.model, "reference")
        ref_deltas = source_deltas(source, cfg.target_modules).deltas
        ref_deltas = {n: d for n, d in ref_deltas.items() if n in svds}
    ref_spectra = spectra(originals, ref_deltas, top, svds)
    reference_rank = {n: info["ranking"][:keep] for n, info in ref_spectra.items()}

    lora_traj: dict[int, dict[str, list[int]]] = {}
    if lora_run is None:
        say(f"LoRA r={cfg.r} on {cfg.task}: {cfg.steps} steps at lr {cfg.lr:g}")

        def lora_snapshot(step: int, model: nn.Module) -> None:
            lora_traj[step] = _rankings(svds, _lora_factors(model), keep)

        _, metrics = train_with_snapshots(dataclasses.replace(cfg, method="lora"), "lora", steps, lora_snapshot)
        result["lora_test"] = metrics
        say(f"LoRA: test {metrics}")
    else:
        lora_traj = _lora_run_snapshots(Path(lora_run), svds, keep)

    ks = [svds[n].S.numel() for n in reference_rank]
    chance = _chance(ks, n_pred, n_recall, n_acc)
    series: dict[str, dict[str, list[float]]] = {}
    for label, traj in (("LoRA ΔW = BA", lora_traj), ("full fine-tune ΔW (at step t)", full_traj)):
        if not traj:
            continue
        rows = {step: capture_scores(traj[step], reference_rank, n_pred, n_recall, n_acc) for step in sorted(traj)
                if traj[step]}
        series[label] = {"steps": list(rows), **{m: [r[m] for r in rows.values()] for m in
                                                 ("accuracy", "recall", "recall_event", "accuracy_at_least_0.75")}}
    result.update(chance=chance, series=series, reference_summary=aggregate(ref_spectra, top),
                  reference_layers={n: {k: v for k, v in info.items() if k not in ("rates", "sigma")}
                                    for n, info in ref_spectra.items()})
    made = []
    if plots:
        try:
            from lora_tsd.app.experiments import plots as plot_module
        except ImportError as err:
            say(f"plots skipped ({err}); pip install 'lora-tsd[plots]'")
        else:
            plot_module.plot_capture(series, chance, out / "capture.png",
                                     title=f"{cfg.model} on {cfg.task}: TSD capture against the final full "
                                           f"fine-tune (r={cfg.r})")
            made.append("capture.png")
            made += write_spectrum_outputs({"full fine-tune": ref_spectra}, out, top, say=say,
                                           title=f"{cfg.model} on {cfg.task}, ")
    result["plots"] = made
    atomic_write_json(out / "capture.json", _clean(result))
    return result


# ------------------------------------------------------------------------------------------- command line


def add_arguments(parser: Any) -> None:
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    sp = sub.add_parser("spectrum", help="change-rate spectra of one or two fine-tunes, and their TSD overlap",
                        description="Per-layer change-rate spectra of a run folder, a lora-tsd or PEFT adapter, or "
                                    "a fully fine-tuned model folder against the pretrained weights; with two "
                                    "sources (e.g. two tasks), the overlap of their top TSDs.")
    sp.add_argument("sources", nargs="+", metavar="SOURCE", help="one or two run/adapter/model folders")
    sp.add_argument("--out", required=True, help="output folder (spectrum.json and PNGs)")
    sp.add_argument("--model", help="pretrained base model (default: the run's or the adapter's)")
    sp.add_argument("--labels", nargs="+", help="a name per source (default: folder names)")
    sp.add_argument("--top", type=int, default=8, help="top-N TSDs per layer (default 8)")
    sp.add_argument("--target-modules", nargs="+", help="layers of a dense source (default: the model type's)")
    sp.add_argument("--max-layers", type=int, default=36, help="layers drawn in the spectra grid (default 36)")
    sp.add_argument("--no-plots", action="store_true", help="JSON only")
    sp.add_argument("--check-precision", action="store_true",
                    help="also decompose every weight in float64 and report how many of the top-N TSDs the fp32 SVD "
                         "(the method's) agrees on (one float64 SVD per layer: slow for large models)")

    cp = sub.add_parser("capture", help="recall/accuracy of LoRA's TSDs against a full fine-tune, along training",
                        description="Fine-tune the model fully (the reference TSDs, or --reference) and train LoRA "
                                    "(or read --lora-run's checkpoints); at steps along training, the paper's "
                                    "recall (reference top-4 in predicted top-8) and accuracy (predicted top-8 "
                                    "in reference top-16), mean over layers.")
    cp.add_argument("--out", required=True, help="output folder (capture.json, capture.png, full_ft/)")
    cp.add_argument("--model", default="minilm", help="base model (default: minilm)")
    cp.add_argument("--task", default="bigbench:multiemo", help="task spec (default: bigbench:multiemo)")
    cp.add_argument("--steps", type=int, default=200, help="optimizer steps of both runs (default 200)")
    cp.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (default 1e-3)")
    cp.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tune learning rate (default 5e-5)")
    cp.add_argument("--r", "--rank", dest="r", type=int, default=8, help="LoRA rank (default 8)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--data-seed", type=int, default=0)
    cp.add_argument("--max-train", type=int, default=None)
    cp.add_argument("--max-eval", type=int, default=500)
    cp.add_argument("--max-length", type=int, default=128)
    cp.add_argument("--batch-size", type=int, default=16)
    cp.add_argument("--warmup-steps", type=int, default=25)
    cp.add_argument("--eval-batch-size", type=int, default=64)
    cp.add_argument("--bf16", action="store_true", help="bf16 autocast")
    cp.add_argument("--target-modules", nargs="+", default=None)
    cp.add_argument("--every", type=int, default=None, help="measure every N steps (default steps/10, plus 1, 2, 5)")
    cp.add_argument("--snapshot-steps", nargs="+", type=int, default=None, help="explicit steps to measure at")
    cp.add_argument("--lora-run", help="a `lora-tsd train` run whose checkpoints/step-N/adapter are LoRA's snapshots")
    cp.add_argument("--reference", help="a fully fine-tuned model folder to use as the reference")
    cp.add_argument("--top", type=int, default=8, help="top-N TSDs in the reference spectra (default 8)")
    cp.add_argument("--no-save-reference", action="store_true", help="do not save the full fine-tune to out/full_ft")
    cp.add_argument("--no-plots", action="store_true", help="JSON only")


def main_from_args(args: Any) -> int:
    if args.analysis == "spectrum":
        report = analyze_spectrum(args.sources, args.out, model=args.model, labels=args.labels, top=args.top,
                                  target_modules=_targets(args.target_modules), max_layers=args.max_layers,
                                  plots=not args.no_plots, check_precision=args.check_precision)
        for label, summary in report["summary"].items():
            s = summary["all"]
            if "median_dash_share" in s:
                print(f"{label}: dash term ‖c‖ / ‖(α/r)BA‖_F: median {s['median_dash_share']:.4f}, "
                      f"max {s['max_dash_share']:.4f} over layers")
            if "median_init_start_ratio" in s:
                print(f"{label}: LoRA-Init's starting factors ‖A₀‖_F / ‖A_LoRA‖_F: median "
                      f"{s['median_init_start_ratio']:.3f} (range {s['min_init_start_ratio']:.3f}–"
                      f"{s['max_init_start_ratio']:.3f}) over layers")
            if "mean_fp64_top_agreement" in s:
                print(f"{label}: fp32 vs float64 SVD, top-{report['top']} TSDs agree on "
                      f"{100 * s['mean_fp64_top_agreement']:.1f}% on average (min "
                      f"{100 * s['min_fp64_top_agreement']:.1f}%; identical in {s['layers_fp64_top_equal']} of "
                      f"{s['layers']} layers)")
            print(f"{label}: {s['layers']} layers; top-{report['top']} TSDs at mean spectral position "
                  f"{s['mean_position']:.2f} (0 = largest σ), {100 * s['share_in_top_decile']:.0f}% in the top "
                  f"decile, {100 * s['share_in_bottom_decile']:.0f}% in the bottom decile; n50 {s['mean_n50']:.1f}, "
                  f"n90 {s['mean_n90']:.1f} of k≈{s['mean_k']:.0f}; top-{report['top']} share of the rate mass "
                  f"{100 * s['mean_top_share']:.1f}% (uniform {100 * s['uniform_top_share']:.1f}%)")
        if report["overlap"]:
            o = report["overlap"]
            print(f"overlap of the top-{o['top']} TSDs: mean {o['mean']:.3f} (chance {o['mean_chance']:.3f})")
        print(f"wrote {Path(args.out) / 'spectrum.json'}" + (f", {', '.join(report['plots'])}"
                                                              if report["plots"] else ""))
        return 0
    from lora_tsd.app.workflow.run import TrainConfig

    cfg = TrainConfig(model=args.model, task=args.task, method="lora", r=args.r, lr=args.lr, steps=args.steps,
                      seed=args.seed, data_seed=args.data_seed, max_train=args.max_train, max_eval=args.max_eval,
                      max_length=args.max_length, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                      eval_batch_size=args.eval_batch_size, bf16=args.bf16,
                      target_modules=_targets(args.target_modules), output_dir=args.out, progress=False)
    result = analyze_capture(cfg, args.out, full_lr=args.full_lr, snapshots=args.snapshot_steps, every=args.every,
                             lora_run=args.lora_run, reference=args.reference, top=args.top,
                             save_reference=not args.no_save_reference, plots=not args.no_plots)
    for label, s in result["series"].items():
        pairs = ", ".join(f"{step}: {a:.2f}/{r:.2f}" for step, a, r in zip(s["steps"], s["accuracy"], s["recall"],
                                                                              strict=True))
        print(f"{label} — step: accuracy/recall — {pairs}")
    print(f"random directions: accuracy {result['chance']['accuracy']:.3f}, recall {result['chance']['recall']:.3f}")
    print(f"wrote {Path(args.out) / 'capture.json'}" + (f", {', '.join(result['plots'])}" if result["plots"] else ""))
    return 0


def _targets(values: list[str] | None) -> list[str] | str | None:
    if values and len(values) == 1 and any(c in values[0] for c in "*()[]|\\^$+?"):
        return values[0]
    return values
