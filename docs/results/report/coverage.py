"""Which cells of the issue's full MiniLM and SmolLM2 grids the report holds."""

from __future__ import annotations

from report import inputs

# The methods of the full MiniLM grid (the command in tail.md), in its order.
FULL_GRID_METHODS = ["lora", "dash", "init:init_estimator=prelaunch", "tsd:init_estimator=prelaunch",
                     "init:init_estimator=gradient", "tsd:init_estimator=gradient", "pissa", "milora", "dora"]


def coverage_table() -> list[str]:
    """Which cells of the full MiniLM grid this page holds, read from the grids: tuned (the lr sweep), at the
    untuned lr only, or not run; n is the number of seeds at the lr reported."""
    sources = [*inputs.TASK_GRIDS, "minilm-ablations"]  # the ablations hold 2-class r = 8 rows the task grid lacks
    untuned: dict[tuple[str, int, str], int] = {}
    for name in sources:
        for s in (inputs.load(name, "results.json") or {}).get("summary", []):
            key = (s["task"], s["r"], s["method"])
            untuned[key] = max(untuned.get(key, 0), s["n"])
    tuned: dict[tuple[str, int, str], str] = {}
    for sweep in inputs.SWEEP_GRIDS:
        results = inputs.load(sweep, "results.json") or {}
        lrs = {(c["task"], c["r"], c["method"]): c["lr"] for c in results.get("selection", [])}
        for s in results.get("summary", []):
            key = (s["task"], s["r"], s["method"])
            if s["n"] and key in lrs:
                tuned[key] = f"tuned, n={s['n']} (lr {lrs[key]:g})"
    columns = sorted({(t, r) for t, r, _ in [*untuned, *tuned]},
                     key=lambda c: (list(inputs.TASK_GRIDS).index(_grid_of(c[0])), c[1]))
    names = {task: inputs.TASK_GRIDS[_grid_of(task)] for task, _ in columns}
    return _method_table(FULL_GRID_METHODS, [f"{names[t]} r={r}" for t, r in columns], lambda method: [
        tuned.get((t, r, method)) or (f"lr 0.001, n={untuned[(t, r, method)]}" if untuned.get((t, r, method))
                                      else "–") for t, r in columns])


# The methods and tasks of the full SmolLM2 grid (the command in tail.md), in its order.
SMOLLM2_GRID_METHODS = ["lora", "dash", "init", "tsd", "init:init_estimator=gradient,prelaunch_steps=0",
                        "tsd:init_estimator=gradient,prelaunch_steps=0", "pissa", "milora", "dora"]


SMOLLM2_GRID_TASKS = {"bigbench:strategyqa@multiple_choice": "strategyqa", "bigbench:social_iqa": "social_iqa"}


def smollm2_coverage() -> list[str]:
    """Which cells of the full SmolLM2 grid smollm2-grid holds: the lr and the number of finished seeds, or
    '–' where none finished."""
    ran = {(s["task"], s["method"]): s for s in (inputs.load("smollm2-grid", "results.json") or {}).get("summary", [])
           if s["n"]}
    return _method_table(SMOLLM2_GRID_METHODS, [f"{name} r=8" for name in SMOLLM2_GRID_TASKS.values()],
                         lambda method: [f"lr {ran[(t, method)]['lr']:g}, n={ran[(t, method)]['n']}"
                                         if (t, method) in ran else "–" for t in SMOLLM2_GRID_TASKS])


def _method_table(methods: list[str], headers: list[str], cells) -> list[str]:
    """A Markdown table with one row per method (`cells(method)` gives its cells, one per header)."""
    lines = ["| method | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    lines += [f"| `{method}` | " + " | ".join(cells(method)) + " |" for method in methods]
    return lines


def _grid_of(task: str) -> str:
    """The task grid that holds ``task``."""
    for name in inputs.TASK_GRIDS:
        if task in ((inputs.load(name, "results.json") or {}).get("spec", {}).get("tasks", [])):
            return name
    raise SystemExit(f"no task grid holds {task!r}")
