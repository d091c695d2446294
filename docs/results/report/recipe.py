"""The default-recipe protocol (issue 19): the development and evaluation task sets, every candidate lr's runs,
the collapses, the lr the rule chooses and its check, computed with ``lora_tsd.app.experiments.recipe_protocol``."""

from __future__ import annotations

from lora_tsd.app.experiments.grid import lr_text
from lora_tsd.app.experiments.grid_report import pct
from lora_tsd.app.experiments.recipe_protocol import (
    Outcome,
    Stage,
    harmful_collapses,
    kept_tasks,
    outcomes,
    staged_choice,
    verdict,
    with_restarts,
)
from lora_tsd.app.workflow.restarts import restart_seed
from report import inputs

#: folder here -> the role of its tasks
SETS = {"recipe-dev": "development", "recipe-eval": "evaluation", "recipe-eval2": "second evaluation"}
#: the sets the section needs; the second evaluation set is shown where it was run
REQUIRED = ("recipe-dev", "recipe-eval")


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


def _names(sets: list[str]) -> str:
    return " and ".join(f"{SETS[n]}" for n in sets)


def stage_line(stage: Stage) -> str:
    """The outcome of one check, with every failing run named."""
    check = stage.verdict
    beyond = ", ".join(f"`{_short(t)}`" for t in check.beyond) or "none"
    failures = [f"`{o.method}` on `{_short(o.task)}` (test {pct(o.test_accuracy)} %, untrained "
                f"{pct(o.untrained)} %{', collapsed' if o.collapsed else ''})"
                for o in check.harmful + check.not_beating]
    return (f"**lr {lr_text(stage.lr)}, chosen on the {_names(stage.chosen_on)} tasks, checked on the "
            f"{SETS[stage.checked_on]} tasks** (beyond the model: {beyond}): "
            + ("passed: no method collapses where another lr learns the task, and every method's run beats the "
               "untrained model on every task where any candidate run does." if check.passed else
               "failed: " + "; ".join(failures) + "."))


def coverage_lines(runs: list[Outcome], methods: list[str], lrs: list[float]) -> list[str]:
    """The method × task × lr runs the protocol left out, one line per method."""
    tasks = list(dict.fromkeys(o.task for o in runs))
    have = {(o.task, o.method, o.lr) for o in runs}
    lines = []
    for method in methods:
        missing = []
        for task in tasks:
            gone = [lr for lr in lrs if (task, method, lr) not in have]
            if gone:
                at = "" if len(gone) == len(lrs) else " at " + ", ".join(lr_text(lr) for lr in gone)
                missing.append(f"`{_short(task)}`{at}")
        if missing:
            lines.append(f"Not run, for the CPU budget (these prompts fill the 128 tokens: about 3× the cost per "
                         f"step): `{method}` on " + "; ".join(missing) + ".")
    return lines + [""] if lines else []


def seed_table(runs: list[Outcome], lrs: list[float]) -> list[str]:
    """One row per task × method × seed, one column per lr: does a stuck run follow the lr or the seed?"""
    index = {(o.task, o.method, o.seed, o.lr): o for o in runs}
    tasks = list(dict.fromkeys(o.task for o in runs))
    rows = sorted({(o.task, o.method, o.seed) for o in runs}, key=lambda k: (tasks.index(k[0]), k[1], k[2]))
    lines = ["| task | method | seed | majority | untrained | " + " | ".join(lr_text(lr) for lr in lrs) + " |",
             "|" + "---|" * (len(lrs) + 5)]
    for task, method, seed in rows:
        first = next(o for o in runs if (o.task, o.method, o.seed) == (task, method, seed))
        lines.append(f"| `{_short(task)}` | {method} | {seed} | {pct(first.majority)} | {pct(first.untrained)} | "
                     + " | ".join(_cell(index.get((task, method, seed, lr))) for lr in lrs) + " |")
    lines.append("")
    for lr in lrs:
        mine = [o for o in runs if o.lr == lr]
        if mine:
            lines.append(f"- lr {lr_text(lr)}: {sum(o.learned for o in mine)} of {len(mine)} runs learned, "
                         f"{sum(o.collapsed for o in mine)} collapsed.")
    return lines + [""]


