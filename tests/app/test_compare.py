"""`lora-tsd compare`: end to end on a tiny model and tiny JSONL tasks, resuming a half-finished grid, the lr
selection on validation, and statistics (t quantiles, confidence intervals) against direct computations."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import fault_injection
import pytest
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.cli import compare_command, main
from lora_tsd.app.experiments.compare import GridSpec, MethodVariant, RunKey, run_grid, write_outputs
from lora_tsd.app.workflow.ownership import claim_folder
from lora_tsd.app.workflow.run import RUN_MARKER, run_training
from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError, NonFiniteError

# two-sided 95 % quantiles t_{0.975, df} from the standard tables (the full table is in test_statistics.py)
T975 = {1: 12.7062047, 4: 2.7764451}


def test_run_folders_keep_the_names_of_the_committed_grids():
    """Every run of every committed grid (docs/results) sits where RunKey.path puts it: a grid continued later (or
    with --reuse) finds its finished runs, so the folder naming (run_slug, the lr text) must never drift."""
    root = Path(__file__).resolve().parents[2] / "docs" / "results"
    checked = 0
    for results in sorted(root.glob("*/results.json")):
        data = json.loads(results.read_text())
        variants = {label: MethodVariant.parse(label) for label in data["spec"]["methods"]}
        for row in data["runs"]:
            key = RunKey(row["task"], variants[row["method"]], row["r"], row["lr"], row["seed"])
            assert key.path(Path("grid")).relative_to("grid").as_posix() == row["run_dir"], (results, row["run_dir"])
            checked += 1
    assert checked > 500


def test_method_variants():
    v = MethodVariant.parse("dash:selector=top,dash_directions=4")
    assert (v.label, v.method, dict(v.overrides)) == ("dash:selector=top,dash_directions=4", "dash",
                                                      {"selector": "top", "dash_directions": 4})
    with pytest.raises(ConfigError, match="grid axis"):
        MethodVariant.parse("dash:lr=1e-3")
    with pytest.raises(ConfigError, match="unknown option"):
        MethodVariant.parse("dash:nope=1")


# ------------------------------------------------------------------------------------- a fake trainer


def fake_score(cfg) -> tuple[float, float]:
    """Deterministic validation/test accuracy: dash is better by a seed-dependent margin; lr 1e-2 is best."""
    base = 0.70 + 0.01 * cfg.seed + (0.05 if cfg.lr == 1e-2 else 0.0)
    bonus = {"lora": 0.0, "dash": 0.02 + 0.005 * cfg.seed}.get(cfg.method, 0.01)
    return base + bonus, base + bonus - 0.01


class FakeTrainer:
    """Writes the files compare reads (summary.json, metrics.jsonl) without training; counts its calls."""

    def __init__(self, fail_lr: float | None = None) -> None:
        self.calls: list[tuple[str, str, float, int]] = []
        self.fail_lr = fail_lr

    def __call__(self, cfg) -> None:
        from pathlib import Path

        out = Path(cfg.output_dir)
        self.calls.append((cfg.task, cfg.method, cfg.lr, cfg.seed))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_MARKER, cfg.to_dict())
        if cfg.lr == self.fail_lr:
            raise NonFiniteError("non-finite loss at optimizer step 3")
        val, test = fake_score(cfg)
        (out / "metrics.jsonl").write_text("".join(json.dumps({"event": "step", "step": s, "loss": 1 / s})
                                                   + "\n" for s in range(1, 5)))
        atomic_write_json(out / "summary.json", {
            "config": cfg.to_dict(), "metrics_before": {"test": {"accuracy": 0.5 + 0.01 * cfg.seed}},
            "metrics_after": {"validation": {"accuracy": val}, "test": {"accuracy": test}},
            "model": {"trainable_parameters": 100}, "switch_step": None, "wall_time_s": 1.0})


def spec(**kw) -> GridSpec:
    values = dict(model="tiny", tasks=["jsonl:/data/a.jsonl"], methods=[MethodVariant.parse("lora"),
                                                                       MethodVariant.parse("dash")],
                  seeds=[0, 1, 2, 3, 4], ranks=[2], lrs=[1e-3, 1e-2], tune_seeds=[0, 1],
                  base={"steps": 4, "prelaunch_steps": 2})
    values.update(kw)
    return GridSpec(**values)


def test_sweep_selects_on_validation_and_reports_paired_ci(tmp_path):
    trainer = FakeTrainer()
    grid = spec()
    progress = run_grid(grid, tmp_path, train=trainer, say=lambda _: None)
    # sweep: 2 methods × 2 lrs × 2 tuning seeds; then 2 methods × 3 other seeds at the chosen lr
    assert progress.trained == 8 + 6 == len(trainer.calls)
    assert {c[2] for c in trainer.calls[8:]} == {1e-2}
    results = write_outputs(grid, tmp_path, plots=False, say=lambda _: None)
    assert {(s["lr"], s["n"]) for s in results["summary"]} == {(1e-2, 5)}
    (paired,) = results["paired"]
    diffs = [0.02 + 0.005 * s for s in range(5)]
    half = T975[4] * statistics.stdev(diffs) / math.sqrt(5)
    assert paired["diffs"] == pytest.approx(diffs)
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx((statistics.mean(diffs) - half,
                                                                   statistics.mean(diffs) + half))
    text = (tmp_path / "results.md").read_text()
    assert "| dash | **+3.0 [+2.0, +4.0]** |" in text  # mean 0.03, half-width 2.7764·0.0079/√5 ≈ 0.0098
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 14 and {r["chosen_lr"] for r in rows if r["lr"] == "0.01"} == {"True"}
    # re-invocation trains nothing
    assert run_grid(grid, tmp_path, train=trainer, say=lambda _: None).trained == 0


def test_untrained_row_averages_over_seeds_not_methods(tmp_path):
    """The untrained accuracy depends on the seed (head initialization) only: a method with fewer finished seeds
    must not pull the row towards its seeds."""
    grid = spec(lrs=[1e-2], tune_seeds=None)
    run_grid(grid, tmp_path, train=FakeTrainer(), say=lambda _: None)
    for seed in (1, 2, 3, 4):  # dash finished seed 0 only
        next(tmp_path.glob(f"runs/*/dash/r2/lr0.01/seed{seed}/summary.json")).unlink()
    write_outputs(grid, tmp_path, plots=False, say=lambda _: None)
    assert "| untrained | 52.0 |" in (tmp_path / "results.md").read_text()  # mean of 50, 51, 52, 53, 54


def test_failed_runs_rank_their_lr_last_and_are_not_retried(tmp_path):
    trainer = FakeTrainer(fail_lr=1e-2)
    grid = spec(seeds=[0, 1], tune_seeds=[0])
    progress = run_grid(grid, tmp_path, train=trainer, say=lambda _: None)
    assert progress.failed == 2 and progress.trained == 4 + 2
    results = write_outputs(grid, tmp_path, plots=False, say=lambda _: None)
    assert {s["lr"] for s in results["summary"]} == {1e-3}
    assert run_grid(grid, tmp_path, train=trainer, say=lambda _: None).trained == 0
    assert run_grid(grid, tmp_path, train=trainer, retry_failed=True, say=lambda _: None).trained == 2


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {"encoder": make_encoder(root / "tiny-bert", dropout=0.0),
            "a": write_jsonl(root / "a.jsonl", sentiment_rows(120, seed=0)),
            "b": write_jsonl(root / "b.jsonl", sentiment_rows(120, seed=1))}


def compare_args(assets, out, *extra):
    return ["compare", "--model", str(assets["encoder"]), "--tasks", f"jsonl:{assets['a']}", f"jsonl:{assets['b']}",
            "--methods", "lora", "dash", "--seeds", "0", "1", "--r", "2", "--lr", "1e-2", "--steps", "4",
            "--prelaunch-steps", "2", "--dash-directions", "2", "--batch-size", "8", "--warmup-steps", "1",
            "--eval-batch-size", "32", "--out", str(out), *extra]


def test_compare_end_to_end_and_resume(tmp_path, assets, capsys):
    out = tmp_path / "grid"
    calls = []

    def counting(cfg):
        calls.append(cfg.output_dir)
        return run_training(cfg)

    from lora_tsd.app.experiments import compare

    args = compare_args(assets, out)
    parser_args = _parse(args)
    half = run_grid(compare_command.spec_from_args(parser_args), out, train=counting, max_runs=3, say=lambda _: None)
    assert (half.trained, half.pending) == (3, 5)
    finished = {p: (out / p / "summary.json").stat().st_mtime_ns for p in
                [c.split(str(out) + "/")[1] for c in calls]}
    # a run killed half-way: started (train_config.json) but no summary.json; it must be restarted
    killed = out / "runs" / compare.run_slug(f"jsonl:{assets['b']}") / "dash" / "r2" / "lr0.01" / "seed1"
    killed.mkdir(parents=True)
    claim_folder(killed, "run")  # lora-tsd marks a run folder as its own first, so a rerun may replace it
    atomic_write_json(killed / RUN_MARKER, {"partial": True})
    calls.clear()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "grid: 5 trained (0 failed), 3 already there, 0 pending" in printed
    for path, mtime in finished.items():
        assert (out / path / "summary.json").stat().st_mtime_ns == mtime  # not redone
    assert (killed / "summary.json").is_file()
    for name in ("results.csv", "results.json", "results.md", "accuracy.png"):
        assert (out / name).is_file(), name
    curves = sorted(p.name for p in out.glob("curves_*.png"))
    assert len(curves) == 2
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 8 and all(r["status"] == "done" for r in results["runs"])
    # the paired CI in results.json equals a direct computation from results.csv
    rows = list(csv.DictReader((out / "results.csv").open()))
    for p in results["paired"]:
        test = {(r["method"], int(r["seed"])): float(r["test_accuracy"]) for r in rows if r["task"] == p["task"]}
        diffs = [test[("dash", s)] - test[("lora", s)] for s in (0, 1)]
        mean = statistics.mean(diffs)
        half = T975[1] * statistics.stdev(diffs) / math.sqrt(2)
        assert p["diff_mean"] == pytest.approx(mean, abs=1e-12)
        assert (p["ci_low"], p["ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-9)
    switches = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "switch"]
    assert switches == [2]
    # a third invocation trains nothing; other settings for the same folder are refused
    assert main(args) == 0
    assert "grid: 0 trained (0 failed), 8 already there" in capsys.readouterr().out
    assert main(compare_args(assets, out, "--max-train", "50")) == 2
    assert "other settings" in capsys.readouterr().err
    # a run made when svd_cache defaulted to True (older versions) is still the same run: reused, not refused
    summary = out / next(iter(finished))
    data = json.loads((summary / "summary.json").read_text())
    data["config"]["svd_cache"] = True
    (summary / "summary.json").write_text(json.dumps(data))
    assert main(args) == 0
    assert "grid: 0 trained (0 failed), 8 already there" in capsys.readouterr().out


def test_a_killed_grid_run_continues_from_its_checkpoint(tmp_path, assets, capsys):
    """With --checkpoint-every, re-invoking a grid whose process was SIGKILLed mid-run resumes that run from its
    newest checkpoint, and the adapter is bit-identical to the one of a grid that was never interrupted and
    never checkpointed (so checkpointing is a neutral option: a grid can add it when it is continued)."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from lora_tsd.app.experiments import compare

    def args(out, checkpoint_every=1):
        return ["compare", "--model", str(assets["encoder"]), "--tasks", f"jsonl:{assets['a']}", "--methods",
                "dash", "--seeds", "0", "--r", "2", "--lr", "1e-2", "--steps", "6", "--prelaunch-steps", "2",
                "--dash-directions", "2", "--batch-size", "8", "--checkpoint-every", str(checkpoint_every),
                "--no-plots", "--out", str(out)]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([*fault_injection.command("step:4"), *args(tmp_path / "killed")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "killed" / "runs" / compare.run_slug(f"jsonl:{assets['a']}") / "dash" / "r2" / "lr0.01" / "seed0"
    assert not (run / "summary.json").exists() and (run / "checkpoints").is_dir()
    assert main(args(tmp_path / "killed")) == 0
    printed = capsys.readouterr().out
    assert "resume jsonl:" in printed and "from step-" in printed, printed
    assert main(args(tmp_path / "whole", checkpoint_every=0)) == 0
    whole = tmp_path / "whole" / run.relative_to(tmp_path / "killed")
    got, want = (load_file(str(p / "adapter" / "tsd_adapter.safetensors")) for p in (run, whole))
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in want)
    assert json.loads((run / "summary.json").read_text())["resumed_from"] is not None
    capsys.readouterr()
    assert main(args(tmp_path / "killed", checkpoint_every=0)) == 0  # the finished run is the same run
    assert "0 trained (0 failed), 1 already there" in capsys.readouterr().out


def _parse(args):
    from lora_tsd.app.cli import build_parser

    return build_parser().parse_args(args)


# ------------------------------------------------------------------------------------- carrying runs over


def test_reuse_carries_committed_results_into_a_new_grid_folder(tmp_path):
    first, trainer = tmp_path / "first", FakeTrainer()
    run_grid(spec(seeds=[0, 1], lrs=[1e-2], tune_seeds=None), first, train=trainer, say=lambda _: None)
    old = write_outputs(spec(seeds=[0, 1], lrs=[1e-2], tune_seeds=None), first, plots=False, say=lambda _: None)
    # only results.json travels (the run folders stay behind, as on another machine)
    committed = tmp_path / "committed.json"
    committed.write_text((first / "results.json").read_text())
    from lora_tsd.app.experiments.compare import reuse_results

    grid, out = spec(seeds=[0, 1, 2, 3], lrs=[1e-2], tune_seeds=None), tmp_path / "second"
    assert reuse_results(grid, out, [committed]) == (4, 0)
    trainer.calls.clear()
    progress = run_grid(grid, out, train=trainer, say=lambda _: None)
    assert sorted(c[3] for c in trainer.calls) == [2, 2, 3, 3]  # only the new seeds trained
    assert (progress.trained, progress.skipped) == (4, 4)
    results = write_outputs(grid, out, plots=True, say=lambda _: None)
    assert {s["n"] for s in results["summary"]} == {4}
    carried = {(r["method"], r["seed"]): r["test_accuracy"] for r in old["runs"]}
    for row in results["runs"]:
        if row["seed"] < 2:
            assert row["test_accuracy"] == carried[(row["method"], row["seed"])]
            assert row["reused_from"] == str(committed)
        else:
            assert "reused_from" not in row
    (paired,) = results["paired"]
    assert paired["diffs"] == pytest.approx([0.02 + 0.005 * s for s in range(4)])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["reused_from"] != "" for r in rows].count(True) == 4
    # the loss curves travel in results.json: the plot averages the carried runs and the new ones
    from lora_tsd.app.experiments.compare import choose_lrs, learning_curves

    chosen = choose_lrs(grid, results["runs"])
    curves = learning_curves(grid, results["runs"], chosen, grid.tasks[0], 2)
    assert {m: c["seeds"] for m, c in curves.items()} == {"lora": 4, "dash": 4}
    assert curves["lora"]["steps"] == [1, 2, 3, 4]
    assert curves["lora"]["loss"] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4], rel=1e-4)  # kept to 5 digits
    assert len(list(out.glob("curves_*.png"))) == 1
    # rows from results written before curves were kept are left out of the curves, not mistaken for flat ones
    old_format = [{k: v for k, v in row.items() if k != "loss_curve"} if row["seed"] < 2 else row
                  for row in results["runs"]]
    curves = learning_curves(grid, old_format, chosen, grid.tasks[0], 2)
    assert {m: c["seeds"] for m, c in curves.items()} == {"lora": 2, "dash": 2}
    assert "loss_curve" not in rows[0]  # the CSV stays one line per run
    # the carried runs stay in the folder: a later invocation without --reuse trains nothing
    assert run_grid(grid, out, train=trainer, say=lambda _: None).trained == 0
    # reusing the same file again adds nothing
    assert reuse_results(grid, out, [committed]) == (0, 0)


