"""Fixtures for the rtsp_proxy tests: H.264 samples, the emulated DVR, the proxy process.

Import the fixtures into a test module with
``from _proxy_support import dvr_factory, h264_big, h264_small, start_proxy  # noqa: F401``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import REPO_DIR, Proc, require_tool
from dvr_rtsp_emulator import EmulatedDVR, access_units

PROXY = REPO_DIR / "rtsp_proxy.py"


def _encode(path: Path, source: str, extra: list[str]) -> bytes:
    ffmpeg = require_tool("ffmpeg")
    argv = [
        ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-t", "4",
        "-c:v", "libx264", "-profile:v", "main", "-bf", "0", "-pix_fmt", "yuv420p",
        "-x264-params", "keyint=25:min-keyint=25:scenecut=0", *extra,
        "-bsf:v", "h264_mp4toannexb", "-f", "h264", str(path),
    ]  # fmt: skip
    subprocess.run(argv, check=True, timeout=120)
    return path.read_bytes()


@pytest.fixture(scope="session")
def h264_small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """4 s of 640x360 25 fps H.264, GOP 25, as an Annex-B stream."""
    path = tmp_path_factory.mktemp("h264") / "small.h264"
    return _encode(path, "testsrc2=size=640x360:rate=25", [])


@pytest.fixture(scope="session")
def h264_big(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A noisy stream whose keyframes are larger than 65,535 bytes (checked)."""
    path = tmp_path_factory.mktemp("h264") / "big.h264"
    data = _encode(path, "testsrc2=size=640x360:rate=25,noise=alls=40:allf=u", ["-crf", "14"])
    idr_sizes = [
        sum(len(n) for n in au) for au in access_units(data) if any(n[0] & 0x1F == 5 for n in au)
    ]
    assert idr_sizes and min(idr_sizes) > 65535, idr_sizes
    return data


@pytest.fixture
def dvr_factory() -> Iterator[Callable[..., EmulatedDVR]]:
    """Start emulated DVRs; each is stopped at teardown."""
    started: list[EmulatedDVR] = []

    def _make(mode: str = "tcp", *, h264: bytes, **kwargs) -> EmulatedDVR:
        dvr = EmulatedDVR(mode, h264=h264, **kwargs)
        dvr.start()
        started.append(dvr)
        return dvr

    yield _make
    for dvr in started:
        dvr.stop()


@pytest.fixture
def start_proxy(spawn) -> Callable[..., tuple[Proc, str]]:
    """Run rtsp_proxy.py as a process against a DVR; return (proc, "host:port")."""

    def _start(dvr: EmulatedDVR, *extra: str, env: dict[str, str] | None = None):
        argv = [sys.executable, str(PROXY), "-v", "127.0.0.1:0", dvr.address, *extra]
        proc = spawn(argv, ready=r"listening rtsp://", env=env)
        match = proc.wait_line(r"listening rtsp://([\d.]+:\d+)/")
        return proc, match.group(1)

    return _start
