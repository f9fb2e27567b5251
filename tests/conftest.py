"""Fixtures shared by every test: ports, processes, real RTSP peers.

Real peers (ffmpeg, GStreamer, tshark) are system tools. When one is missing
the tests that need it are skipped with the reason, except where the
environment sets ``REQUIRE_REAL_PEERS=1`` (``.ci/run`` does): there a missing
peer fails the test, so CI never skips them silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
VECTORS_PATH = TESTS_DIR / "data" / "vectors.json"  # golden vectors, see tests/data/README.md
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, the one with `gi`

if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))


# --------------------------------------------------------------------------
# Ports and tools


def free_port(kind: str = "tcp") -> int:
    """Return a loopback port that is free right now for ``kind`` ("tcp"/"udp")."""
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    """Block until a TCP connection to host:port succeeds, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepted on {host}:{port} within {timeout}s") from None
            time.sleep(0.05)  # polling interval of a readiness check, not a readiness guess


def require_tool(name: str) -> str:
    """Path of a system tool; skip (or fail under REQUIRE_REAL_PEERS=1) if missing."""
    path = shutil.which(name)
    if path is None and os.path.isabs(name) and os.access(name, os.X_OK):
        path = name
    if path:
        return path
    reason = f"{name} is not installed (install it as .ci/run does)"
    if os.environ.get("REQUIRE_REAL_PEERS") == "1":
        pytest.fail(f"REQUIRE_REAL_PEERS=1 but {reason}")
    pytest.skip(reason)