def seed_section(seeds: dict, seen: list[Outcome], lrs: list[float]) -> list[str]:
    """The other-seed runs on the tasks where a check failed, beside the protocol's seed-0 runs of the same kind."""
    extra = outcomes(seeds["runs"])
    keys = {(o.task, o.method) for o in extra}
    runs = [o for o in seen if (o.task, o.method) in keys] + extra
    return (["### Other seeds where a check failed", "",
             "Not part of the rule, run after it had answered: is a run that never leaves the majority class the "
             "lr's doing or the seed's? The failing method on the failing tasks, at the candidate lrs, on more "
             "seeds (seed 0 from the grids above; the seed also draws the head's initialization and the data "
             "order, so the untrained model differs per seed). Command (the runs, then the merged grid):", "",
             "```bash", "OMP_NUM_THREADS=1 bash docs/results/recipe_protocol.sh OUT seeds",
             inputs.grid_command(seeds), "```", ""] + seed_table(runs, lrs))


def restart_section(restarts: dict, sets: dict[str, list[Outcome]], seeds: list[Outcome], lr: float) -> list[str]:
    """The default's restart of a stuck run (``--stuck-restarts 1``), applied to the evaluation runs at ``lr``
    that ended stuck, and the evaluation sets' verdict taken again with it."""
    extra = outcomes(restarts["runs"])
    lines = ["### The restart of a stuck run", "",
             "Added after every check above had answered, and not chosen on any task: `lora-tsd train` now trains "
             "a run that ends stuck (validation never left a one-class prediction) once more with seed + 1000 and "
             "exports the better of the two on validation (`--stuck-restarts 1`, the default; "
             "src/lora_tsd/app/workflow/restarts.py), the remedy Dodge et al. (2020) measured for BERT "
             "fine-tuning. Each evaluation run at lr " + lr_text(lr) + " that ended stuck (its summary's "
             "`collapse.kind`), trained again with seed + 1000 (the same split, so the same validation and test "
             "examples; the seed also draws the head's initialization and the data order):", "",
             "```bash", "OMP_NUM_THREADS=1 bash docs/results/recipe_protocol.sh OUT restarts",
             "bash docs/results/recipe_protocol.sh OUT merge", inputs.grid_command(restarts), "```", "",
             "| task | method | seed | first run: test (validation) | restart seed | restart: test (validation) "
             "| exported |", "|---|---|---|---|---|---|---|"]
    seen = [o for runs in sets.values() for o in runs] + seeds
    for r in extra:
        first = next(o for o in seen if (o.task, o.method, o.lr) == (r.task, r.method, r.lr)
                     and restart_seed(o.seed, 1) == r.seed)
        kept = with_restarts([first], [r])[0]
        lines.append(f"| `{_short(r.task)}` | {r.method} | {first.seed} | {_cell(first)} ({pct(first.val_accuracy)})"
                     f" | {r.seed} | {_cell(r)} ({pct(r.val_accuracy)}) | "
                     f"{'the restart' if kept.restart_seed is not None else 'the first run'} |")
    lines.append("")
    for name, runs in [*((n, r) for n, r in sets.items() if n != "recipe-dev"), ("seeds", seeds)]:
        if not runs:
            continue
        label = "the other seeds' runs" if name == "seeds" else f"the {SETS[name]} tasks"
        check = verdict(with_restarts(runs, extra), lr)
        failures = [f"`{o.method}` on `{_short(o.task)}` seed {o.seed} (test {pct(o.test_accuracy)} %)"
                    for o in check.harmful + check.not_beating]
        beyond = ", ".join(f"`{_short(t)}`" for t in check.beyond) or "none"
        lines.append(f"- With the restart, lr {lr_text(lr)} on {label} (beyond the model: {beyond}): "
                     + ("passed: no method collapses where another lr learns the task, and every method's run "
                        "beats the untrained model on every task where any candidate run does." if check.passed
                        else "failed: " + "; ".join(failures) + "."))
    return lines + ["", "What this shows and what it does not: the restart was added after the evaluation tasks "
                    "had failed the lr, and it is checked here on those same tasks; no unseen task is left to "
                    "check it on (the other reasoning-gym generators found with 2 to 16 answers, `acre`, "
                    "`game_of_life_halting`, `mahjong_puzzle`, `rectangle_count` and `rotten_oranges`, have "
                    "prompts of 186 to 526 words on average, far beyond the 128-token default, with the deciding "
                    "part at the end: `python docs/results/prompt_lengths.py`). Only the runs at lr "
                    + lr_text(lr) + " were restarted, so another lr's "
                    "restart might still learn a task no first run learned; at " + lr_text(lr) + " the restarts "
                    "left `maze`, `self_reference` and `binary_alternation` (seeds 1 and 2) at the majority "
                    "class. A restart costs one more run, only for a run that ended stuck.", ""]


