"""Helpers of the hardening catalogue (tests/app/test_catalogue_*.py, issue 18): run one CLI case in-process
and check its exit code, the first line of its message, that no traceback was printed, and that every watched
file is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lora_tsd.app.cli import main


def snapshot(*paths: Path) -> dict[str, str]:
    """Content hash of every file at or below ``paths`` (missing paths map to nothing)."""
    found = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for p in files:
            if p.is_file() and not p.is_symlink():
                found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def check_case(argv: list[str], code: int, message: str, capsys, watched: tuple[Path, ...] = ()) -> str:
    """Run ``lora-tsd argv``; assert the exit ``code``, that stderr's error line matches the regex ``message``,
    no traceback, and the ``watched`` files unchanged. Returns stderr."""
    before = snapshot(*watched)
    capsys.readouterr()
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        got = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"lora-tsd {argv[0]}: error: ")]
    assert got == code, (got, err[-2000:])
    assert lines, err[-2000:]
    assert re.search(message, lines[0]), (message, lines[0])
    assert len(lines[0]) < 2000  # messages are bounded
    assert snapshot(*watched) == before
    return err
