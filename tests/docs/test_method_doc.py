"""docs/method.md is the project's method reference: it parses into numbered sections, every "method.md §N"
citation in the repository names one of them, and nothing points at notes outside the repository."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHOD_DOC = ROOT / "docs" / "method.md"

# Folders searched (recursively) for citations, and single files at the top level.
CITING_DIRS = ("src", "tests", "bench", "docs")
CITING_FILES = ("README.md",)
# Never searched: tool state, virtual environments, build outputs and run folders (see .gitignore).
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "runs",
             "outputs", "node_modules"}
# The topic each of §1–§7 must keep: code and docs cite these numbers.
STABLE_TOPICS = {1: "Definitions", 2: "Pre-launch", 3: "LoRA-Dash", 4: "LoRA-Init", 5: "LoRA-TSD",
                 6: "Baselines", 7: "Reported results"}

SECTION = re.compile(r"^## (\d+)\. (\S.*)$", re.M)
SUBSECTION = re.compile(r"^### (\d+)\.(\d+)\.? (\S.*)$", re.M)
# A citation: "method.md", then §3, §3.1, a range §3–5 or a list §3, §4 (also across a line break, a
# wrapped comment's # included).
CITATION = re.compile(r"method\.md(?:\s|#)*§\s*(\d+(?:\.\d+)?(?:\s*(?:[–-]|,\s*§|and\s+§)\s*\d+(?:\.\d+)?)*)")
INTERNAL = re.compile(r"§\s*(\d+(?:\.\d+)?(?:\s*[–-]\s*\d+(?:\.\d+)?)?)")
REF = re.compile(r"\d+(?:\.\d+)?")
RANGE = re.compile(r"(\d+)(?:\.\d+)?\s*[–-]\s*(\d+)(?:\.\d+)?")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _sections() -> dict[str, str]:
    """``{"3": "LoRA-Dash (…)", "4.1": "…"}`` for every numbered heading of docs/method.md."""
    text = METHOD_DOC.read_text(encoding="utf-8")
    found = {m.group(1): m.group(2) for m in SECTION.finditer(text)}
    found.update({f"{m.group(1)}.{m.group(2)}": m.group(3) for m in SUBSECTION.finditer(text)})
    return found


def _is_skipped(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
        return True
    # The generated per-grid result files carry no prose citations and are large.
    return rel.parts[:2] == ("docs", "results") and path.suffix == ".json"


def _read_text(path: Path) -> str | None:
    """The file's text, or None for binary files (a NUL byte or not UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _files(roots: list[Path]) -> list[Path]:
    """Every file under ``roots`` (files or folders), skipped folders pruned before they are walked."""
    out = []
    for root in roots:
        if root.is_file():
            out += [] if _is_skipped(root) else [root]
            continue
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
            out += [p for p in (Path(folder) / n for n in sorted(names)) if p.is_file() and not _is_skipped(p)]
    return out


def _citing_files() -> list[Path]:
    return _files([ROOT / d for d in CITING_DIRS if (ROOT / d).is_dir()]
                  + [ROOT / f for f in CITING_FILES if (ROOT / f).is_file()])


def _expand(refs: str) -> list[str]:
    """The sections a citation names: "3–5" → 3, 4, 5; "3, §4.1" → 3, 4.1."""
    names = REF.findall(refs)
    for lo, hi in RANGE.findall(refs):
        names += [str(n) for n in range(int(lo), int(hi) + 1)]
    return names


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def test_method_doc_parses_into_numbered_sections():
    assert METHOD_DOC.is_file(), "docs/method.md is missing"
    sections = _sections()
    top = sorted(int(k) for k in sections if "." not in k)
    assert top, "docs/method.md has no numbered sections ('## 1. Title')"
    assert top == list(range(1, len(top) + 1)), f"sections are not numbered 1, 2, … without gaps: {top}"
    for number, topic in STABLE_TOPICS.items():
        assert str(number) in sections, f"§{number} ({topic}) is missing: code and docs cite it"
        assert topic.lower() in sections[str(number)].lower(), (
            f"§{number} is titled {sections[str(number)]!r}; citations expect it to be about {topic!r}")
    for key in sections:
        if "." in key:
            assert key.split(".")[0] in sections, f"subsection {key} has no section {key.split('.')[0]}"


def test_every_method_md_citation_names_an_existing_section():
    sections = _sections()
    dangling, seen = [], 0
    for path in _citing_files():
        text = _read_text(path)
        if text is None or "method.md" not in text:
            continue
        for match in CITATION.finditer(text):
            seen += 1
            for name in _expand(match.group(1)):
                if name not in sections:
                    dangling.append(f"{path.relative_to(ROOT)}:{_line(text, match.start())}: "
                                    f"{match.group(0)!r} names §{name}")
    assert seen, "no 'method.md §N' citation found: is the search looking in the right folders?"
    assert not dangling, ("citations of sections that docs/method.md does not have "
                          f"(it has {', '.join(sorted(sections, key=_sort_key))}):\n" + "\n".join(dangling))


def _sort_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split("."))


def test_method_doc_cross_references_and_links_resolve():
    """Inside docs/method.md, every bare "§N" names a section of it and every relative link an existing file."""
    sections = _sections()
    text = METHOD_DOC.read_text(encoding="utf-8")
    problems = []
    for match in INTERNAL.finditer(text):
        for name in _expand(match.group(1)):
            if name not in sections:
                problems.append(f"docs/method.md:{_line(text, match.start())}: {match.group(0)!r} names §{name}")
    for match in LINK.finditer(text):
        target = match.group(1).split("#", 1)[0]
        if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # an anchor in the same page, or a URL (the paper, the authors' code)
        resolved = (METHOD_DOC.parent / target).resolve()
        if not resolved.is_relative_to(ROOT):
            problems.append(f"docs/method.md:{_line(text, match.start())}: link {target!r} leaves the repository")
        elif not resolved.exists():
            problems.append(f"docs/method.md:{_line(text, match.start())}: link {target!r} does not exist")
    assert not problems, "\n".join(problems)


def test_no_file_refers_to_the_team_notes_outside_the_repository():
    """The repository must stand alone: no file may point at the team's notes folder outside it."""
    needle = "shared" + "/docs"  # built here so that this file does not match itself
    this_file = Path(__file__).resolve()
    offenders = []
    for path in _files([ROOT]):
        if path.resolve() == this_file:
            continue
        text = _read_text(path)
        if text is None:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                      for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert not offenders, f"files refer to {needle} outside the repository:\n" + "\n".join(offenders)
