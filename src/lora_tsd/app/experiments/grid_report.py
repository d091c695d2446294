"""A grid's outputs: results.csv (one row per run), results.json, the markdown tables of results.md (mean ±
std, paired differences with their intervals, the learning-rate sweep) and the plots."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_tsd.app.experiments.grid import GridSpec, groups, lr_text, run_slug
from lora_tsd.app.experiments.grid_results import choose_lrs, collect_runs, learning_curves, lr_scores, summarize
from lora_tsd.app.formats import finite_or_none
from lora_tsd.atomic import atomic_write, atomic_write_json


def write_csv(rows: list[dict[str, Any]], path: Path, chosen: dict[tuple[str, str, int], float]) -> None:
    first = ["task", "method", "base_method", "r", "lr", "seed", "status", "chosen_lr"]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in first and k not in keys
                 and k not in ("run_dir", "error", "reused_from", "loss_curve", "config")]  # both stay in results.json
    metric_keys = sorted(k for k in keys if k.startswith(("val_", "test_", "before_test_")))
    rest = [k for k in keys if k not in metric_keys]
    header = first + metric_keys + rest + ["run_dir", "error"] + (
        ["reused_from"] if any("reused_from" in row for row in rows) else [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = dict(row, chosen_lr=chosen.get((row["task"], row["method"], row["r"])) == row["lr"])
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in header})
    text = buffer.getvalue()
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def signed_pp(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def _columns(spec: GridSpec) -> list[tuple[str, int]]:
    return [(t, r) for t in spec.tasks for r in spec.ranks]


def _col_name(task: str, r: int, spec: GridSpec) -> str:
    return task if len(spec.ranks) == 1 else f"{task} r={r}"


def markdown_report(spec: GridSpec, rows: list[dict[str, Any]], summary: list[dict[str, Any]],
                    paired: list[dict[str, Any]], command: str | None = None, plots: Sequence[str] = ()) -> str:
    metric = spec.metric
    cols = _columns(spec)
    by = {(s["task"], s["method"], s["r"]): s for s in summary}
    lines = [f"# Method comparison on `{spec.model}`", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    base = ", ".join(f"{k}={v}" for k, v in sorted(spec.base.items())) or "defaults"
    tune = "all seeds" if spec.tune_seeds is None else f"seed(s) {', '.join(map(str, spec.tuning_seeds))}"
    lines += [f"Seeds {', '.join(map(str, spec.seeds))}; rank(s) {', '.join(map(str, spec.ranks))}; "
              f"learning rates {', '.join(lr_text(lr) for lr in spec.lrs)}"
              + (f" (swept on {tune}, best mean validation {metric} per task, method and rank)"
                 if len(spec.lrs) > 1 else "") + f"; fixed options: {base}.", ""]
    lines += [f"## Test {metric} (%), mean ± std over seeds, at the chosen learning rate", ""]
    header = ["method", *(_col_name(t, r, spec) for t, r in cols)]
    with_avg = len(cols) > 1
    if with_avg:
        header.append("mean")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # The untrained model depends on the seed only (head initialization), so average over seeds, not over
    # methods: a method with fewer finished seeds must not tilt the row.
    before_cells = []
    for t, r in cols:
        per_seed: dict[int, list[float]] = {}
        for row in rows:
            value = row.get(f"before_test_{metric}")
            if row["task"] == t and row["r"] == r and row["status"] == "done" and value is not None:
                per_seed.setdefault(row["seed"], []).append(value)
        values = [sum(v) / len(v) for v in per_seed.values()]
        before_cells.append(pct(sum(values) / len(values)) if values else "–")
    lines.append("| untrained | " + " | ".join(before_cells) + (" | |" if with_avg else " |"))
    for variant in spec.methods:
        cells, means = [], []
        for t, r in cols:
            s = by.get((t, variant.label, r))
            if s is None or not s["n"]:
                cells.append("–")
                continue
            spread = f" ± {pct(s['test_std'])}" if s["n"] > 1 else ""
            cells.append(f"{pct(s['test_mean'])}{spread}" + (f" (n={s['n']})" if s["n"] != len(spec.seeds) else ""))
            means.append(s["test_mean"])
        if with_avg:
            cells.append(pct(sum(means) / len(means)) if len(means) == len(cols) else "–")
        lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
    lines.append("")
    if paired:
        lines += [f"## Paired difference to `{spec.baseline}` (test {metric}, percentage points), mean "
                  "[95 % CI over seeds]", "",
                  "Same seeds (same data order and head initialization), each method at its own chosen learning "
                  "rate; Student-t interval with n−1 degrees of freedom. **Bold**: the interval excludes 0.", ""]
        pby = {(p["task"], p["method"], p["r"]): p for p in paired}
        lines += ["| method | " + " | ".join(_col_name(t, r, spec) for t, r in cols) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for variant in spec.methods:
            if variant.label == spec.baseline:
                continue
            cells = []
            for t, r in cols:
                p = pby.get((t, variant.label, r))
                if p is None or not p["n"]:
                    cells.append("–")
                elif p["n"] < 2:
                    cells.append(f"{signed_pp(p['diff_mean'])} (n=1)")
                else:
                    text = f"{signed_pp(p['diff_mean'])} [{signed_pp(p['ci_low'])}, {signed_pp(p['ci_high'])}]"
                    cells.append(f"**{text}**" if p["ci_low"] > 0 or p["ci_high"] < 0 else text)
            lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(spec.lrs) > 1:
        lines += [f"## Learning-rate sweep: mean validation {metric} (%) on the tuning seeds", ""]
        scores = lr_scores(spec, rows)
        chosen = choose_lrs(spec, rows)
        lines += ["| task | method | r | " + " | ".join(f"lr {lr_text(lr)}" for lr in spec.lrs) + " | chosen |",
                  "|" + "---|" * (len(spec.lrs) + 4)]
        for t, v, r in groups(spec):
            per = scores[(t, v.label, r)]
            cells = ["failed" if per[lr] == -math.inf else pct(per[lr]) for lr in spec.lrs]
            pick = chosen.get((t, v.label, r))
            lines.append(f"| {t} | {v.label} | {r} | " + " | ".join(cells) + f" | {lr_text(pick) if pick else '–'} |")
        lines.append("")
    params = {(s["method"], s["r"]): s["trainable_parameters"] for s in summary if s["trainable_parameters"]}
    if params:
        lines += ["Trainable parameters per run (adapter + classification head where there is one): "
                  + "; ".join(f"{m} r={r}: {n:,}" for (m, r), n in params.items()) + ".", ""]
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    compute = sum(r.get("wall_time_s") or 0 for r in done)
    lines += [f"Runs: {len(done)} finished, {len(failed)} failed; summed run wall time {compute / 60:.1f} min.", ""]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def write_outputs(spec: GridSpec, out: str | Path, command: str | None = None, plots: bool = True,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect the grid's runs and write results.csv/json/md and the plots; returns the results object."""
    out = Path(out)
    rows = collect_runs(spec, out)
    chosen = choose_lrs(spec, rows)
    summary, paired = summarize(spec, rows)
    made: list[str] = []
    if plots and any(r["status"] == "done" for r in rows):
        made = _make_plots(spec, out, rows, summary, chosen, say)
    write_csv(rows, out / "results.csv", chosen)
    results = {"command": command, "spec": spec.to_dict(), "runs": rows,
               "selection": [{"task": t, "method": m, "r": r, "lr": lr} for (t, m, r), lr in chosen.items()],
               "summary": summary, "paired": paired, "plots": made}
    atomic_write_json(out / "results.json", finite_or_none(results))
    text = markdown_report(spec, rows, summary, paired, command, made)
    atomic_write(out / "results.md", lambda p: p.write_text(text, encoding="utf-8"))
    return results