def test_reuse_refuses_other_grids_and_conflicts(tmp_path):
    from lora_tsd.app.experiments.compare import reuse_results

    first = tmp_path / "first"
    small = spec(seeds=[0], lrs=[1e-2], tune_seeds=None)
    run_grid(small, first, train=FakeTrainer(), say=lambda _: None)
    write_outputs(small, first, plots=False, say=lambda _: None)
    source = first / "results.json"
    with pytest.raises(ConfigError, match="other fixed options .*steps: 4 there, 8 here"):
        reuse_results(spec(base={"steps": 8, "prelaunch_steps": 2}), tmp_path / "a", [source])
    with pytest.raises(ConfigError, match="model 'tiny'"):
        reuse_results(spec(model="other"), tmp_path / "b", [source])
    with pytest.raises(ConfigError, match="no such file"):
        reuse_results(spec(), tmp_path / "c", [tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a compare results.json"):
        reuse_results(spec(), tmp_path / "d", [tmp_path / "bad.json"])
    # runs outside the new grid (another method) are counted and ignored
    only_lora = spec(methods=[MethodVariant.parse("lora")], seeds=[0], lrs=[1e-2], tune_seeds=None)
    assert reuse_results(only_lora, tmp_path / "e", [source]) == (1, 1)
    # the same run with other results in two sources is an error, never a silent pick
    data = json.loads(source.read_text())
    data["runs"][0]["test_accuracy"] += 0.1
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="different results"):
        reuse_results(small, tmp_path / "f", [source, tmp_path / "tampered.json"])


def test_reuse_from_the_command_line(tmp_path, assets, capsys):
    first = tmp_path / "first"
    assert main(compare_args(assets, first, "--no-plots")) == 0
    capsys.readouterr()
    second = tmp_path / "second"
    args = compare_args(assets, second, "--reuse", str(first / "results.json"), "--dry-run")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reuse: 8 run(s) carried" in printed and printed.count("reused ") == 8
    assert main(compare_args(assets, second, "--no-plots")) == 0
    assert "grid: 0 trained (0 failed), 8 already there" in capsys.readouterr().out
    assert main(compare_args(assets, tmp_path / "third", "--reuse", str(tmp_path / "nope.json"))) == 2
    assert "no such file" in capsys.readouterr().err


def test_reuse_refuses_a_label_whose_meaning_changed(tmp_path):
    """Before 0.2 a bare `init` ran the pre-launch estimator; now it means the gradient probe. A results.json
    from then must not be carried into a grid that asks for `init` today: each row's settings are checked."""
    from lora_tsd.app.experiments.compare import reuse_results

    then = spec(methods=[MethodVariant.parse("init:init_estimator=prelaunch")], seeds=[0], lrs=[1e-2],
                tune_seeds=None, base={"steps": 200})  # longer than the default pre-launch (100 steps)
    run_grid(then, tmp_path / "then", train=FakeTrainer(), say=lambda _: None)
    data = write_outputs(then, tmp_path / "then", plots=False, say=lambda _: None)
    (row,) = data["runs"]
    assert row["config"]["init_estimator"] == "prelaunch"  # each row records what it ran with
    data["runs"][0]["method"], data["spec"]["methods"] = "init", ["init"]  # labelled as 0.1 labelled it
    (tmp_path / "old.json").write_text(json.dumps(data))
    now = spec(methods=[MethodVariant.parse("init")], seeds=[0], lrs=[1e-2], tune_seeds=None, base={"steps": 200})
    with pytest.raises(ConfigError, match=r"init r=2 lr=0.01 seed=0 was trained with other settings than this "
                                          r"grid gives it \(init_estimator: 'prelaunch' there, 'gradient' here\)"):
        reuse_results(now, tmp_path / "a", [tmp_path / "old.json"])
    del data["runs"][0]["config"]
    (tmp_path / "older.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="records no settings"):
        reuse_results(now, tmp_path / "b", [tmp_path / "older.json"])
    # under its explicit label the same run carries
    assert reuse_results(then, tmp_path / "c", [tmp_path / "then" / "results.json"]) == (1, 0)