def require_gi() -> str:
    """Debian's python3 with the GStreamer RTSP server bindings, else skip/fail."""
    python = require_tool(SYSTEM_PYTHON)
    probe = subprocess.run(
        [python, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        reason = "python3-gi with gir1.2-gst-rtsp-server-1.0 is not installed"
        if os.environ.get("REQUIRE_REAL_PEERS") == "1":
            pytest.fail(f"REQUIRE_REAL_PEERS=1 but {reason}")
        pytest.skip(reason)
    return python


@pytest.fixture
def unused_port() -> Callable[[str], int]:
    return free_port


# --------------------------------------------------------------------------
# Golden vectors


@functools.cache
def load_vectors() -> dict:
    """The golden vectors of tests/data/vectors.json, read once (do not mutate them)."""
    return json.loads(VECTORS_PATH.read_text())


@pytest.fixture(scope="session")
def vectors() -> dict:
    """The golden vectors, by section: "ptcp", "dhp2p", "smartviewer", ..."""
    return load_vectors()


# --------------------------------------------------------------------------
# Processes


class Proc:
    """A child process whose stdout and stderr are collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str] | None, cwd: str | None) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._collect, args=(stream,), daemon=True)
            for stream in (self.popen.stdout, self.popen.stderr)
        ]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for an output line matching ``pattern``; fail if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise AssertionError(
                        f"{self.argv[0]} exited ({self.popen.returncode}) before printing "
                        f"{pattern!r}:\n{chr(10).join(self.lines)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout}s:\n"
                        + "\n".join(self.lines)
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait(self, timeout: float = 20.0) -> int:
        returncode = self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process, wait for it, kill it if it lingers; return its exit code."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        for reader in self._readers:
            reader.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None and not any(r.is_alive() for r in self._readers):
                stream.close()
        return self.popen.returncode


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    """Start processes that are always stopped and reaped at teardown."""
    started: list[Proc] = []

    def _spawn(
        argv: list[str],
        *,
        ready: str | None = None,
        ready_port: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 20.0,
    ) -> Proc:
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        proc = Proc([str(a) for a in argv], full_env, cwd)
        started.append(proc)
        if ready is not None:
            proc.wait_line(ready, timeout)
        if ready_port is not None:
            wait_for_port("127.0.0.1", ready_port, timeout)
        return proc

    yield _spawn
    for proc in started:
        try:
            proc.stop(timeout=5)
        except Exception:  # teardown must reap every process
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)


# --------------------------------------------------------------------------
# The camera: GStreamer's RTSP server


@dataclasses.dataclass
class Camera:
    host: str
    port: int
    user: str | None = None
    password: str | None = None

    def url(
        self, path: str = "/cam/realmonitor?channel=1&subtype=0", credentials: bool = True
    ) -> str:
        auth = f"{self.user}:{self.password}@" if credentials and self.user else ""
        return f"rtsp://{auth}{self.host}:{self.port}{path}"


def _start_camera(user: str | None, password: str | None) -> Iterator[Camera]:
    python = require_gi()
    require_tool("gst-launch-1.0")
    argv = [python, str(TESTS_DIR / "camera_server.py"), "--port", "0"]
    if user is not None:
        argv += ["--user", user, "--password", password or ""]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONHOME", "PYTHONPATH"))}
    env["VIRTUAL_ENV"] = ""
    proc = Proc(argv, env, None)
    try:
        match = proc.wait_line(r"listening rtsp://([\d.]+):(\d+)/", timeout=30)
        yield Camera(match.group(1), int(match.group(2)), user, password)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def rtsp_camera() -> Iterator[Camera]:
    """A live H.264 camera (640x360, 25 fps, GOP 25) at /cam/realmonitor on loopback."""
    yield from _start_camera(None, None)


@pytest.fixture(scope="session")
def rtsp_camera_auth() -> Iterator[Camera]:
    """The same camera behind digest credentials admin/admin123."""
    yield from _start_camera("admin", "admin123")


# --------------------------------------------------------------------------
# Real RTSP clients


@dataclasses.dataclass
class PlayResult:
    frames: int
    errors: list[str]
    returncode: int | None
    output: str


# Lines a client prints when the stream, not the shutdown, went wrong.
_ERROR_PATTERNS = re.compile(
    r"error|corrupt|concealing|missing|invalid|non-existing|mmco|decode_slice|"
    r"Nonmatching|failed|Could not|Unauthorized|not-linked|max delay reached|RTP: PT=",
    re.IGNORECASE,
)
# Lines from gst-launch that say it was interrupted as asked, not that it failed.
_BENIGN = re.compile(
    r"Interrupt|Handling interrupt|EOS on shutdown|Waiting for EOS|Got EOS|Execution ended|"
    r"Setting pipeline|Freeing pipeline|Pipeline is|Prerolled|Progress:|New clock|Redistribute",
)


def _error_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if _ERROR_PATTERNS.search(line) and not _BENIGN.search(line) and "last-message" not in line
    ]


def play(
    url: str,
    client: str = "ffprobe",
    transport: str = "tcp",
    seconds: float = 4.0,
    timeout: float | None = None,
    wrap: list[str] | None = None,
) -> PlayResult:
    """Watch ``url`` with a real client for about ``seconds`` and count decoded frames.

    ``wrap`` prefixes the client's argv (``ip netns exec NS`` in the NAT lab)."""
    wrap = wrap or []
    if transport not in ("tcp", "udp"):
        raise ValueError(f"transport must be tcp or udp, not {transport!r}")
    limit = timeout if timeout is not None else seconds + 30
    if client == "ffprobe":
        argv = [
            require_tool("ffprobe"), "-v", "error", "-rtsp_transport", transport,
            "-timeout", "10000000", "-count_frames", "-read_intervals", f"%+{seconds}",
            "-select_streams", "v:0", "-show_entries", "stream=nb_read_frames",
            "-of", "default=noprint_wrappers=1", url,
        ]  # fmt: skip
        done = subprocess.run([*wrap, *argv], capture_output=True, text=True, timeout=limit)
        match = re.search(r"nb_read_frames=(\d+)", done.stdout)
        frames = int(match.group(1)) if match else 0
        output = done.stdout + done.stderr
        return PlayResult(frames, _error_lines(done.stderr), done.returncode, output)
    if client == "ffmpeg":
        argv = [
            require_tool("ffmpeg"), "-nostdin", "-hide_banner", "-nostats", "-v", "error",
            "-rtsp_transport", transport, "-timeout", "10000000", "-i", url,
            "-t", str(seconds), "-map", "0:v:0", "-f", "null", "-progress", "pipe:1", "-",
        ]  # fmt: skip
        done = subprocess.run([*wrap, *argv], capture_output=True, text=True, timeout=limit)
        counts = re.findall(r"^frame=(\d+)", done.stdout, re.MULTILINE)
        frames = int(counts[-1]) if counts else 0
        output = done.stdout + done.stderr
        return PlayResult(frames, _error_lines(done.stderr), done.returncode, output)
    if client == "gst":
        gst = require_tool("gst-launch-1.0")
        pipeline = [
            "rtspsrc", f'location="{url}"', f"protocols={transport}", "latency=200",
            "tcp-timeout=10000000", "!", "rtph264depay", "!", "h264parse", "!", "avdec_h264",
            "!", "fakesink", "silent=false", "sync=false",
        ]  # fmt: skip
        env = dict(
            os.environ,
            GST_DEBUG="rtspsrc:2,avdec_h264:2,libav:2,rtph264depay:2",
            GST_DEBUG_NO_COLOR="1",
        )
        proc = Proc([*wrap, gst, "-v", "-e", *pipeline], env, None)
        try:
            # The watch time starts with the first decoded frame.
            proc.wait_line("last-message = chain", timeout=limit)
            try:
                proc.popen.wait(seconds)
            except subprocess.TimeoutExpired:
                pass
        except AssertionError:
            pass  # exited or never played: the counts below tell
        finally:
            returncode = proc.stop(signal.SIGINT, timeout=10)
        output = proc.output
        frames = sum(1 for line in output.splitlines() if "last-message = chain" in line)
        errors = _error_lines(output)
        if returncode != 0:
            errors.append(f"gst-launch-1.0 exited with {returncode}")
        return PlayResult(frames, errors, returncode, output)
    raise ValueError(f"unknown client {client!r}")


@pytest.fixture
def player() -> Callable[..., PlayResult]:
    return play