def _make_plots(spec: GridSpec, out: Path, rows, summary, chosen, say) -> list[str]:
    try:
        from lora_tsd.app.experiments import plots
    except ImportError as err:  # matplotlib is an optional extra
        say(f"plots skipped ({err}); pip install 'lora-tsd[plots]'")
        return []
    made = []
    labels = [v.label for v in spec.methods]
    panels = []
    for t, r in _columns(spec):
        points = {}
        for variant in spec.methods:
            lr = chosen.get((t, variant.label, r))
            points[variant.label] = [row[f"test_{spec.metric}"] for row in rows
                                     if (row["task"], row["method"], row["r"], row["lr"]) == (t, variant.label, r, lr)
                                     and row["status"] == "done"]
        panels.append((_col_name(t, r, spec), points))
    plots.plot_accuracy(panels, labels, out / "accuracy.png", ylabel=f"test {spec.metric}",
                        title=f"{spec.model}: test {spec.metric} at the chosen lr (mean ± std, dots: seeds)")
    made.append("accuracy.png")
    for t, r in _columns(spec):
        curves = learning_curves(spec, rows, chosen, t, r)
        if not curves:
            continue
        name = f"curves_{run_slug(t)}_r{r}.png"
        plots.plot_learning_curves(curves, out / name, title=f"{spec.model} on {t}, r={r}: training loss "
                                   "(mean over seeds; dashed: switch step)")
        made.append(name)
    return made

