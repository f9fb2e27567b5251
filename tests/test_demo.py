"""tests/demo.py --check: both halves come up on loopback and both URLs play."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import TESTS_DIR, require_gi, require_tool

pytestmark = pytest.mark.real_peer


def test_demo_check_plays_both_urls() -> None:
    require_tool("ffmpeg")
    require_tool("ffprobe")
    require_tool("gst-launch-1.0")
    require_gi()
    done = subprocess.run(
        [sys.executable, str(TESTS_DIR / "demo.py"), "--check"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    story = done.stdout + done.stderr
    assert done.returncode == 0, story
    lines = re.findall(r"^(\d+) frames decoded from (rtsp://\S+)$", done.stdout, re.M)
    counts = {url: int(frames) for frames, url in lines}
    assert len(counts) == 2, story
    assert any(url.endswith("/live.000") for url in counts), story
    assert any("/cam/realmonitor" in url for url in counts), story
    assert all(frames >= 50 for frames in counts.values()), story


def test_readme_first_section_is_set_up_and_the_demo() -> None:
    readme = (TESTS_DIR.parent / "README.md").read_text()
    first = readme.split("\n## ")[1]  # the first section after the title and intro
    commands = [
        line
        for block in re.findall(r"```sh\n(.*?)```", first, re.S)
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(commands) == 3, commands
    assert commands[0].startswith("sudo apt-get install") and "python3 -m venv" in commands[1]
    assert commands[2] == ".venv/bin/python tests/demo.py"
    assert readme.split("\n## ")[2].startswith("Run the tests")
