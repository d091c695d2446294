"""The README headline (one table over the headline grids, the tuned cells) and each grid's section of the
report (its command, tables, plots and measured statements)."""

from __future__ import annotations

from lora_tsd.app.experiments.grid_report import pct, signed_pp
from report import inputs
from report.paired import diff_ci, sweep_pairs


def grid_section(name: str, title: str, notes: str = "") -> list[str]:
    """A grid's command, tables, plots and measured statements; ``notes`` (its protocol) follow when it ran."""
    results = inputs.load(name, "results.json")
    if results is None:
        bare = title.replace(", {methods} methods", "").replace(", {ranks}", "")
        return [f"## {bare}", "", "_Not run (see “What is missing”)._", ""]
    md = (inputs.HERE / name / "results.md").read_text()
    tables = md.split("\n## ", 1)[1] if "\n## " in md else ""
    tables = "### " + tables.replace("\n## ", "\n### ")
    tables = tables.replace("](", f"](results/{name}/")
    runs = [r for r in results["runs"] if r["status"] == "done"]
    wall = sum(r.get("wall_time_s") or 0 for r in runs)
    command = inputs.grid_command(results)
    count = len(results["spec"]["methods"])
    ranks = sorted({s["r"] for s in results["summary"]})
    rank_text = f"r = {ranks[0]}" if len(ranks) == 1 else "r ∈ {" + ", ".join(map(str, ranks)) + "}"
    title = title.format(methods=count, ranks=rank_text).replace("1 methods", "1 method")
    lines = [f"## {title}", "", "Command (the grid is resumable: re-running it trains only what is missing, then "
             "rewrites the tables):", "", "```bash", command, "```", "",
             f"Raw per-run results: [`results/{name}/results.csv`](results/{name}/results.csv) "
             f"({len(runs)} finished runs; summed run wall time {wall / 60:.0f} min on the 2-core CPU, "
             f"1 thread per run, two runs side by side).", ""]
    lines += [tables.rstrip(), ""]
    # Learning curves drawn by an earlier invocation from runs whose logs were not carried to this machine (the
    # runs are the same ones the tables report): still shown, and said so.
    for png in sorted((inputs.HERE / name).glob("curves_*.png")):
        if png.name not in results.get("plots", []):
            lines += [f"![{png.name}](results/{name}/{png.name})", "",
                      f"_{png.name}: drawn by an earlier invocation of this grid from the runs of earlier sessions "
                      "(their per-step logs were not carried over, so the current invocation cannot redraw it)._", ""]
    lines += headline_statements(results)
    return lines + ([notes, ""] if notes else [])


