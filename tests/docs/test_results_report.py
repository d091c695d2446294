"""docs/results.md and the README's headline are generated from the committed results files: a hand edit of a
number, or a results file changed without rebuilding, makes the committed text differ from a fresh render."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _build_module():
    spec = importlib.util.spec_from_file_location("results_build", ROOT / "docs" / "results" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_is_the_render_of_the_committed_results():
    build = _build_module()
    committed = (ROOT / "docs" / "results.md").read_text()
    assert build.render_report() == committed, "docs/results.md is stale or hand-edited: run docs/results/build.py"


def test_readme_headline_is_the_render_of_the_committed_results():
    build = _build_module()
    committed = (ROOT / "README.md").read_text()
    assert build.readme_with_headline(committed) == committed, (
        "the README's results headline is stale or hand-edited: run docs/results/build.py")
    assert build.HEADLINE_START in committed and "| lora |" in committed



def test_coverage_table_marks_tuned_untuned_and_missing_cells(monkeypatch):
    """A cell is 'tuned' only where a sweep grid chose its lr and ran seeds at it; otherwise the untuned grids'
    largest seed count, else '–'; the ablations grid counts as an untuned source."""
    build = _build_module()
    task = "bigbench:hyperbaton"

    def summary(method, r, n, lr=0.001):
        return {"task": task, "method": method, "r": r, "n": n, "lr": lr}

    files = {
        "minilm-hyperbaton": {"spec": {"tasks": [task]}, "summary": [
            summary("lora", 2, 5), summary("dash", 2, 0), summary("pissa", 8, 3)]},
        "minilm-ablations": {"spec": {"tasks": [task]}, "summary": [summary("pissa", 8, 4), summary("lora", 8, 0)]},
        "minilm-lrsweep": {"spec": {"tasks": [task]},
                           "selection": [{"task": task, "method": "lora", "r": 2, "lr": 0.003},
                                         {"task": task, "method": "dash", "r": 2, "lr": 0.003}],
                           "summary": [summary("lora", 2, 5, 0.003), summary("dash", 2, 0, 0.003)]},
    }
    monkeypatch.setattr(build.inputs, "TASK_GRIDS", {"minilm-hyperbaton": "hyperbaton"})
    monkeypatch.setattr(build.inputs, "SWEEP_GRIDS", {"minilm-lrsweep": "minilm-hyperbaton"})
    monkeypatch.setattr(build.inputs, "load", lambda name, file: files.get(name))
    lines = build.coverage_table()
    assert lines[0] == "| method | hyperbaton r=2 | hyperbaton r=8 |"
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[1:] for line in lines[2:]}
    assert rows["lora"] == ["tuned, n=5 (lr 0.003)", "– |"]
    assert rows["dash"] == ["–", "– |"]  # chosen but no seed finished at the chosen lr, and none untuned
    assert rows["pissa"] == ["–", "lr 0.001, n=4 |"]  # the larger of the two untuned grids' counts
    assert list(rows) == build.FULL_GRID_METHODS


def test_smollm2_coverage_lists_every_method_of_the_full_grid_with_its_finished_seeds(monkeypatch):
    """Every method of the full SmolLM2 grid gets a row; a cell shows the lr and n of its finished seeds, '–'
    where none finished (n = 0 counts as not run) or the task is absent."""
    build = _build_module()
    strategyqa = "bigbench:strategyqa@multiple_choice"
    files = {"smollm2-grid": {"summary": [
        {"task": strategyqa, "method": "lora", "r": 8, "lr": 0.002, "n": 3},
        {"task": strategyqa, "method": "pissa", "r": 8, "lr": 0.002, "n": 0},
        {"task": "bigbench:social_iqa", "method": "dora", "r": 8, "lr": 0.0003, "n": 2}]}}
    monkeypatch.setattr(build.inputs, "load", lambda name, file: files.get(name))
    lines = build.smollm2_coverage()
    assert lines[0] == "| method | strategyqa r=8 | social_iqa r=8 |"
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[1:] for line in lines[2:]}
    assert list(rows) == build.SMOLLM2_GRID_METHODS
    assert rows["lora"] == ["lr 0.002, n=3", "– |"]
    assert rows["pissa"] == ["–", "– |"]
    assert rows["dora"] == ["–", "lr 0.0003, n=2 |"]


def test_paper_rows_include_the_tuned_sweep_after_its_untuned_grid(monkeypatch):
    """The paper comparison takes each lr sweep's paired difference (labelled 'each lr tuned') right after the
    untuned grid it continues, with the sweep's own numbers and verdict."""
    build = _build_module()
    task = "bigbench:hyperbaton"

    def paired(diff, low, high):  # fractions of accuracy, as compare writes them
        return {"task": task, "method": "dash", "r": 2, "n": 5, "diff_mean": diff, "ci_low": low, "ci_high": high}

    files = {"minilm-hyperbaton": {"spec": {"tasks": [task]}, "paired": [paired(-0.002, -0.010, 0.006)]},
             "minilm-lrsweep": {"spec": {"tasks": [task]}, "paired": [paired(-0.030, -0.050, -0.010)]}}
    monkeypatch.setattr(build.inputs, "SWEEP_GRIDS", {"minilm-lrsweep": "minilm-hyperbaton"})
    monkeypatch.setattr(build.inputs, "load", lambda name, file: files.get(name))
    rows = [line for line in build.paper_section() if line.startswith("| LoRA-Dash beats LoRA")]
    assert len(rows) == 2
    assert f"`{task}`, r = 2, test accuracy" in rows[0] and "−0.2 pp [−1.0, +0.6]" in rows[0]
    assert f"`{task}`, r = 2, each lr tuned, test accuracy" in rows[1] and "−3.0 pp [−5.0, −1.0]" in rows[1]
    assert rows[1].endswith("| reversed: LoRA is better, the interval excludes 0 |")


def test_variant_differences_in_a_sweep_pair_each_method_at_its_own_chosen_lr(monkeypatch):
    """In a sweep grid a method has runs at several lrs: the variant − reference difference must take each at the
    lr its sweep chose, never mix lrs (a dict keyed without the lr would keep whichever run came last)."""
    build = _build_module()
    task, grad, pre = "bigbench:hyperbaton", "init:init_estimator=gradient", "init:init_estimator=prelaunch"
    accuracy = {(grad, 0.001): [0.80, 0.82, 0.84], (grad, 0.003): [0.50, 0.50, 0.50],
                (pre, 0.001): [0.70, 0.70, 0.70], (pre, 0.003): [0.75, 0.76, 0.80]}
    runs = [{"task": task, "method": m, "r": 2, "lr": lr, "seed": seed, "status": "done", "test_accuracy": a}
            for (m, lr), values in accuracy.items() for seed, a in enumerate(values)]
    files = {"sweep": {"spec": {"tasks": [task], "methods": ["lora", grad, pre], "ranks": [2], "lrs": [0.001, 0.003]},
                       "selection": [{"task": task, "method": grad, "r": 2, "lr": 0.001},
                                     {"task": task, "method": pre, "r": 2, "lr": 0.003}],
                       "runs": runs}}
    monkeypatch.setattr(build.inputs, "load", lambda name, file: files.get(name))
    [record] = build.variant_differences("sweep")
    assert (record["variant"], record["base"], record["n"], record["tuned"]) == (grad, pre, 3, True)
    assert abs(record["mean"] - (0.82 - 0.77)) < 1e-12
