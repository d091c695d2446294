"""The spectrum, dash-share, init-start, task-overlap and capture sections (``lora-tsd analyze`` outputs)."""

from __future__ import annotations

from lora_tsd.app.experiments.grid_report import pct, signed_pp
from lora_tsd.app.formats import slug
from report import inputs
from report.paired import dash_vs_lora, prelaunch_label


def spectrum_command(report: dict, folder: str, flag: str = "") -> str:
    """The ``lora-tsd analyze spectrum`` command that wrote ``report`` (spectrum or overlap JSON) into ``folder``."""
    paths = " ".join(x["path"].split("/work/grids/")[-1].removesuffix("/adapter") for x in report["sources"])
    labels = " ".join(x["label"] for x in report["sources"])
    return f"lora-tsd analyze spectrum {paths} --labels {labels} --top {report['top']} --out {folder}{flag}"


def spectrum_section(folder: str = "spectrum-lora", title: str = "MiniLM, multiemo",
                     source: str = "Adapters of the grid above (two seeds of plain LoRA)") -> list[str]:
    """Where the top TSDs of trained adapters sit (``analyze spectrum`` JSON in ``folder``)."""
    report = inputs.load(folder, "spectrum.json")
    if report is None:
        return [f"## Change-rate spectra of trained adapters ({title})", "", "_Not run._", ""]
    top = report["top"]
    rows = ["| adapter | layer type | layers | mean position of the top-8 | in top σ decile | in bottom σ decile "
            "| among the 8 smallest σ | n50 | n90 | top-8 share of Σ rate | core energy share |", "|" + "---|" * 11]
    for label, summary in report["summary"].items():
        layers = report["layers"][label]
        for kind, t in [("all", summary["all"]), *sorted(summary["by_type"].items())]:
            chosen = [(info["k"], j) for name, info in layers.items() if kind == "all" or _kind(name) == kind
                      for j in info["top_indices"]]
            last = sum(j >= k - 8 for k, j in chosen) / len(chosen)
            rows.append(f"| {label} | {kind} | {t['layers']} | {t['mean_position']:.2f} | "
                        f"{pct(t['share_in_top_decile'], 0)} % | {pct(t['share_in_bottom_decile'], 0)} % | "
                        f"{pct(last, 0)} % | {t['mean_n50']:.1f} | {t['mean_n90']:.1f} | "
                        f"{pct(t['mean_top_share'])} % (uniform {pct(t['uniform_top_share'])} %) | "
                        f"{pct(t['mean_core_energy_share'], 2)} % |")
    labels = " ".join(s["label"] for s in report["sources"])
    checked = "mean_fp64_top_agreement" in next(iter(report["summary"].values()))["all"]
    flag = " --check-precision" if checked else ""
    lines = [
        f"## Change-rate spectra of trained adapters ({title})", "",
        "```bash", spectrum_command(report, folder, flag), "```", "",
        f"{source}; ΔW = the adapter's whole change of every adapted layer ((α/r)·BA, plus the dash term for "
        "LoRA-Dash) against the "
        f"SVD of the pretrained weight. Position = i/(k−1) of a top-{top} "
        "direction (0 = largest σ, 1 = smallest); n50/n90 = fewest directions whose change rates add up to 50 % / "
        "90 % of all rates; core energy share = Σ p_i² / ‖ΔW‖_F², the part of the change that lies on the core "
        "directions u_i v_iᵀ at all.", "",
        *rows, "",
    ]
    sigma = _sigma_facts(report)
    if sigma:
        lines += [sigma, ""]
    if checked:
        parts = [f"{label}: identical in {t['layers_fp64_top_equal']} of {t['layers']} layers (mean agreement "
                 f"{pct(t['mean_fp64_top_agreement'])} %, lowest {pct(t['min_fp64_top_agreement'])} %)"
                 for label, t in ((label, summary["all"]) for label, summary in report["summary"].items())]
        lines += [f"Are these near-null directions numerical noise? `--check-precision` decomposes every weight "
                  f"again in float64: the top-{top} TSDs of the method's fp32 SVD and of the float64 one are "
                  + "; ".join(parts) + ". " + (
                      "At these σ ratios fp32 resolves the ranking: the position of the top TSDs is a property of "
                      "the weights, not of the arithmetic" if all(
                          t["all"]["layers_fp64_top_equal"] == t["all"]["layers"] for t in report["summary"].values())
                      else "Where they disagree, the bottom of the spectrum lies below fp32's resolution of the "
                      "weight and part of the ranking there is arithmetic, not the task")
                  + " (docs/performance.md shows where fp32 stops resolving it: σ spanning 7 decades).", ""]
    if report.get("overlap"):
        o = report["overlap"]
        lines += [f"Overlap of the top-{o['top']} sets of {labels.replace(' ', ' and ')}: mean "
                  f"{o['mean']:.2f} per layer (chance {o['mean_chance']:.3f}); shared directions per layer "
                  f"{o['shared_directions_min']}–{o['shared_directions_max']} of {o['top']} (median "
                  f"{o['shared_directions_median']}).", "", f"![overlap](results/{folder}/overlap.png)", ""]
    first = next(iter(report["summary"]))
    lines += [f"![spectra {first}](results/{folder}/spectra_{slug(first, fallback='source')}.png)", ""]
    for label in report["summary"]:
        name = slug(label, fallback="source")
        lines += [f"![sorted spectra {label}](results/{folder}/spectra_sorted_{name}.png)", ""]
    lines += [f"![positions](results/{folder}/tsd_positions.png)", ""]
    return lines


