"""The ablation section: each ``method:key=value`` variant minus its reference, and the defaults decision."""

from __future__ import annotations

import re

from lora_tsd.app.experiments.grid_report import signed_pp
from lora_tsd.app.experiments.statistics import confidence_interval
from report import inputs
from report.paired import diff_ci, prelaunch_label, sweep_pairs, task_grid_paired
from report.sweeps import equal_budget_statement

# What each ablation family varies, and the library default it is measured against (method.md, TSDConfig).
ABLATION_FAMILIES = {
    "selector": ("which directions get the dash", "tsd (change-rate ranking)"),
    "dash_directions": ("s, the number of dash directions", "8"),
    "prelaunch_steps": ("t, the pre-launch steps before the switch", "100"),
    "init_estimator": ("how LoRA-Init / LoRA-TSD rank their init directions: gradient probe at step 0",
                       "pre-launch"),
    "dash_placement": ("where LoRA-TSD puts its dash", "shared"),
    "steps": ("the step budget: 300, so 200 steps follow the switch at t = 100", "200 steps"),
}


def variant_differences(grid: str) -> list[dict]:
    """Each ``method:key=value`` variant of a grid minus its reference (the same method with the grid's pre-launch
    protocol) on the same seeds: one record per variant and rank, with the paired mean and 95 % interval."""
    results = inputs.load(grid, "results.json")
    if results is None:
        return []
    task = results["spec"]["tasks"][0]
    # A sweep grid holds several lrs per method: each method counts at the lr its sweep chose (unfinished: none).
    tuned = len(results["spec"]["lrs"]) > 1
    chosen = {(c["method"], c["r"]): c["lr"] for c in results.get("selection", [])}
    acc = {(r["method"], r["r"], r["seed"]): r["test_accuracy"] for r in results["runs"]
           if r["status"] == "done" and (not tuned or chosen.get((r["method"], r["r"])) == r["lr"])}
    out = []
    methods = results["spec"]["methods"]
    for variant in (m for m in methods if ":" in m):
        method, change = variant.split(":", 1)
        base = prelaunch_label(methods, method)
        if base is None or base == variant:
            continue
        family = next((f for f in ABLATION_FAMILIES if f in change.replace("init_estimator=prelaunch", "")), None)
        for r in results["spec"]["ranks"]:
            seeds = sorted(s for (m, rank, s) in acc if m == variant and rank == r and (base, r, s) in acc)
            diffs = [acc[(variant, r, s)] - acc[(base, r, s)] for s in seeds]
            if not diffs:
                continue
            mean, low, high = confidence_interval(diffs)
            interval = len(diffs) >= 2 and len(set(diffs)) > 1  # one seed, or zero variance: no interval
            out.append({"variant": variant, "base": base, "task": task, "r": r, "family": family, "n": len(diffs),
                        "mean": mean, "low": low if interval else None, "high": high if interval else None,
                        "tuned": tuned})
    return out


def _beyond(d: dict, sign: int) -> bool:
    """Whether the interval of a variant record lies wholly above (sign 1) or below (sign −1) zero."""
    return d["low"] is not None and (d["low"] > 0 if sign > 0 else d["high"] < 0)


def defaults_section() -> list[str]:
    """Each variant (ablation grid, and the estimator and step-budget rows of the task grids) against its reference."""
    records = [d for grid in ("minilm-ablations", *inputs.TASK_GRIDS, *inputs.SWEEP_GRIDS)
               for d in variant_differences(grid)]
    if not records:
        return []
    rows = []
    for d in records:
        what, default = ABLATION_FAMILIES.get(d["family"], ("", ""))
        budget = re.search(r"(?:^|,)steps=(\d+)", d["variant"].split(":", 1)[1])
        if budget and d["family"] != "steps":  # e.g. t = 200, which needs a longer run to leave steps after it
            what += f", in a run of {budget.group(1)} steps"
        ci = (f"[{signed_pp(d['low'])}, {signed_pp(d['high'])}]" if d["low"] is not None else
              "(one seed: no interval)" if d["n"] == 1 else "(zero variance: no interval)")
        where = f"`{d['task']}` r = {d['r']}" + (", each lr tuned" if d["tuned"] else "")
        rows.append(f"| `{d['variant']}` | `{d['base']}` | {where} | {what} (reference: "
                    f"{default}) | {d['n']} | {signed_pp(d['mean'])} {ci} |")
    moved = [f"`{d['variant']}` on `{d['task']}` r = {d['r']} ({signed_pp(d['mean'])} pp)" for d in records
             if _beyond(d, 1) or _beyond(d, -1)]
    degenerate = sorted({f"`{d['variant']}`" for d in records if d["n"] >= 2 and d["low"] is None})
    verdict = ("Variants whose interval excludes zero against their reference: " + ", ".join(moved) + "." if moved else
               "**No variant differs from its reference beyond its interval**.")
    if degenerate:
        verdict += (" Degenerate intervals (every seed gave the same difference, so the sample variance is 0, which "
                    "is not evidence): " + ", ".join(degenerate) + ".")
    return ["### Ablations against the library defaults", "",
            "Each variant minus its reference, the same method with the pre-launch protocol of the grid (`dash`, "
            "`init:init_estimator=prelaunch` or `tsd:init_estimator=prelaunch`), on the same seed: test accuracy "
            "in points, mean [95 % Student-t CI over seeds] (`lora_tsd.compare.confidence_interval`); the ablation "
            "grid above, the estimator and step-budget rows of the task grids (lr 1e-3), and those of the "
            "learning-rate sweeps, where each of the two has its own chosen lr (\"each lr tuned\").",
            "", "| variant | reference | task | what it changes | seeds | difference to the reference |",
            "|---|---|---|---|---|---|", *rows, "", verdict, "", *defaults_decision(records), ""]


