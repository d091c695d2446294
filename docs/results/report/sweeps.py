"""The learning-rate sweep statements: what tuning the lr changed, and the equal-budget comparison."""

from __future__ import annotations

from lora_tsd.app.experiments.grid_report import signed_pp
from report import inputs
from report.paired import diff_ci, sweep_pairs, task_grid_paired


def sweep_statement(sweep: str, fixed: str) -> list[str]:
    """What tuning the lr changed: each method's chosen lr, and its paired difference to the baseline at the
    chosen lrs against the same difference at the fixed lr of the untuned grid (same task, rank and seeds)."""
    results = inputs.load(sweep, "results.json")
    picks = [f"`{c['method']}` r = {c['r']}: lr {c['lr']:g}" for c in (results or {}).get("selection", [])]
    if not picks:
        return []
    parts = [f"`{p['method']}` − LoRA on `{p['task']}` r = {p['r']}: {diff_ci(p)} (n = {p['n']}) with each lr "
             "tuned, " + (f"against {diff_ci(q)} (n = {q['n']}) with both at lr 0.001" if q is not None
                          else "(no untuned counterpart was run)") for p, q in sweep_pairs(sweep, fixed)]
    task, seeds = inputs.TASK_GRIDS.get(fixed, fixed), ", ".join(map(str, results["spec"]["tune_seeds"]))
    return [f"{task[0].upper()}{task[1:]}, chosen on validation (seeds {seeds}): "
            + "; ".join(picks) + ". " + ("Paired test difference (points, 95 % CI): " + "; ".join(parts) + "."
                                        if parts else ""), ""]


def equal_budget_statement() -> list[str]:
    """Whether the pre-launch's directions are worse or only its budget shorter: the 300-step rows against LoRA."""
    parts = [f"`{p['method']}` on `{p['task']}` r = {p['r']}: {signed_pp(p['diff_mean'])} "
             f"[{signed_pp(p['ci_low'])}, {signed_pp(p['ci_high'])}] (n = {p['n']})" for _, p in task_grid_paired()
             if p["method"].endswith("init_estimator=prelaunch,steps=300") and p["n"] >= 2 and p["ci_low"] is not None]
    if not parts:
        return []
    return ["Are the pre-launch's directions worse, or is only its budget shorter? Given 200 steps after its "
            "switch, as many as LoRA trains (300 steps in all, 1.5× LoRA's; the pre-launch adapter is still "
            "thrown away), the pre-launch protocol minus 200-step LoRA, paired by seed (test accuracy, points, "
            "95 % CI): " + "; ".join(parts) + ".", ""]


SWEEP_NOTE = (
    "One of the tuned comparisons on this page: every method of the grid ({methods}) gets the same budget, "
    "lr ∈ {{0.0005, "
    "0.001, 0.003}} on seeds 0 and 1; the lr with the best mean validation accuracy is chosen per method and "
    "rank, the other seeds run at it only, and test accuracy is reported at the chosen lr over all five seeds. "
    "The lr 0.001 runs are the {fixed} grid's own (carried with `--reuse`). Protocol otherwise as above.")


GRADIENT_NOTE = (
    "`init:init_estimator=prelaunch` is LoRA-Init as the paper describes it (method.md §4) and as this library "
    "ran it by default before 0.2: t = 100 steps of LoRA, then the switch, the probe adapter discarded, so its "
    "final adapter trains for the remaining 100 of the 200 steps. `init:init_estimator=gradient` (the default "
    "from 0.2 on) ranks the directions by |u_iᵀ G v_i| / σ_i of the full-weight gradient G over the first 8 "
    "batches and switches at step 0, so its adapter trains for all 200 steps, as LoRA's does. "
    "`init:init_estimator=prelaunch,steps=300` gives the pre-launch protocol 200 steps after its switch (300 in "
    "all, 1.5× LoRA's steps): it separates where the adapter starts from how many steps it gets. The same holds "
    "for the `tsd:` rows.")
