"""Paired differences read from the grids: a difference with its interval, the sweep pairs (tuned vs the
untuned grid it continues), the task grids' differences, and the labels a grid ran each estimator under."""

from __future__ import annotations

from lora_tsd.app.experiments.grid_report import signed_pp
from report import inputs


def prelaunch_label(methods: list[str], method: str) -> str | None:
    """The label under which a grid ran ``method`` with the pre-launch estimator: the explicit
    ``init:init_estimator=prelaunch`` (lora-tsd ≥ 0.2, where bare ``init`` means the gradient estimator), else the
    bare name (grids whose fixed ``prelaunch_steps`` ask for the pre-launch, and methods without an estimator)."""
    explicit = f"{method}:init_estimator=prelaunch"
    return explicit if explicit in methods else (method if method in methods else None)


def gradient_label(methods: list[str], method: str) -> str | None:
    """The label under which a grid ran ``method`` with the gradient estimator: ``init:init_estimator=gradient``,
    or with ``,prelaunch_steps=0`` added in grids whose fixed ``--prelaunch-steps`` would otherwise ask for a
    pre-launch (the SmolLM2 grid)."""
    labels = (f"{method}:init_estimator=gradient", f"{method}:init_estimator=gradient,prelaunch_steps=0")
    return next((label for label in labels if label in methods), None)


def task_grid_paired() -> list[tuple[str, dict]]:
    """(grid name, paired record) for every paired difference to LoRA in the MiniLM task grids."""
    return [(name, p) for name in inputs.TASK_GRIDS
            for p in (inputs.load(name, "results.json") or {}).get("paired", [])]


def dash_vs_lora() -> str:
    """Seed-by-seed test accuracy of dash against LoRA in the MiniLM task grids, per rank (computed, not typed)."""
    parts = []
    for name, p in task_grid_paired():
        if p["method"] == "dash" and p["n"]:
            same = sum(abs(d) < 1e-12 for d in p["diffs"])
            parts.append(f"{inputs.TASK_GRIDS[name]} r = {p['r']}: identical in {same} of {p['n']} seeds, largest gap "
                         f"{100 * max(abs(d) for d in p['diffs']):.2f} points")
    return (" Seed by seed, LoRA-Dash's test accuracy against LoRA's: " + "; ".join(parts) + "." if parts else "")


def tsd_vs_init_gap() -> str:
    """The largest gap between LoRA-TSD and LoRA-Init with the same estimator, over the cells where both ran."""
    gaps = []
    for name in inputs.TASK_GRIDS:
        results = inputs.load(name, "results.json") or {"runs": []}
        acc = {(r["method"], r["r"], r["seed"]): r["test_accuracy"] for r in results["runs"] if r["status"] == "done"}
        for (method, r, seed), value in acc.items():
            if method.startswith("init:") and ("tsd:" + method[5:], r, seed) in acc:
                gaps.append(abs(acc[("tsd:" + method[5:], r, seed)] - value))
    return f"{100 * max(gaps):.2f} points in {len(gaps)} paired runs" if gaps else "–"


def diff_ci(p: dict) -> str:
    """A paired difference with its interval, in points: ``−2.6 [−4.6, −0.5]``."""
    return f"{signed_pp(p['diff_mean'])} [{signed_pp(p['ci_low'])}, {signed_pp(p['ci_high'])}]"


def _has_interval(p: dict | None) -> bool:
    return p is not None and p["n"] >= 2 and p["ci_low"] is not None


def sweep_pairs(sweep: str, fixed: str) -> list[tuple[dict, dict | None]]:
    """Each paired difference of a sweep grid (each method at its chosen lr) with the same difference in the
    untuned grid it continues (same task, method, rank; None where that grid did not run it)."""
    results, untuned = inputs.load(sweep, "results.json"), inputs.load(fixed, "results.json")
    if results is None or untuned is None:
        return []
    old = {(p["task"], p["method"], p["r"]): p for p in untuned["paired"]}
    pairs = []
    for p in results["paired"]:
        if _has_interval(p):
            q = old.get((p["task"], p["method"], p["r"]))
            pairs.append((p, q if _has_interval(q) else None))
    return pairs