def headline_statements(results: dict) -> list[str]:
    spec = results["spec"]
    paired = results["paired"]
    out: list[str] = []
    if not paired:
        return out
    ranks = sorted({s["r"] for s in results["summary"]}, reverse=True)
    tasks = list(dict.fromkeys(s["task"] for s in results["summary"]))
    chosen = {(c["task"], c["method"], c["r"]): c["lr"] for c in results.get("selection", [])}

    def where(task: str, r: int) -> str:
        parts = ([f"`{task}`"] if len(tasks) > 1 else []) + ([f"r = {r}"] if len(ranks) > 1 else [])
        return ", ".join(parts)

    def name(p: dict) -> str:
        at = where(p["task"], p["r"])
        return f"`{p['method']}`" + (f" ({at})" if at else "")

    for task in tasks:
        for r in ranks:
            summary = {s["method"]: s for s in results["summary"] if s["r"] == r and s["task"] == task and s["n"]}
            base = summary.get(spec["baseline"])
            if base is None:
                continue
            # Rank only the methods with the baseline's seeds: one lucky seed must not top the cell.
            ranked = [s for s in summary.values() if s["n"] >= base["n"]]
            top = max(s["test_mean"] for s in ranked)
            best = [s for s in ranked if abs(s["test_mean"] - top) < 1e-12]
            names = " and ".join(f"**{s['method']}**" for s in best) + (" (tied)" if len(best) > 1 else "")
            at = where(task, r)
            out.append(f"Measured{f' ({at})' if at else ''}: the highest mean test accuracy is "
                       f"{names} ({pct(top)} %, n = {best[0]['n']}); `{spec['baseline']}` reaches "
                       f"{pct(base['test_mean'])} ± {pct(base['test_std'])} % (untrained head: "
                       f"{pct(base['before_test_mean'])} %).")
            # Only the runs the table reports: in a sweep, those at their method's chosen lr.
            low = [x for x in results["runs"] if x["status"] == "done" and x["r"] == r and x["task"] == task
                   and x["lr"] == chosen.get((task, x["method"], r)) and x["test_accuracy"] < base["test_mean"] - 0.15]
            if low:
                shown = ", ".join(f"`{x['method']}` seed {x['seed']} ({pct(x['test_accuracy'])} %)" for x in low)
                lr_note = "each at its method's chosen lr" if len(spec["lrs"]) > 1 else "the lr was not tuned"
                # Only the pre-launch protocol throws its adapter away mid-run; the gradient probe switches at 0.
                # Read it from what each run ran with, not from its label (a bare `init` is either).
                restart = any(x["config"]["method"] in ("init", "tsd") and x["config"]["init_estimator"] == "prelaunch"
                              for x in low)
                restart_note = ", and LoRA-Init / LoRA-TSD restart their adapter at the switch" if restart else ""
                out.append(f"Runs more than 15 pp below LoRA's mean (read them with the learning curves: {lr_note}"
                           f"{restart_note}): {shown}.")
            out.append("")
    excl = [p for p in paired if p["ci_low"] is not None and p["n"] >= 2 and (p["ci_low"] > 0 or p["ci_high"] < 0)]
    lines = [f"{name(p)} {signed_pp(p['diff_mean'])} pp [{signed_pp(p['ci_low'])}, {signed_pp(p['ci_high'])}]"
             for p in sorted(paired, key=lambda p: (-p["r"], -(p["diff_mean"] or 0)))
             if p["n"] >= 2 and p["ci_low"] is not None]
    out.append("Paired differences to LoRA over the same seeds (95 % CI): " + "; ".join(lines) + ".")
    out.append("")
    if excl:
        out.append("Intervals that exclude zero: " + ", ".join(f"{name(p)} ({signed_pp(p['diff_mean'])} pp)"
                                                            for p in excl) + ".")
    else:
        out.append("**No method's interval excludes zero**: at this scale and with this many seeds, no method is "
                   "distinguishable from LoRA.")
    out.append("")
    return out


def headline_table() -> list[str]:
    """Test accuracy per method and task over every headline grid, with the paired difference to LoRA."""
    cells: dict[tuple[tuple[str, int], str], str] = {}
    diffs: dict[tuple[tuple[str, int], str], dict] = {}  # the paired entries behind the cells' intervals
    columns: list[tuple[str, int]] = []
    methods: list[str] = []
    commands = []
    for name in inputs.HEADLINE_GRIDS:
        results = inputs.load(name, "results.json")
        if results is None:
            continue
        commands.append(inputs.grid_command(results))
        paired = {(p["task"], p["r"], p["method"]): p for p in results["paired"]}
        for s in results["summary"]:
            if not s["n"]:
                continue
            column, method = (s["task"], s["r"]), s["method"]
            columns += [column] if column not in columns else []
            methods += [method] if method not in methods else []
            cell = f"{pct(s['test_mean'])} ± {pct(s['test_std'])} (n={s['n']})"
            p = paired.get((*column, method))
            if p is not None and p["n"] >= 2 and p["ci_low"] is not None:
                cell += f"; {signed_pp(p['diff_mean'])} [{signed_pp(p['ci_low'])}, {signed_pp(p['ci_high'])}]"
                diffs[(column, method)] = p
            cells[(column, method)] = cell
    if not cells:
        return []
    first_seen = [t for t, _ in columns]
    columns.sort(key=lambda c: (-c[1], first_seen.index(c[0])))  # r = 8 first, then lower ranks
    lines = ["| method | " + " | ".join(f"`{t}` r={r}" for t, r in columns) + " |", "|---|" + "---|" * len(columns)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cells.get((c, method), "–") for c in columns) + " |")
    below = [f"{m} on {t} r={r}" for ((t, r), m), p in diffs.items() if p["ci_high"] < 0]
    above = [f"{m} on {t} r={r}" for ((t, r), m), p in diffs.items() if p["ci_low"] > 0]
    verdict = " ".join(
        ([f"Below LoRA beyond the interval: {', '.join(below)}."] if below else [])
        + ([f"Above LoRA beyond the interval: {', '.join(above)}."] if above else [])
        + ([] if above else ["No method beats LoRA beyond its interval."])
        + (["LoRA-Init and LoRA-TSD restart their adapter at the switch (step 100 of 200): see the report."]
           if any(name.startswith(("init:init_estimator=prelaunch ", "tsd:init_estimator=prelaunch "))
                  for name in below) else []))
    swept = [inputs.load(n, "results.json") for n in inputs.HEADLINE_GRIDS]
    swept = [f"`{t}`: the better of lr {' and '.join(f'{lr:g}' for lr in g['spec']['lrs'])} on validation, per method"
             for g in swept if g and len(g["spec"]["lrs"]) > 1 for t in g["spec"]["tasks"]]
    tuning = "lr 1e-3 for every method" + (f" ({'; '.join(swept)})" if swept else " (not tuned)")
    return [f"MiniLM (all-MiniLM-L6-v2), 200 steps, {tuning}, n seeds per cell. Test "
            "accuracy (%) mean ± std; after the semicolon the paired difference to LoRA in points with its 95 % "
            f"confidence interval over seeds. {verdict} Made by:", "",
            "```bash", *commands, "```", "", *lines, "", *collapsed_note(), *sweep_headline()]


