"""The sweep (``--sweep``, ``--sweep-only``): how a training step's cost grows with the layer size, with the dash
size s and with the rank r (square fp32 layers), its markdown tables and its plot (``--plot``, matplotlib)."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import torch

from lora_tsd.directions import thin_svd

from .layer_cases import dense_one_layer, tsd_one_layer
from .measure import interleaved
from .report import Report
from .settings import Settings
from .steps import compare_steps, layer_step


def run_sweep(report: Report, st: Settings) -> dict[str, Any]:
    """How the step cost grows with the layer size, with s and with r (square layers, fp32)."""
    out: dict[str, Any] = {"tokens": st.tokens, "sizes": [], "s": [], "r": []}
    for d in st.sweep_sizes:
        gen = torch.Generator().manual_seed(d)
        x, g = torch.randn(st.tokens, d, generator=gen), torch.randn(st.tokens, d, generator=gen)
        cases = [layer_step("lora", tsd_one_layer(d, d, "lora", st, gen), x, g, True),
                 layer_step("dash", tsd_one_layer(d, d, "dash", st, gen), x, g, True),
                 layer_step("dense-dash", dense_one_layer(d, d, st, gen), x, g, False)]
        res = compare_steps(report, f"sweep size {d}×{d}", cases, st, memory=False)
        row = {"d": d, **{k: v.median for k, v in res.items()}}
        if d <= st.sweep_svd_max:
            w = torch.randn(d, d, generator=gen)
            svd_t = interleaved({"svd": lambda w=w: thin_svd(w)}, max(1, min(3, st.reps)), 1)["svd"]
            row["thin_svd"] = statistics.median(svd_t)
        out["sizes"].append(row)
    d = st.sweep_dim
    gen = torch.Generator().manual_seed(17)
    x, g = torch.randn(st.tokens, d, generator=gen), torch.randn(st.tokens, d, generator=gen)
    cases = [layer_step("lora", tsd_one_layer(d, d, "lora", st, gen), x, g, True)]
    for s in st.sweep_s:
        dash_s = tsd_one_layer(d, d, "dash", dataclasses.replace(st, dash=s), gen)
        cases.append(layer_step(f"dash s={s}", dash_s, x, g, True))
    res = compare_steps(report, f"sweep s ({d}×{d}, r={st.rank})", cases, st, memory=False)
    for s in st.sweep_s:
        out["s"].append({"s": s, "dash": res[f"dash s={s}"].median, "lora": res["lora"].median})
    del cases, res
    cases = []
    for r in st.sweep_r:
        sr = dataclasses.replace(st, rank=r)
        cases.append(layer_step(f"lora r={r}", tsd_one_layer(d, d, "lora", sr, gen), x, g, True))
        cases.append(layer_step(f"dash r={r}", tsd_one_layer(d, d, "dash", sr, gen), x, g, True))
    res = compare_steps(report, f"sweep r ({d}×{d}, s={st.dash})", cases, st, memory=False)
    for r in st.sweep_r:
        out["r"].append({"r": r, "lora": res[f"lora r={r}"].median, "dash": res[f"dash r={r}"].median})
    report.sweep = out
    return out


def sweep_tables(sw: dict[str, Any]) -> str:
    """The sweep's three markdown tables (size, s, r) from :func:`run_sweep`'s result."""
    lines = [f"Sweep (fp32, {sw['tokens']} tokens, median seconds per training step)", "",
             "| d (d×d layer) | lora | dash | dense-dash | dash/lora | dense/lora | thin SVD of d×d |",
             "|---|---|---|---|---|---|---|"]
    for r in sw["sizes"]:
        svd = f"{r['thin_svd']:.3f}" if "thin_svd" in r else "—"
        lines.append(f"| {r['d']} | {r['lora']:.4f} | {r['dash']:.4f} | {r['dense-dash']:.4f} | "
                     f"{r['dash'] / r['lora']:.3f} | {r['dense-dash'] / r['lora']:.3f} | {svd} |")
    lines += ["", "| s | lora | dash | dash/lora |", "|---|---|---|---|"]
    for r in sw["s"]:
        lines.append(f"| {r['s']} | {r['lora']:.4f} | {r['dash']:.4f} | {r['dash'] / r['lora']:.3f} |")
    lines += ["", "| r | lora | dash (s fixed) | dash/lora |", "|---|---|---|---|"]
    for r in sw["r"]:
        lines.append(f"| {r['r']} | {r['lora']:.4f} | {r['dash']:.4f} | {r['dash'] / r['lora']:.3f} |")
    return "\n".join(lines)


def plot_sweep(sw: dict[str, Any], path: Path, st: Settings) -> None:
    """The sweep as a PNG of three panels at ``path``: cost vs layer size, dash overhead vs s, cost vs r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    ax = axes[0]
    ds = [r["d"] for r in sw["sizes"]]
    for key, style in (("lora", "o-"), ("dash", "s--"), ("dense-dash", "^-")):
        ax.plot(ds, [r[key] for r in sw["sizes"]], style, label=f"{key} step")
    svd = [(r["d"], r["thin_svd"]) for r in sw["sizes"] if "thin_svd" in r]
    if svd:
        ax.plot([a for a, _ in svd], [b for _, b in svd], "x:", label="thin SVD (once, at the switch)")
    ax.set(xscale="log", yscale="log", xlabel="d (d×d layer)", ylabel="seconds",
           title=f"cost vs layer size ({sw['tokens']} tokens)")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.legend(fontsize=7)
    ax = axes[1]
    ss = [r["s"] for r in sw["s"]]
    ax.plot(ss, [r["dash"] / r["lora"] for r in sw["s"]], "s-", label="dash / lora step time")
    ax.axhline(1.03, color="grey", ls=":", label="target 1.03")
    ax.set(xscale="log", xlabel="s (dash directions)", ylabel="ratio",
           title=f"dash overhead vs s ({st.sweep_dim}², r={st.rank})")
    ax.set_xticks(ss, [str(s) for s in ss])
    ax.legend(fontsize=7)
    ax = axes[2]
    rs = [r["r"] for r in sw["r"]]
    ax.plot(rs, [r["lora"] for r in sw["r"]], "o-", label="lora")
    ax.plot(rs, [r["dash"] for r in sw["r"]], "s--", label=f"dash (s={st.dash})")
    ax.set(xscale="log", xlabel="r (LoRA rank)", ylabel="seconds per step",
           title=f"cost vs r ({st.sweep_dim}²)")
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.legend(fontsize=7)
    for ax in axes:
        ax.minorticks_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