def dash_share_section() -> list[str]:
    """How large the trained dash term is next to LoRA's update (``analyze spectrum`` of LoRA-Dash runs)."""
    report = inputs.load("spectrum-dash", "spectrum.json")
    if report is None:
        return []
    parts = [f"{label}: median {pct(t['all']['median_dash_share'])} %, largest {pct(t['all']['max_dash_share'])} %"
             for label, t in report["summary"].items() if "median_dash_share" in t["all"]]
    return ["### How far the dash moved", "", "```bash",
            spectrum_command(report, "spectrum-dash"), "```",
            "", "The dash term U_s diag(c) V_sᵀ of a trained LoRA-Dash adapter next to the same layer's LoRA update, "
            "as ‖c‖₂ / ‖(α/r)·BA‖_F over the 36 layers (`dash_share` in spectrum.json): " + "; ".join(parts)
            + ". The dash starts at c = 0 at the switch and trains for the remaining steps at the same learning "
            "rate as A and B, so at this budget LoRA-Dash is LoRA plus a correction of a few percent of its norm "
            "(along directions of small σ, where a small change is a large change *rate*)." + dash_vs_lora(), ""]


def init_start_section() -> list[str]:
    """How large LoRA-Init's starting factors are next to LoRA's random A (``analyze spectrum`` of init runs)."""
    report = inputs.load("spectrum-init", "spectrum.json")
    if report is None:
        return []
    parts = [f"{label}: median {t['all']['median_init_start_ratio']:.3f} (range {t['all']['min_init_start_ratio']:.3f}"
             f"–{t['all']['max_init_start_ratio']:.3f})"
             for label, t in report["summary"].items() if "median_init_start_ratio" in t["all"]]
    gaps = []
    for name in inputs.TASK_GRIDS:
        grid = inputs.load(name, "results.json")
        label = prelaunch_label((grid or {}).get("spec", {}).get("methods", []), "init")
        for p in (grid or {}).get("paired", []):
            if p["method"] == label and p["n"] >= 2 and p["ci_low"] is not None:
                gaps.append(f"`{p['task']}` r = {p['r']}: {signed_pp(p['diff_mean'])} [{signed_pp(p['ci_low'])}, "
                            f"{signed_pp(p['ci_high'])}] (n = {p['n']})")
    return ["### Where LoRA-Init starts", "", "```bash", spectrum_command(report, "spectrum-init"), "```", "",
            "LoRA starts from B = 0 and a random (Kaiming-uniform) A of norm ≈ √(r/3). LoRA-Init re-initializes "
            "both factors from the top-r TSDs with the √σ split, ‖A₀‖_F = ‖B₀‖_F = √(Σσ_T / (α/r)); TSDs have small "
            "σ, so both factors start small. `init_start_ratio` in spectrum.json is ‖A₀‖_F over the norm of the A "
            "that LoRA starts from in the same layer: " + "; ".join(parts) + ". The gradient of B is proportional "
            "to A and that of A to B, so a ratio far below 1 starts LoRA-Init close to the saddle point B = A = 0, "
            "where the update grows slowly. This is a measured difference between the two starts, not a proof of "
            "what causes the differences that follow. LoRA-Init (pre-launch) minus LoRA, paired by seed (test "
            "accuracy, points, 95 % CI): "
            + "; ".join(gaps) + ".", ""]


def overlap_pair(folder: str) -> tuple[str, str] | None:
    """The ``analyze spectrum`` command of a two-task overlap and its measured sentence, or None if not run."""
    pair = inputs.load(folder, "overlap.json")
    if pair is None:
        return None
    o = pair["overlap"]
    command = spectrum_command(pair, folder)
    shared = (f"{o['mean']:.2f} of the top-{o['top']} TSDs shared per layer (median {o['shared_directions_median']} "
              f"of {o['top']}, range {o['shared_directions_min']}–{o['shared_directions_max']}; chance "
              f"{o['mean_chance']:.3f})")
    return command, shared


