"""One table of exit codes for every command-line tool, printed by each --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import EPILOG, MEANINGS, ExitCode

REPO = Path(__file__).resolve().parents[1]


def test_the_table() -> None:
    # Written out: scripts that wrap the tools depend on these numbers.
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "ERROR": 1,
        "USAGE": 2,
        "UNREACHABLE": 3,
        "LOGIN_REFUSED": 4,
        "PROTOCOL": 5,
        "CLOUD_UNREACHABLE": 6,
        "WRONG_APP": 7,
        "INTERRUPTED": 130,
    }
    assert set(MEANINGS) == set(ExitCode)


@pytest.mark.parametrize("script", ["svtool.py", "rtsp_proxy.py", "dh_p2p.py", "ptcp.py"])
def test_help_prints_the_table(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / script), "--help"], capture_output=True, text=True
    )
    assert done.returncode == ExitCode.OK, done.stderr
    assert " ".join(done.stdout.split()).count(EPILOG) == 1, done.stdout


def test_readme_gives_the_table_once() -> None:
    readme = (REPO / "README.md").read_text()
    rows = [f"| {int(code)} | {text} |" for code, text in MEANINGS.items()]
    for row in rows:
        assert readme.count(row) == 1, row
    assert readme.count("Exit codes:") == 0  # no second, older table in prose
