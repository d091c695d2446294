"""PNG plots of ``lora-tsd compare`` and ``lora-tsd analyze`` (matplotlib, Agg backend: no display needed).

matplotlib is an optional extra (``pip install 'lora-tsd[plots]'``); importing this module without it raises
ImportError, which the callers turn into a "plots skipped" message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lora_tsd.app.experiments.statistics import mean_std  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig: Any, path: Path, dpi: int = 110) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_accuracy(panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]], labels: Sequence[str], path: Path,
                  ylabel: str = "test accuracy", title: str = "") -> None:
    """One panel per (task, rank): per method the seeds as dots and mean ± std as an error bar (in %)."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(max(4.5, 0.75 * len(labels) + 1.5) * n, 3.8), squeeze=False)
    for ax, (name, points) in zip(axes[0], panels, strict=True):
        for i, label in enumerate(labels):
            values = [100 * v for v in points.get(label, [])]
            if not values:
                continue
            color = COLORS[i % len(COLORS)]
            jitter = [i + 0.12 * (j - (len(values) - 1) / 2) / max(1, len(values)) for j in range(len(values))]
            ax.scatter(jitter, values, s=12, color=color, alpha=0.45, zorder=2)
            mean, std = mean_std(values)
            ax.errorbar([i], [mean], yerr=[std], fmt="o", color=color, capsize=4, markersize=7, zorder=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(f"{ylabel} (%)")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_learning_curves(curves: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Training loss against optimizer step per method (moving average), switch steps as dashed lines."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, curve) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        steps, loss = curve["steps"], curve["loss"]
        window = max(1, len(steps) // 20)
        ax.plot(steps, _smooth(loss, window), color=color, lw=1.4, label=f"{label} (n={curve.get('seeds', 1)})")
        if curve.get("switch"):
            ax.axvline(curve["switch"], color=color, ls="--", lw=0.9, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------------------------- analyze


def _grid(n: int) -> tuple[int, int]:
    cols = min(6, n)
    return math.ceil(n / cols), cols


def plot_spectra(layers: Mapping[str, Mapping[str, Any]], path: Path, top: int, title: str = "") -> None:
    """Per layer: change rate against singular-value index (log scale), the top TSDs in red."""
    names = list(layers)
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        info = layers[name]
        rates = info["rates"]
        floor = min((r for r in rates if r > 0), default=1e-12)
        shown = [max(r, floor) for r in rates]
        ax.semilogy(range(len(rates)), shown, lw=0.6, color="0.35")
        idx = info["top_indices"][:top]
        ax.scatter(idx, [shown[i] for i in idx], s=9, color="C3", zorder=3)
        ax.set_title(_short(name), fontsize=7)
        ax.tick_params(labelsize=6)
    fig.supxlabel("singular-value index i (σ descending)", fontsize=8)
    fig.supylabel("change rate |u_iᵀ ΔW v_i| / σ_i", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=80)


def plot_sorted_spectra(layers: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Every layer's change rates sorted descending and normalized by the largest (log-log), by layer type."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    kinds: dict[str, str] = {}
    for name, info in layers.items():
        kind = _kind(name)
        color = kinds.setdefault(kind, COLORS[len(kinds) % len(COLORS)])
        rates = sorted(info["rates"], reverse=True)
        top = rates[0] if rates and rates[0] > 0 else 1.0
        ax.loglog(range(1, len(rates) + 1), [max(r / top, 1e-12) for r in rates], color=color, lw=0.7, alpha=0.6)
    for kind, color in kinds.items():
        ax.plot([], [], color=color, label=kind)
    ax.set_xlabel("rank of the direction by change rate")
    ax.set_ylabel("change rate / largest change rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_tsd_positions(positions: Mapping[str, Sequence[float]], path: Path, top: int, title: str = "") -> None:
    """Histogram of the relative σ position (index / (k−1): 0 = largest σ, 1 = smallest) of the top TSDs."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bins = [i / 20 for i in range(21)]
    for i, (label, values) in enumerate(positions.items()):
        ax.hist(values, bins=bins, alpha=0.55, color=COLORS[i % len(COLORS)], label=f"{label} (top-{top} per layer)")
    total = max((len(v) for v in positions.values()), default=0)
    if total:
        ax.axhline(total / 20, color="k", ls=":", lw=1, label="uniform (no preference)")
    ax.set_xlabel("position of the direction in the spectrum (0: largest σ, 1: smallest σ)")
    ax.set_ylabel("directions")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_overlap(per_layer: Mapping[str, float], chance: Mapping[str, float], path: Path, labels: Sequence[str],
                 top: int) -> None:
    """Per layer: share of the top TSDs two sources have in common, against the chance level top/k."""
    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.2 * len(names) + 2), 3.8))
    ax.bar(range(len(names)), [per_layer[n] for n in names], color="C0", label="overlap")
    ax.plot(range(len(names)), [chance[n] for n in names], "k:", lw=1, label="chance (top/k)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"|top-{top} ∩ top-{top}| / {top}")
    ax.set_title(f"TSD overlap: {labels[0]} vs {labels[1]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_capture(series: Mapping[str, Mapping[str, Sequence[float]]], chance: Mapping[str, float], path: Path,
                 title: str = "") -> None:
    """TSD capture along training: the paper's accuracy and recall (mean over layers) against the step."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("accuracy", "recall"), strict=True):
        for i, (label, s) in enumerate(series.items()):
            if metric in s:
                ax.plot(s["steps"], s[metric], marker="o", ms=3, color=COLORS[i % len(COLORS)], label=label)
        if metric in chance:
            ax.axhline(chance[metric], color="k", ls=":", lw=1, label="random directions")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"mean {metric} over layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("accuracy: predicted top-8 inside reference top-16", fontsize=8)
    axes[1].set_title("recall: reference top-4 inside predicted top-8", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _short(name: str) -> str:
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    tail = ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]
    return f"{layer}.{tail}" if layer else tail


def _kind(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]