def tasks_section() -> list[str]:
    pair = overlap_pair("spectrum-tasks")
    if pair is None:
        return []
    command, shared = pair
    other = inputs.load("minilm-multiemo4", "results.json")
    made = []
    run = next((r for r in (other or {}).get("runs", []) if r["method"] == "lora" and r["seed"] == 0
                and r["status"] == "done"), None)
    if run:
        made = [f"The 4-class adapter is LoRA seed 0 of the 4-class grid above (test accuracy "
                f"{pct(run['test_accuracy'])} %, untrained head {pct(run['before_test_accuracy'])} %).", ""]
    return ["### Two tasks: TSD overlap", "", *made, "```bash", command, "```", "",
            f"LoRA r = 8, seed 0, on the 2-class and on the 4-class view of multiemo (the same kind of review "
            f"sentences, different labels): {shared}. Compare with the two seeds of one task above.", "",
            "![task overlap](results/spectrum-tasks/overlap.png)", "", *unrelated_pair()]


def unrelated_pair() -> list[str]:
    """Two unrelated tasks (sentiment vs fact verification): the sharpest test of task-specificity here."""
    pair = overlap_pair("spectrum-vitaminc")
    if pair is None:
        return []
    command, shared = pair
    seeds = inputs.load("spectrum-lora", "spectrum.json")
    yardstick = (f" Two seeds of the same task share {seeds['overlap']['mean']:.2f}." if seeds and seeds.get("overlap")
                 else "")
    return ["### Two unrelated tasks: TSD overlap", "", "```bash", command, "```", "",
            f"LoRA r = 8, seed 0, on multiemo (2-class sentiment) and on vitaminc (3-way fact verification; the run "
            f"of the vitaminc grid above): {shared}.{yardstick}", "",
            "![unrelated task overlap](results/spectrum-vitaminc/overlap.png)", ""]


def _kind(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]


def _sigma_facts(report: dict) -> str:
    """The pretrained spectra themselves: how small the smallest σ are, per layer type."""
    label = next(iter(report["layers"]))
    by: dict[str, list[float]] = {}
    for name, info in report["layers"][label].items():
        by.setdefault(_kind(name), []).append(info["sigma"][-1] / info["sigma"][0])
    parts = [f"{kind} {min(v):.1e}–{max(v):.1e}" for kind, v in sorted(by.items())]
    return ("Smallest over largest singular value of the pretrained weights, per layer type: " + "; ".join(parts)
            + ". The change rate divides by σ_i, so where a weight is nearly rank-deficient its near-null "
            "directions get the largest rates from a tiny projection.")


def capture_section() -> list[str]:
    result = inputs.load("capture-multiemo", "capture.json")
    if result is None:
        return ["## TSD capture along training", "", "_Not run._", ""]
    cfg = result["config"]
    lines = ["## TSD capture along training: LoRA against a full fine-tune (MiniLM, multiemo)", "",
             "```bash",
             f"lora-tsd analyze capture --model {cfg['model']} --task {cfg['task']} --steps {cfg['steps']} "
             f"--every 10 --max-train {cfg['max_train']} --max-eval {cfg['max_eval']} --r {cfg['r']} "
             f"--lr {cfg['lr']:g} "
             f"--full-lr {result['full_lr']:g} --out capture-multiemo", "```", "",
             f"Reference: the TSDs (top change rates) of a full fine-tune of the same model on the same data for "
             f"{cfg['steps']} steps at lr {result['full_lr']:g} (test accuracy "
             f"{pct(result.get('full_ft_test', {}).get('accuracy'))} %); LoRA r={cfg['r']} at lr {cfg['lr']:g} "
             f"(test accuracy {pct(result.get('lora_test', {}).get('accuracy'))} %). Accuracy = share of LoRA's "
             f"top-{result['n_pred']} inside the reference top-{result['n_acc']}; recall = share of the reference "
             f"top-{result['n_recall']} inside LoRA's top-{result['n_pred']}; mean over the "
             f"{len(result['reference_layers'])} adapted layers. Random directions: accuracy "
             f"{result['chance']['accuracy']:.3f}, recall {result['chance']['recall']:.3f}.", "",
             "| step | " + " | ".join(f"{label}: accuracy / recall / layers with full recall" for label in
                                      result["series"]) + " |", "|" + "---|" * (1 + len(result["series"]))]
    steps = sorted({s for ser in result["series"].values() for s in ser["steps"]})
    for step in steps:
        cells = []
        for ser in result["series"].values():
            if step in ser["steps"]:
                i = ser["steps"].index(step)
                cells.append(f"{ser['accuracy'][i]:.2f} / {ser['recall'][i]:.2f} / {pct(ser['recall_event'][i], 0)} %")
            else:
                cells.append("–")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    ref = result["reference_summary"]["all"]
    lines += ["", f"The reference's own TSDs: mean position {ref['mean_position']:.2f} (0 = largest σ), "
              f"{pct(ref['share_in_bottom_decile'], 0)} % in the bottom σ decile, "
              f"{pct(ref['share_in_top_decile'], 0)} % in the top decile; n90 {ref['mean_n90']:.1f} of "
              f"k ≈ {ref['mean_k']:.0f}; core energy share {pct(ref['mean_core_energy_share'])} %.", "",
              "![capture](results/capture-multiemo/capture.png)", "",
              "![reference spectra](results/capture-multiemo/spectra_full_fine-tune.png)", ""]
    return lines