def recipe_section() -> list[str]:
    loaded = {name: inputs.load(name, "results.json") for name in SETS}
    if not all(loaded[name] for name in REQUIRED):
        return []
    loaded = {name: results for name, results in loaded.items() if results}
    spec = loaded["recipe-dev"]["spec"]
    methods, lrs = spec["methods"], spec["lrs"]
    sets = {name: outcomes(results["runs"]) for name, results in loaded.items()}
    result = staged_choice(list(sets.items()), lrs)
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
             "with ≥ 90 % on one class) or the run ended collapsed on validation; a run that never left the "
             "majority class counts as collapsed too. A task no run learned is beyond the model and left out of "
             "the choice and the check. The rule, fixed before the runs: the lr with the fewest collapses where "
             "the same method and seed learned the task at another lr, then the best mean validation accuracy "
             "over the learned development tasks, then the lower lr; the evaluation tasks then check it (no such "
             "collapse at that lr, and every method beats the untrained model wherever any run does). ✓: "
             "learned.", ""]
    if "recipe-eval2" in sets:
        lines += ["Added after the first check failed (below), before the second evaluation tasks were picked or "
                  "run: a failed check chooses again by the same rule on every task seen so far (development "
                  "and evaluation), and a second set of tasks, not used before, checks the new choice. The "
                  "second evaluation tasks are the remaining reasoning-gym generators with at most 16 answers "
                  "and the shortest prompts (`course_schedule`, `circuit_logic`).", ""]
    lines += ["Commands: every run, on two cores side by side, then the merge and this page (`OUT` is any folder):",
              "", "```bash",
              "OMP_NUM_THREADS=1 bash docs/results/recipe_protocol.sh OUT 0/2 & "
              "OMP_NUM_THREADS=1 bash docs/results/recipe_protocol.sh OUT 1/2; wait",
              "bash docs/results/recipe_protocol.sh OUT merge && python docs/results/build.py --import OUT", "```",
              ""]
    for name, results in loaded.items():
        lines += [f"### {SETS[name].capitalize()} tasks", "", "The merged grid (its runs carried from the task "
                  "grids with `--reuse`):", "", "```bash", inputs.grid_command(results), "```", ""]
        lines += task_table(sets[name], methods, lrs)
        lines += candidate_table(sets[name], methods, lrs)
    lines += coverage_lines([o for runs in sets.values() for o in runs], methods, lrs)
    for stage in result.stages:
        lines += [stage_line(stage), ""]
    seeds = inputs.load("recipe-seeds", "results.json")
    if seeds:
        lines += seed_section(seeds, [o for runs in sets.values() for o in runs], lrs)
    restarts = inputs.load("recipe-restarts", "results.json")
    if restarts:
        lines += restart_section(restarts, sets, outcomes(seeds["runs"]) if seeds else [], result.final)
    status = ("checked" if result.checked else "not checked on tasks it was not chosen on: no unseen set is left")
    lines += [f"**The protocol's answer: lr {lr_text(result.final)}** (chosen on the "
              f"{_names(result.final_chosen_on)} tasks; {status}).", ""]
    return lines