def defaults_decision(records: list[dict]) -> list[str]:
    """What this page concludes about the library defaults, with the counts read from the variant records."""
    estimator = [d for d in records if d["variant"] in ("init:init_estimator=gradient", "tsd:init_estimator=gradient")]
    ahead = sum(d["mean"] > 0 for d in estimator)
    beyond, behind = sum(_beyond(d, 1) for d in estimator), sum(_beyond(d, -1) for d in estimator)
    others = [f"`{d['variant']}`" for d in records
              if d["family"] in ("selector", "dash_directions", "prelaunch_steps", "dash_placement") and _beyond(d, 1)]
    return [
        f"What the defaults are, and why: of the {len(estimator)} gradient-estimator rows above (LoRA-Init and "
        f"LoRA-TSD, every task and rank where both estimators ran), the gradient estimator is ahead of the "
        f"pre-launch in {ahead}, ahead beyond its interval in {beyond}, and behind beyond its interval in "
        f"{behind}. From "
        "lora-tsd 0.2 on, `init` and `tsd` therefore rank by the gradient probe by default "
        "(`TSDConfig.init_estimator` unset → `gradient`, unless `prelaunch_steps` ≥ 1 asks for a pre-launch): "
        "under a fixed step budget the pre-launch spends t steps on an adapter that the switch throws away, "
        "while the probe costs 8 forward/backward passes and no optimizer step. In one's own training loop that "
        "means calling `lora_tsd.gradient_probe(model, batches, loss_fn)` before the first step (the command "
        "line and `TSDCallback` do it themselves; `lora_tsd.step` says so if it was forgotten). The paper's "
        "procedure stays one option away: `init_estimator=\"prelaunch\"` (`--init-estimator prelaunch`, or "
        "any `--prelaunch-steps`); every earlier run on this page is labelled `init:init_estimator=prelaunch` / "
        "`tsd:init_estimator=prelaunch`, which is what it ran. The other defaults (s = 8, t = 100, the "
        "change-rate selector, the shared dash placement) stay: "
        + (f"variants ahead of them beyond the interval: {', '.join(others)} (see the rows)." if others else
           "no variant of them is ahead beyond its interval."), "", *default_vs_lora_statement(),
        *equal_budget_statement()]


def default_vs_lora_statement() -> list[str]:
    """The 0.2 default (gradient estimator) against LoRA itself, cell by cell: better than the pre-launch is not
    better than LoRA."""
    cells = [p for _, p in task_grid_paired()
             if p["method"] in ("init:init_estimator=gradient", "tsd:init_estimator=gradient") and p["n"] >= 2]
    if not cells:
        return []
    below = [f"`{p['method']}` on `{p['task']}` r = {p['r']} ({signed_pp(p['diff_mean'])} [{signed_pp(p['ci_low'])}, "
             f"{signed_pp(p['ci_high'])}])" for p in cells if p["ci_high"] is not None and p["ci_high"] < 0]
    above = sum(p["ci_low"] is not None and p["ci_low"] > 0 for p in cells)
    return [f"Against LoRA itself (same seeds, same 200 steps), the gradient-estimator rows of the task grids are "
            f"ahead in {sum(p['diff_mean'] > 0 for p in cells)} of {len(cells)} cells, ahead beyond the interval "
            f"in {above}, and behind beyond it in {len(below)}" + (": " + ", ".join(below) if below else "")
            + ". The default is the better of the two estimators, not a method shown to beat LoRA at this scale.",
            "", *tuned_vs_lora_statement()]


def tuned_vs_lora_statement() -> list[str]:
    """The same question where both methods had their lr tuned (the sweep grids)."""
    cells = [p for sweep, fixed in inputs.SWEEP_GRIDS.items() for p, _ in sweep_pairs(sweep, fixed)
             if p["method"] == "init:init_estimator=gradient"]
    if not cells:
        return []
    shown = "; ".join(f"`{p['task']}` r = {p['r']}: {diff_ci(p)}" for p in cells)
    above = sum(p["ci_low"] > 0 for p in cells)
    below = sum(p["ci_high"] < 0 for p in cells)
    return [f"With the lr tuned for both (the learning-rate sweep sections), LoRA-Init (gradient) minus LoRA: {shown}"
            f" — ahead beyond the interval in {above} of {len(cells)} cells, behind beyond it in {below}.", ""]
