"""Every ``--help`` is complete: each subcommand described, each default stated once, the bench's help reachable."""

from __future__ import annotations

import argparse
import re

import pytest

from lora_tsd.app.cli import main
from lora_tsd.app.cli.main import build_parser

DEFAULT_STATEMENT = re.compile(r"\(default\b|\bdefault: ")


def all_parsers(parser: argparse.ArgumentParser, name: str = "lora-tsd"):
    """``(command name, parser)`` for the parser and every subcommand below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag, so a line is one flag's help


def test_every_subcommand_has_a_description_and_states_each_default_once(wide):
    seen = []
    for name, parser in all_parsers(build_parser()):
        seen.append(name)
        if name != "lora-tsd":
            assert parser.description, f"`{name} --help` has no description"
        for line in parser.format_help().splitlines():
            assert len(DEFAULT_STATEMENT.findall(line)) <= 1, f"`{name} --help` states a default twice: {line}"
    assert {"lora-tsd train", "lora-tsd eval", "lora-tsd export", "lora-tsd models", "lora-tsd tasks",
            "lora-tsd bench", "lora-tsd compare", "lora-tsd analyze"} <= set(seen)


def test_train_help_states_the_defaults(wide, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.lstrip().startswith("--r R, --rank R"))
    assert line.endswith("LoRA rank (default: 8)")
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--output-dir"))
    line = lines[at + 1]  # a long metavar puts the help on the next line
    assert "(default: a new runs/<model>-<task>-<method>-r<r>, with -2, -3, ... appended when taken" in line


def test_eval_help_states_the_defaults_of_split_and_max_eval(wide, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "split to score (default: test)" in out
    assert "cap on evaluation examples (default: the run's max_eval; 500 for a bare model)" in out


def test_bench_help_works_and_the_top_level_help_points_to_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: lora-tsd bench [-h] [--quick]")
    assert "performance benchmarks (options: `lora-tsd bench --help`)" in build_parser().format_help()
