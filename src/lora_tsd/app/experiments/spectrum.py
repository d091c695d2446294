"""``lora-tsd analyze spectrum``: what the task-specific directions (TSDs) of a fine-tune look like (method.md §1).

``spectrum``: for each adapted layer of one or two fine-tunes (a ``lora-tsd train`` run folder, a lora-tsd
adapter, a PEFT adapter, or a fully fine-tuned model folder), the change rate ``|u_iᵀ ΔW v_i| / σ_i`` of the
change ``ΔW`` against the pretrained weight's SVD, for every singular direction i:

- the spectrum (rate against i) and the sorted rates, per layer (PNG);
- where the top TSDs sit: their σ indices and relative positions ``i / (k − 1)`` (0 = largest σ);
- how many directions carry the change: ``n50`` / ``n90``, the fewest directions whose rates sum to 50 % /
  90 % of all rates, and the top-N share;
- ``core_energy_share``: the share of ``‖ΔW‖_F²`` that lies on the core directions ``u_i v_iᵀ`` at all;
- with two sources, the overlap ``|top-N(a) ∩ top-N(b)| / N`` per layer against chance ``N / k``.

All ranking math is :mod:`lora_tsd.directions` (``thin_svd``, ``change_rates``, ``select_directions``,
``tsd_recall``, ``tsd_accuracy``, ``overlap``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lora_tsd.app.formats import finite_or_none, slug
from lora_tsd.atomic import atomic_write_json
from lora_tsd.directions import (
    DEFAULT_EPS,
    ThinSVD,
    overlap,
    projections,
    rates_from_projections,
    select_directions,
    thin_svd,
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
        from lora_tsd.app.workflow.outputs import read_run_config

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

        from lora_tsd.app.assets.model_files import check_adapter_folder

        check_adapter_folder(Path(source.path))
        tuned = PeftModel.from_pretrained(base, source.path).merge_and_unload()
    else:
        from lora_tsd.app.assets.models import load_model

        tuned, _, _ = load_model(source.path, kind=kind, num_labels=source.num_labels or 2, need_tokenizer=False)
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
        name = slug(label, fallback="source")
        plots.plot_spectra(shown, out / f"spectra_{name}.png", top,
                           title=f"{title}{label}: change rate per singular direction (red: top-{top} TSDs)")
        plots.plot_sorted_spectra(layers, out / f"spectra_sorted_{name}.png",
                                  title=f"{title}{label}: sorted change rates per layer")
        made += [f"spectra_{name}.png", f"spectra_sorted_{name}.png"]
    plots.plot_tsd_positions({label: [p for info in layers.values() for p in info["top_positions"]]
                              for label, layers in results.items()}, out / "tsd_positions.png", top,
                             title=f"{title}where the top-{top} TSDs sit in the spectrum")
    made.append("tsd_positions.png")
    if overlap_info is not None:
        plots.plot_overlap(overlap_info["per_layer"], overlap_info["chance"], out / "overlap.png",
                           list(results), overlap_info["top"])
        made.append("overlap.png")
    return made


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
    atomic_write_json(out / "spectrum.json", finite_or_none(report))
    return report
