"""The default-recipe protocol's rules (issue 19): learned, collapsed, harmful collapse, the lr choice, the verdict."""

from __future__ import annotations

import math

import pytest

from lora_tsd.app.experiments.recipe_protocol import (
    Z,
    choose_lr,
    harmful_collapses,
    kept_tasks,
    outcomes,
    staged_choice,
    verdict,
    with_restarts,
)


def run(task="t", method="lora", lr=1e-3, seed=0, acc=0.8, val=None, top=0.5, majority=0.5, untrained=0.3,
        n=200, ended=False, status="done"):
    return {"task": task, "method": method, "lr": lr, "seed": seed, "status": status, "test_accuracy": acc,
            "val_accuracy": acc if val is None else val, "test_top_prediction_share": top,
            "test_majority_label_share": majority, "before_test_accuracy": untrained, "test_examples": n,
            "collapsed": ended}


def test_learned_needs_more_than_z_standard_errors_above_the_majority_and_the_untrained_model():
    margin = Z * math.sqrt(0.5 * 0.5 / 200)
    above, below = outcomes([run(acc=0.5 + margin + 1e-6), run(acc=0.5 + margin - 1e-6)])
    assert above.learned and not below.learned
    # the untrained model sets the bar when it is above the majority rate
    assert not outcomes([run(acc=0.7, untrained=0.65, majority=0.5)])[0].learned
    # a run below the untrained model does not beat it
    assert not outcomes([run(acc=0.3, untrained=0.35)])[0].beats_untrained


def test_collapse_is_the_safeguards_rule_on_the_test_predictions_or_the_runs_own_verdict():
    constant, majority, healthy, ended = outcomes([
        run(acc=0.6, top=1.0, majority=0.6), run(acc=0.605, top=0.95, majority=0.6),
        run(acc=0.62, top=0.7, majority=0.6), run(acc=0.9, top=0.5, ended=True)])
    assert constant.collapsed and majority.collapsed and not healthy.collapsed
    assert ended.collapsed and ended.ended_collapsed and not constant.ended_collapsed


def test_failed_runs_are_left_out():
    assert outcomes([run(status="failed"), run()]) == outcomes([run()])


def test_a_collapse_is_harmful_only_where_the_same_method_and_seed_learned_at_another_lr():
    runs = outcomes([
        run(lr=1e-3, acc=0.9), run(lr=2e-3, acc=0.5, top=1.0),  # lora: harmful at 2e-3
        run(method="tsd", lr=1e-3, acc=0.5, top=1.0), run(method="tsd", lr=2e-3, acc=0.5, top=1.0),  # never learned
        run(seed=1, lr=2e-3, acc=0.5, top=1.0),  # seed 1 never learned
    ])
    assert [(o.method, o.lr, o.seed) for o in harmful_collapses(runs)] == [("lora", 2e-3, 0)]


def test_tasks_nobody_learns_are_beyond_the_model():
    runs = outcomes([run(task="easy", acc=0.9), run(task="hard", acc=0.52), run(task="hard", lr=2e-3, acc=0.5)])
    assert kept_tasks(runs) == ["easy"]


def test_the_choice_prefers_an_lr_that_never_collapses_over_one_that_wins_on_validation():
    runs = outcomes([
        run(task="a", lr=1e-3, acc=0.85), run(task="a", lr=2e-3, acc=0.95),
        run(task="b", lr=1e-3, acc=0.80), run(task="b", lr=2e-3, acc=0.5, val=0.5, top=1.0),
        run(task="c", lr=1e-3, acc=0.80), run(task="c", lr=2e-3, acc=0.99),
    ])
    # 2e-3 has the higher mean validation accuracy without task b, but collapses on b where 1e-3 learns
    assert choose_lr(runs, [1e-3, 2e-3]) == 1e-3
    clean = [o for o in runs if o.task != "b"]
    assert choose_lr(clean, [1e-3, 2e-3]) == 2e-3


def test_ties_go_to_the_lower_lr_and_unlearnable_tasks_do_not_vote():
    runs = outcomes([run(lr=5e-4, acc=0.8), run(lr=1e-3, acc=0.8),
                     run(task="hard", lr=5e-4, acc=0.4, val=0.4, majority=0.5), run(task="hard", lr=1e-3, acc=0.5)])
    assert choose_lr(runs, [1e-3, 5e-4]) == 5e-4


def test_the_choice_refuses_without_a_learned_task_or_with_a_missing_candidate():
    with pytest.raises(ValueError, match="no development task was learned"):
        choose_lr(outcomes([run(acc=0.5)]), [1e-3])
    with pytest.raises(ValueError, match="lr 0.002 has no finished run"):
        choose_lr(outcomes([run(acc=0.9)]), [1e-3, 2e-3])


