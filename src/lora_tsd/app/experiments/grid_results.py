"""A grid's results: one record per finished or failed run (from its run folder or carried over), the
learning rate each (task, method, rank) group chose on validation, the mean ± std summary and the paired
differences to the baseline with their confidence intervals, and the averaged learning curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lora_tsd.app.experiments.grid import GridSpec, all_keys, groups
from lora_tsd.app.experiments.grid_state import (
    FAILED_FILE,
    carried_run,
    comparable_settings,
    load_reused,
    run_status,
)
from lora_tsd.app.experiments.statistics import confidence_interval, mean_std


def _losses(path: Path, last: int = 10) -> tuple[float | None, list[list[float]] | None]:
    """From one read of a run's metrics log: the mean loss of the last ``last`` steps, and the loss curve
    ``[[step, loss], ...]`` (finite losses, 5 significant digits), kept in results.json so a run carried to
    another machine with ``--reuse`` keeps its learning curve. ``(None, None)`` without a log."""
    log = path / "metrics.jsonl"
    if not log.is_file():
        return None, None
    steps = [r for r in _read_jsonl(log) if r.get("event") == "step"]
    losses = [r["loss"] for r in steps]
    final = sum(losses[-last:]) / len(losses[-last:]) if losses else None
    curve = [[r["step"], float(f"{r['loss']:.5g}")] for r in steps
             if isinstance(r.get("loss"), int | float) and math.isfinite(r["loss"])]
    return final, curve


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def collect_runs(spec: GridSpec, out: str | Path) -> list[dict[str, Any]]:
    """One record per finished or failed run of the grid, in grid order: its run folder, else a reused run."""
    from lora_tsd.app.workflow.outputs import RUN_MARKER

    out = Path(out)
    reused = load_reused(out)
    rows = []
    for key in all_keys(spec):
        path = key.path(out)
        carried = carried_run(key, out, reused)
        if carried is not None:
            rows.append(dict(carried))
            continue
        status = run_status(path)
        if status not in ("done", "failed"):
            continue
        row: dict[str, Any] = {"task": key.task, "method": key.variant.label, "base_method": key.variant.method,
                               "r": key.r, "lr": key.lr, "seed": key.seed, "status": status,
                               "run_dir": str(path.relative_to(out))}
        if status == "done":
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
            after, before = summary["metrics_after"], summary["metrics_before"]
            for split in ("validation", "test"):
                for name, value in after.get(split, {}).items():
                    row[f"{'val' if split == 'validation' else 'test'}_{name}"] = value
            for name, value in before.get("test", {}).items():
                row[f"before_test_{name}"] = value
            final_loss, curve = _losses(path)
            row.update(steps=summary["config"]["steps"], switch_step=summary.get("switch_step"),
                       trainable_parameters=summary["model"]["trainable_parameters"],
                       final_train_loss=final_loss, wall_time_s=summary.get("wall_time_s"), loss_curve=curve,
                       config=comparable_settings(summary["config"]),
                       # The run ended collapsed (the safeguard's verdict; None for runs made before it existed),
                       # and how many test examples its accuracy counts (for chance margins).
                       collapsed=summary["collapse"] is not None if "collapse" in summary else None,
                       test_examples=summary.get("data", {}).get("sizes", {}).get("test"))
        else:
            row["error"] = json.loads((path / FAILED_FILE).read_text(encoding="utf-8")).get("error")
            marker = path / RUN_MARKER
            if marker.is_file():
                row["config"] = comparable_settings(json.loads(marker.read_text(encoding="utf-8")))
        rows.append(row)
    return rows


def lr_scores(spec: GridSpec, rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[float, float | None]]:
    """Mean validation metric per lr over the tuning seeds: ``-inf`` if a run failed, None if incomplete."""
    metric = f"val_{spec.metric}"
    index = {(r["task"], r["method"], r["r"], r["lr"], r["seed"]): r for r in rows}
    scores: dict[tuple[str, str, int], dict[float, float | None]] = {}
    seeds = spec.tuning_seeds if len(spec.lrs) > 1 else spec.seeds
    for task, variant, r in groups(spec):
        per_lr: dict[float, float | None] = {}
        for lr in spec.lrs:
            found = [index.get((task, variant.label, r, lr, s)) for s in seeds]
            if any(f is not None and f["status"] == "failed" for f in found):
                per_lr[lr] = -math.inf
            elif any(f is None for f in found):
                per_lr[lr] = None
            else:
                per_lr[lr] = sum(f[metric] for f in found) / len(found)
        scores[(task, variant.label, r)] = per_lr
    return scores


def choose_lrs(spec: GridSpec, rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    """The lr of each (task, method, r) group: best mean validation metric on the tuning seeds (ties: first lr)."""
    if len(spec.lrs) == 1:
        return {g: spec.lrs[0] for g in ((t, v.label, r) for t, v, r in groups(spec))}
    chosen = {}
    for group, per_lr in lr_scores(spec, rows).items():
        if any(v is None for v in per_lr.values()):
            continue  # the sweep of this group is unfinished
        best = max(spec.lrs, key=lambda lr: (per_lr[lr], -spec.lrs.index(lr)))
        if per_lr[best] != -math.inf:
            chosen[group] = best
    return chosen


def summarize(spec: GridSpec, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per group at its chosen lr: mean/std of val and test; paired test differences to the baseline."""
    chosen = choose_lrs(spec, rows)
    metric = spec.metric
    final: dict[tuple[str, str, int], dict[int, dict[str, Any]]] = {}
    for row in rows:
        group = (row["task"], row["method"], row["r"])
        if chosen.get(group) == row["lr"] and row["status"] == "done":
            final.setdefault(group, {})[row["seed"]] = row
    summary = []
    for task, variant, r in groups(spec):
        group = (task, variant.label, r)
        runs = final.get(group, {})
        seeds = sorted(runs)
        test = [runs[s][f"test_{metric}"] for s in seeds]
        val = [runs[s][f"val_{metric}"] for s in seeds]
        before = [runs[s].get(f"before_test_{metric}") for s in seeds]
        before = [b for b in before if b is not None]
        tm, ts = mean_std(test)
        vm, vs = mean_std(val)
        summary.append({"task": task, "method": variant.label, "base_method": variant.method, "r": r,
                        "lr": chosen.get(group), "n": len(seeds), "seeds": seeds, "test_mean": tm, "test_std": ts,
                        "val_mean": vm, "val_std": vs, "before_test_mean": mean_std(before)[0] if before else None,
                        "trainable_parameters": runs[seeds[0]]["trainable_parameters"] if seeds else None})
    paired = []
    for task, variant, r in groups(spec):
        if variant.label == spec.baseline:
            continue
        mine, base = final.get((task, variant.label, r), {}), final.get((task, spec.baseline, r), {})
        seeds = sorted(set(mine) & set(base))
        if not base:
            continue
        diffs = [mine[s][f"test_{metric}"] - base[s][f"test_{metric}"] for s in seeds]
        mean, low, high = confidence_interval(diffs) if diffs else (math.nan, math.nan, math.nan)
        _, std = mean_std(diffs)
        paired.append({"task": task, "method": variant.label, "r": r, "baseline": spec.baseline, "n": len(seeds),
                       "seeds": seeds, "diff_mean": mean, "diff_std": std, "ci_low": low, "ci_high": high,
                       "diffs": diffs})
    return summary, paired


def learning_curves(spec: GridSpec, rows: list[dict[str, Any]], chosen: dict, task: str,
                    r: int) -> dict[str, dict[str, Any]]:
    """Per method at its chosen lr: training loss per step averaged over seeds, and the switch step.

    Runs without a ``loss_curve`` (carried by ``--reuse`` from results written before curves were kept) are
    left out; ``seeds`` says how many runs each curve averages.
    """
    curves = {}
    for variant in spec.methods:
        lr = chosen.get((task, variant.label, r))
        runs = [row for row in rows if (row["task"], row["method"], row["r"], row["lr"]) ==
                (task, variant.label, r, lr) and row["status"] == "done" and row.get("loss_curve")]
        if not runs:
            continue
        per_step: dict[int, list[float]] = {}
        switch = next((row["switch_step"] for row in runs if row.get("switch_step") is not None), None)
        for row in runs:
            for step, loss in row["loss_curve"]:
                per_step.setdefault(int(step), []).append(loss)
        steps = sorted(per_step)
        curves[variant.label] = {"steps": steps, "loss": [sum(per_step[s]) / len(per_step[s]) for s in steps],
                                 "switch": switch, "seeds": len(runs)}
    return curves