def sweep_headline() -> list[str]:
    """The tuned cells, for the README: the table above is untuned, so show what tuning changed where it ran."""
    rows, commands = [], []
    for sweep, fixed in inputs.SWEEP_GRIDS.items():
        results = inputs.load(sweep, "results.json") or {}
        lrs = {(c["method"], c["r"]): c["lr"] for c in results.get("selection", [])}
        pairs = sweep_pairs(sweep, fixed)
        commands += [inputs.grid_command(results)] if pairs else []
        for p, q in pairs:
            untuned = f"{diff_ci(q)} (n={q['n']})" if q is not None else "not run"
            rows.append(f"| `{p['task']}` r={p['r']} | {p['method']} | {lrs[('lora', p['r'])]:g} | "
                        f"{lrs[(p['method'], p['r'])]:g} | {diff_ci(p)} (n={p['n']}) | {untuned} |")
    if not rows:
        return []
    return ["", "Where the learning rate was tuned (lr ∈ {0.0005, 0.001, 0.003}, best mean validation accuracy on "
            "seeds 0 and 1, per method; the report's learning-rate sweep sections), each method minus LoRA, test "
            "accuracy in points (`init:init_estimator=gradient` is the 0.2 default; the lr 0.001 runs are carried "
            "from the grids above with `--reuse docs/results/<grid>/results.json`). Made by:", "",
            "```bash", *commands, "```", "",
            "| cell | method | LoRA's lr | its lr | tuned | both at lr 0.001 |", "|---|---|---|---|---|---|", *rows]


def collapsed_note() -> list[str]:
    """Say so when every run of a task ends at one accuracy (e.g. all predict the majority class)."""
    out = []
    for name in inputs.HEADLINE_GRIDS:
        results = inputs.load(name, "results.json")
        for task in (results or {}).get("spec", {}).get("tasks", []):
            done = [r["test_accuracy"] for r in results["runs"] if r["task"] == task and r["status"] == "done"]
            if len(done) >= 2 and len(set(done)) == 1:
                lrs = " and ".join(f"{lr:g}" for lr in results["spec"]["lrs"])
                out.append(f"Every run on `{task}` ({len(done)} runs, lr {lrs}) ends at the same test accuracy "
                           f"({pct(done[0])} %), as when a model predicts one class for every example: in "
                           f"{results['spec']['base'].get('steps')} steps no method learned this task, so its "
                           "column compares nothing.")
    return out


def readme_with_headline(text: str) -> str:
    """README text with the generated headline between its markers."""
    if inputs.HEADLINE_START not in text or inputs.HEADLINE_END not in text:
        raise SystemExit(f"README.md lacks the markers {inputs.HEADLINE_START!r} … {inputs.HEADLINE_END!r}")
    before, rest = text.split(inputs.HEADLINE_START, 1)
    _, after = rest.split(inputs.HEADLINE_END, 1)
    body = "\n".join(headline_table())
    return f"{before}{inputs.HEADLINE_START}\n{body}\n{inputs.HEADLINE_END}{after}"


def write_readme_headline() -> None:
    inputs.README.write_text(readme_with_headline(inputs.README.read_text()))
    print(f"wrote the headline table into {inputs.README}")
