"""The whole of results.md, section by section, from the files in docs/results."""

from __future__ import annotations

from report import inputs
from report.ablations import defaults_section
from report.coverage import coverage_table, smollm2_coverage
from report.headline import grid_section
from report.paired import tsd_vs_init_gap
from report.paper import paper_section
from report.recipe import recipe_section
from report.spectra import capture_section, dash_share_section, init_start_section, spectrum_section, tasks_section
from report.sweeps import GRADIENT_NOTE, SWEEP_NOTE, sweep_statement


def render_report() -> str:
    """The whole of results.md, from the files in this folder."""
    grid = inputs.load("minilm-multiemo", "results.json")
    minutes = sorted(r["wall_time_s"] / 60 for r in (grid or {}).get("runs", []) if r.get("wall_time_s"))
    head = (inputs.HERE / "head.md").read_text().replace(
        "{run_minutes}", f"{minutes[0]:.0f}–{minutes[-1]:.0f}" if minutes else "–")
    tail = (inputs.HERE / "tail.md").read_text().replace("{tsd_init_gap}", tsd_vs_init_gap()).replace(
        "{coverage}", "\n".join(coverage_table())).replace(
        "{smollm2_coverage}", "\n".join(smollm2_coverage()))
    lines = [head.rstrip(), ""]
    lines += recipe_section()
    lines += grid_section("minilm-multiemo",
                          "MiniLM on BIG-bench multiemo (2-class sentiment), {ranks}, {methods} methods")
    lines += grid_section(
        "minilm-multiemo4", "MiniLM on multiemo 4-class (ambivalent / negative / neutral / positive), {ranks}, "
        "{methods} methods", GRADIENT_NOTE)
    lines += grid_section(
        "minilm-hyperbaton", "MiniLM on hyperbaton (adjective order, 2-way), {ranks}, {methods} methods",
        "hyperbaton (BIG-bench): which of two phrases puts its adjectives in the right English order (`a` or `b`), "
        "a syntactic task with nothing of sentiment in it; the third MiniLM task because vitaminc (next) is not "
        "learned at this budget. Protocol as above (2,000 training examples, 400 validation and 400 test "
        "examples, 200 steps, lr 1e-3 for every method). " + GRADIENT_NOTE)
    for sweep, fixed in inputs.SWEEP_GRIDS.items():
        lines += grid_section(
            sweep, f"Learning-rate sweep on {inputs.TASK_GRIDS[fixed]}, {{ranks}}, {{methods}} methods",
            SWEEP_NOTE.format(fixed=inputs.TASK_GRIDS[fixed], methods=", ".join(
                f"`{m}`" for m in (inputs.load(sweep, "results.json") or {}).get("spec", {}).get("methods", []))))
        lines += sweep_statement(sweep, fixed)
    lines += grid_section(
        "minilm-tasks", "MiniLM on vitaminc (3-way fact verification), {ranks}, {methods} methods",
        "Protocol as for 2-class multiemo (lr 1e-3 for every method, not tuned).")
    lines += grid_section(
        "smollm2-grid", "SmolLM2-135M on two commonsense multiple-choice tasks (strategyqa, social_iqa), {ranks}, "
        "{methods} methods",
        "SmolLM2 protocol: the q, k, v, up and down projections of the 30 decoder layers adapted (150 matrices, "
        "the library's default for LLaMA-type models, as in the paper), answer-only loss, each answer scored by "
        "its summed log-likelihood (accuracy) and per-character (accuracy_norm); fp32 on the CPU (bf16 autocast "
        "is 13× slower on this machine), 150 optimizer steps of batch 8, sequences cut at 96 tokens, t = 50 "
        "pre-launch steps, lr 2e-3 (the train default) for every method, 200 validation and 200 test questions. "
        "The weights are dequantized from a 4-bit release (offline.md), so their small singular values carry "
        "quantization noise.")
    lines += grid_section(
        "minilm-ablations", "Ablations on MiniLM (multiemo, r = 8): direction selector, s, t, Init estimator, "
        "LoRA-TSD dash placement",
        "The `lora`, `dash`, `init:init_estimator=prelaunch` and `tsd:init_estimator=prelaunch` runs of this grid "
        "are seeds 0 and 1 of the first grid, copied into "
        "its folder (same configuration; `compare` skips finished runs), so every variant is paired with the same "
        "LoRA runs. Variants are `method:key=value`: `selector=top/bottom/random` replaces the change-rate ranking "
        "(the pre-launch still runs t = 100 steps, so only the choice of directions differs), `dash_directions` is "
        "s, `prelaunch_steps` is t (t = 200 runs 300 steps in all, `steps=300`, so that 100 steps follow its switch "
        "as they follow t = 100's in the 200-step runs; it also gets 1.5× LoRA's steps), "
        "`init_estimator=gradient` ranks by the gradient probe (8 batches) and switches before training, "
        "`dash_placement=next` puts LoRA-TSD's dash on ranks r+1…r+s.")
    lines += defaults_section()
    lines += spectrum_section()
    lines += dash_share_section()
    lines += init_start_section()
    lines += spectrum_section("spectrum-smollm2", "SmolLM2-135M, strategyqa",
                              "The LoRA and the LoRA-Dash adapter of seed 0 on strategyqa from the SmolLM2 grid "
                              "above (150 matrices each; weights dequantized from 4-bit; the two share the "
                              "pre-launch trajectory, so their overlap is not a task comparison)")
    lines += tasks_section()
    lines += capture_section()
    lines += paper_section()
    lines += [tail.rstrip(), ""]
    return "\n".join(lines)