def test_the_verdict_names_the_harmful_collapses_and_the_runs_that_do_not_beat_the_untrained_model():
    runs = outcomes([
        run(task="a", lr=1e-3, acc=0.9), run(task="a", lr=5e-4, acc=0.5, top=1.0),
        run(task="b", method="tsd", lr=1e-3, acc=0.29, untrained=0.3, majority=0.2, top=0.3),
        run(task="b", method="tsd", lr=5e-4, acc=0.9, untrained=0.3, majority=0.2),
        run(task="hard", lr=1e-3, acc=0.5),
    ])
    good = verdict(runs, 1e-3)
    assert good.kept == ["a", "b"] and good.beyond == ["hard"] and not good.harmful
    assert [(o.task, o.method) for o in good.not_beating] == [("b", "tsd")] and not good.passed
    bad = verdict(runs, 5e-4)
    assert [(o.task, o.lr) for o in bad.harmful] == [("a", 5e-4)] and not bad.passed


def test_a_failed_check_chooses_again_on_every_set_seen_and_the_next_set_checks_the_new_lr():
    dev = outcomes([run(task="d", lr=5e-4, acc=0.82), run(task="d", lr=1e-3, acc=0.80)])
    # 5e-4 wins on dev by validation, then is stuck at the majority class on e where 1e-3 learns
    first = outcomes([run(task="e", lr=5e-4, acc=0.5, top=1.0), run(task="e", lr=1e-3, acc=0.9)])
    second_ok = outcomes([run(task="f", lr=5e-4, acc=0.9), run(task="f", lr=1e-3, acc=0.9)])
    result = staged_choice([("dev", dev), ("eval", first), ("eval2", second_ok)], [5e-4, 1e-3])
    assert [(s.lr, s.chosen_on, s.checked_on, s.verdict.passed) for s in result.stages] == [
        (5e-4, ["dev"], "eval", False), (1e-3, ["dev", "eval"], "eval2", True)]
    assert result.final == 1e-3 and result.final_chosen_on == ["dev", "eval"] and result.checked
    # a passed check keeps the lr; a failure on the last set leaves the new choice unchecked
    kept = staged_choice([("dev", dev), ("eval2", second_ok)], [5e-4, 1e-3])
    assert kept.final == 5e-4 and kept.checked
    unchecked = staged_choice([("dev", dev), ("eval", first)], [5e-4, 1e-3])
    assert unchecked.final == 1e-3 and not unchecked.checked and unchecked.final_chosen_on == ["dev", "eval"]
    with pytest.raises(ValueError, match="no task set"):
        staged_choice([], [1e-3])


def test_a_run_that_ended_collapsed_is_replaced_by_its_restart_where_that_ranks_higher():
    """As ``lora-tsd train --stuck-restarts 1`` exports: the restart (seed + 1000) replaces a run that ended
    collapsed when it is not collapsed or has the higher validation accuracy; a tie keeps the first run."""
    runs = outcomes([run(acc=0.66, val=0.66, top=1.0, majority=0.66, ended=True),  # stuck, restart learns
                     run(method="tsd", acc=0.5, val=0.5, top=1.0, ended=True),  # stuck, restart stuck: tie
                     run(task="u", acc=0.9, val=0.9),  # learned: never replaced
                     run(task="v", acc=0.5, val=0.5, top=1.0, ended=True)])  # no restart run
    restarts = outcomes([run(seed=1000, acc=0.785, val=0.775, top=0.85, majority=0.66),
                         run(method="tsd", seed=1000, acc=0.4, val=0.5, top=1.0, ended=True),
                         run(task="u", seed=1000, acc=0.95, val=0.95),
                         run(task="v", seed=1001, acc=0.9, val=0.9)])  # another seed's restart
    replaced, tie, learned, alone = with_restarts(runs, restarts)
    assert replaced.seed == 0 and replaced.restart_seed == 1000 and replaced.test_accuracy == 0.785
    assert replaced.learned and not replaced.collapsed
    assert (tie, learned, alone) == tuple(runs[1:]) and tie.restart_seed is None
    # the verdict sees the restarted run: the collapse that was harmful at 1e-3 is gone
    other = outcomes([run(lr=2e-3, acc=0.785, val=0.775, majority=0.66)])
    assert verdict(runs[:1] + other, 1e-3).harmful and not verdict([replaced] + other, 1e-3).harmful
