"""The default-recipe protocol (issue 19): the development and evaluation task sets, every candidate lr's runs,
the collapses, the lr the rule chooses and its check, computed with ``lora_tsd.app.experiments.recipe_protocol``."""

from __future__ import annotations

from lora_tsd.app.experiments.grid import lr_text
from lora_tsd.app.experiments.grid_report import pct
from lora_tsd.app.experiments.recipe_protocol import (
    Outcome,
    choose_lr,
    harmful_collapses,
    kept_tasks,
    outcomes,
    verdict,
)
from report import inputs

#: folder here -> the role of its tasks
SETS = {"recipe-dev": "development", "recipe-eval": "evaluation"}


def _short(task: str) -> str:
    return task.removeprefix("reasoning-gym:").removesuffix("@classification")


def _cell(o: Outcome | None) -> str:
    if o is None:
        return "–"
    return pct(o.test_accuracy) + (" C" if o.collapsed else "") + (" ✓" if o.learned else "")


def task_table(runs: list[Outcome], methods: list[str], lrs: list[float]) -> list[str]:
    """One row per task: majority rate, untrained model, then each method × lr's test accuracy with its marks."""
    index = {(o.task, o.method, o.lr): o for o in runs}
    cols = [(m, lr) for m in methods for lr in lrs]
    lines = ["| task | majority | untrained | " + " | ".join(f"{m} {lr_text(lr)}" for m, lr in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    kept = kept_tasks(runs)
    for task in dict.fromkeys(o.task for o in runs):
        first = next(o for o in runs if o.task == task)
        name = f"`{_short(task)}`" + ("" if task in kept else " (beyond the model)")
        lines.append(f"| {name} | {pct(first.majority)} | {pct(first.untrained)} | "
                     + " | ".join(_cell(index.get((task, m, lr))) for m, lr in cols) + " |")
    return lines + [""]


def candidate_table(runs: list[Outcome], methods: list[str], lrs: list[float]) -> list[str]:
    """Per method × lr over the learned tasks: mean test and validation accuracy, learned, collapsed, harmful."""
    kept = set(kept_tasks(runs))
    harmful = harmful_collapses(runs)
    lines = ["| method | lr | mean test (%) | mean validation (%) | learned | collapsed | collapsed where another "
             "lr learned | ended collapsed (safeguard) |", "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for lr in lrs:
            mine = [o for o in runs if o.method == method and o.lr == lr and o.task in kept]
            if not mine:
                continue
            n = len(mine)
            lines.append(
                f"| {method} | {lr_text(lr)} | {pct(sum(o.test_accuracy for o in mine) / n)} | "
                f"{pct(sum(o.val_accuracy for o in mine) / n)} | {sum(o.learned for o in mine)}/{n} | "
                f"{sum(o.collapsed for o in mine)}/{n} | {sum(1 for o in harmful if o in mine)}/{n} | "
                f"{sum(o.ended_collapsed for o in mine)}/{n} |")
    return lines + [""]


def recipe_section() -> list[str]:
    loaded = {name: inputs.load(name, "results.json") for name in SETS}
    if not all(loaded.values()):
        return []
    spec = loaded["recipe-dev"]["spec"]
    methods, lrs = spec["methods"], spec["lrs"]
    sets = {name: outcomes(results["runs"]) for name, results in loaded.items()}
    chosen = choose_lr(sets["recipe-dev"], lrs)
    check = verdict(sets["recipe-eval"], chosen)
    lines = ["## The default learning rate: chosen on development tasks, checked on evaluation tasks", "",
             f"Protocol (issue 19): MiniLM (all-MiniLM-L6-v2, r = 8) with every default of `lora-tsd train` except "
             f"the task and the lr (seed {', '.join(map(str, spec['seeds']))}; 1,000 training, 200 "
             f"validation and 200 test examples per task), methods {', '.join(f'`{m}`' for m in methods)}, "
             f"candidate lrs {', '.join(lr_text(lr) for lr in lrs)}. The tasks are reasoning-gym generators in "
             "their classification view, the only labelled data reachable on these machines (BIG-bench's archive "
             "is no longer served, GLUE and the other Hub datasets are not reachable), so every task is of the "
             "reasoning kind: no sentiment or NLI task could be included. A run has **learned** its task when "
             "its test accuracy is more than 2 binomial standard errors above both the majority-class rate and "
             "the untrained model; it has **collapsed** (C) when the exported model's test predictions fit the "
             "training safeguard's collapse rule (one class for ≥ 99 % of examples, or the majority-class rate "
             "with ≥ 90 % on one class) or the run ended collapsed on validation. A task no run learned is "
             "beyond the model and left out of the choice and the check. The rule, fixed before the runs: the "
             "lr with the fewest collapses where the same method and seed learned the task at another lr, then "
             "the best mean validation accuracy over the learned development tasks, then the lower lr. ✓: "
             "learned.", "",
             "Commands: every run, on two cores side by side, then the merge and this page (`OUT` is any folder):",
             "", "```bash",
             "OMP_NUM_THREADS=1 bash docs/results/recipe_protocol.sh OUT 0/2 & "
             "OMP_NUM_THREADS=1 bash docs/results/recipe_protocol.sh OUT 1/2; wait",
             "bash docs/results/recipe_protocol.sh OUT merge && python docs/results/build.py --import OUT", "```",
             ""]
    for name, role in SETS.items():
        results = loaded[name]
        lines += [f"### {role.capitalize()} tasks", "", "The merged grid (its runs carried from the task grids "
                  "with `--reuse`):", "", "```bash", inputs.grid_command(results), "```", ""]
        lines += task_table(sets[name], methods, lrs)
        lines += candidate_table(sets[name], methods, lrs)
    every = [o for runs in sets.values() for o in runs]
    partial = {m: [t for t in dict.fromkeys(o.task for o in every) if not any(o.task == t and o.method == m
                                                                              for o in every)] for m in methods}
    lines += [f"Not run, for the CPU budget (their prompts are the longest, about 3× the cost per step): `{m}` on "
              + ", ".join(f"`{_short(t)}`" for t in tasks) + "." for m, tasks in partial.items() if tasks]
    lines += [""] if any(partial.values()) else []
    beyond = ", ".join(f"`{_short(t)}`" for t in check.beyond) or "none"
    failures = [f"`{o.method}` on `{_short(o.task)}` (test {pct(o.test_accuracy)} %, untrained "
                f"{pct(o.untrained)} %{', collapsed' if o.collapsed else ''})"
                for o in check.harmful + check.not_beating]
    lines += [f"**Chosen on the development tasks: lr {lr_text(chosen)}.** On the evaluation tasks at lr "
              f"{lr_text(chosen)} (beyond the model: {beyond}): "
              + ("no method collapses where another lr learns the task, and every method's run beats the "
                 "untrained model on every task where any candidate run does." if check.passed else
                 "the check fails: " + "; ".join(failures) + "."), ""]
    return lines
