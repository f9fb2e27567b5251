"""The repository is self-contained: no tracked file refers to a folder beside the clone."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built from parts so that this file does not match its own pattern.
_SHARED = "shared"
OUTSIDE = re.compile(
    re.escape(".." + "/" + _SHARED)
    + "|" + re.escape(_SHARED + "/vectors")
    + "|" + re.escape('"' + _SHARED + '"') + r"\s*/"  # a pathlib join of that folder
)


def tracked_files() -> list[Path]:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = subprocess.run(
        [git, "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    return [REPO / name.decode() for name in names if name]


def test_pattern_finds_what_it_looks_for() -> None:
    assert OUTSIDE.search("see " + ".." + "/" + _SHARED + "/PROTOCOLS.md")
    assert OUTSIDE.search("tests read " + _SHARED + "/vectors.json")
    assert OUTSIDE.search('json.loads((REPO.parent / "' + _SHARED + '" / "vectors.json"))')
    assert not OUTSIDE.search("tests/data/vectors.json, a shared window")


def test_no_tracked_file_refers_to_the_shared_folder() -> None:
    hits = []
    for path in tracked_files():
        if not path.is_file():
            continue  # deleted in the work tree but still in the index
        text = path.read_bytes().decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert hits == [], "files refer to a folder outside the repository:\n" + "\n".join(hits)


def test_golden_vectors_are_in_the_repository(vectors: dict) -> None:
    assert {"ptcp", "dhp2p", "smartviewer", "samsung_rtp"} <= set(vectors)
