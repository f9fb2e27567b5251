"""Both halves of the product on loopback, against the emulators the tests use.

    .venv/bin/python tests/demo.py           # print two rtsp:// URLs, run until ^C
    .venv/bin/python tests/demo.py --check   # watch both with ffprobe, count frames

The Samsung half: the emulated DVR (tests/dvr_rtsp_emulator.py) with rtsp_proxy.py
in front of it. The Dahua half: GStreamer's RTSP camera (tests/camera_server.py,
run with Debian's python3), the emulated cloud and device (tests/p2p_emulator.py)
and dh_p2p.py tunnelling to it. Every program is a child in a process group of
its own; all of them are stopped when the demo ends, however it ends.

Exit codes: 0 ok (with --check: both URLs decoded at least MIN_FRAMES frames),
1 a program did not start or a URL decoded too few frames, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import REPO_DIR, SYSTEM_PYTHON, Proc, play  # noqa: E402

MIN_FRAMES = 50  # two seconds of the 25 fps test patterns
WATCH_SECONDS = 4.0  # how long --check watches each URL
SV_LOGIN = {"SV_USER": "admin", "SV_PASS": "4321"}  # the emulated DVR's default login
START_TIMEOUT = 60.0  # the DVR emulator first encodes its test pattern with ffmpeg


class DemoError(Exception):
    """A program of the demo did not start, or a tool it needs is missing."""


@dataclass
class Stream:
    """One URL the demo serves and what it shows."""

    name: str
    url: str


class Programs:
    """The demo's child processes: started in order, stopped together, group by group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, Proc]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        full_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        proc = Proc([str(a) for a in argv], full_env, None)  # a new session: its own group
        self.procs.append((name, proc))
        return proc

    def wait_line(self, name: str, proc: Proc, pattern: str) -> re.Match[str]:
        """The first output line of ``proc`` matching ``pattern``; DemoError if it ends."""
        try:
            return proc.wait_line(pattern, timeout=START_TIMEOUT)
        except AssertionError as exc:  # Proc's way of saying it exited or stayed silent
            raise DemoError(f"{name} did not start: {exc}") from None

    def exited(self) -> list[str]:
        """Names of the children that have ended on their own."""
        return [name for name, proc in self.procs if proc.popen.poll() is not None]

    def stop_all(self) -> None:
        """SIGTERM every group, then SIGKILL whatever is left of it (grandchildren too)."""
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second ^C must not cut this short
            signal.signal(signum, signal.SIG_IGN)
        for _name, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            proc.stop(timeout=5)  # reaps the leader and joins the output readers


def _signal_group(proc: Proc, sig: int) -> None:
    try:
        os.killpg(proc.popen.pid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise DemoError(f"{tool} is not installed: run the first set-up command in README.md")
    return path


def _camera_env() -> dict[str, str]:
    """The environment for Debian's python3: none of the venv's Python settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONHOME", "PYTHONPATH"))}
    env["VIRTUAL_ENV"] = ""
    return env


def start_everything(programs: Programs) -> list[Stream]:
    """Start both halves; return their URLs once every program says it is ready."""
    _need("ffmpeg")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise DemoError(f"{SYSTEM_PYTHON} (Debian's, with python3-gi) is needed for the camera")
    python = sys.executable
    # The two slow starters first, so that they come up side by side.
    dvr = programs.start("the emulated DVR", [python, TESTS / "dvr_rtsp_emulator.py", "-q"])
    camera = programs.start(
        "the GStreamer camera",
        [SYSTEM_PYTHON, TESTS / "camera_server.py", "--port", "0"],
        env=_camera_env(),
    )

    dvr_address = programs.wait_line(
        "the emulated DVR", dvr, r"emulated DVR: rtsp://([\d.]+:\d+)/"
    ).group(1)
    proxy = programs.start(
        "rtsp_proxy.py",
        [python, REPO_DIR / "rtsp_proxy.py", "127.0.0.1:0", dvr_address],
        env=dict(os.environ, **SV_LOGIN),
    )

    camera_address = programs.wait_line(
        "the GStreamer camera", camera, r"listening rtsp://([\d.]+:\d+)/"
    ).group(1)
    emulator = programs.start(
        "the emulated cloud and device",
        [python, TESTS / "p2p_emulator.py", "--map", f"554={camera_address}"],
    )
    serial, smartpss, dmss = programs.wait_line(
        "the emulated cloud and device",
        emulator,
        r"^cloud 127\.0\.0\.1:\d+ serial (\S+) .*--cloud (smartpss=\S+) --cloud (dmss=[^\s)]+)",
    ).groups()
    tunnel = programs.start(
        "dh_p2p.py",
        [
            python, REPO_DIR / "dh_p2p.py", "--cloud", smartpss, "--cloud", dmss,
            "-p", "127.0.0.1:0:554", serial,
        ],
    )  # fmt: skip

    proxy_url = programs.wait_line("rtsp_proxy.py", proxy, r"listening (rtsp://\S+)").group(1)
    tunnel_url = programs.wait_line("dh_p2p.py", tunnel, r"^RTSP: (rtsp://\S+)").group(1)
    programs.wait_line("dh_p2p.py", tunnel, r"^ready: ")
    return [
        Stream("Samsung DVR (emulated) through rtsp_proxy.py", proxy_url),
        Stream(f"Dahua device {serial} (emulated) through dh_p2p.py", tunnel_url),
    ]


def check(streams: list[Stream]) -> bool:
    """Watch every URL with ffprobe; print the frames decoded; True if all reach MIN_FRAMES."""
    _need("ffprobe")
    ok = True
    for stream in streams:
        result = play(stream.url, "ffprobe", "tcp", seconds=WATCH_SECONDS)
        good = result.frames >= MIN_FRAMES
        ok = ok and good
        print(f"{result.frames} frames decoded from {stream.url}", flush=True)
        if not good:
            print(f"  too few (want {MIN_FRAMES}); ffprobe said:\n{result.output[-2000:]}")
    return ok


def serve(programs: Programs, streams: list[Stream]) -> int:
    """Print the URLs and run until ^C or SIGTERM, or until a program ends by itself."""
    for stream in streams:
        print(f"{stream.name}:\n    {stream.url}")
    print(
        "Open them in VLC (Media > Open Network Stream) or with "
        "ffplay -rtsp_transport tcp URL. ^C stops everything.",
        flush=True,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):  # also watch for a program that dies on its own
        gone = programs.exited()
        if gone:
            print(f"demo: {', '.join(gone)} ended by itself; stopping", file=sys.stderr)
            return 1
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo.py",
        description="Run both halves of the product on loopback against the emulators.",
        epilog=f"Exit codes: 0 ok, 1 a program did not start or a URL decoded fewer than "
        f"{MIN_FRAMES} frames, 2 usage.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"watch both URLs with ffprobe for {WATCH_SECONDS:g} s each, print the frames "
        f"decoded, and exit 0 only if both decode at least {MIN_FRAMES}",
    )
    args = parser.parse_args(argv)
    programs = Programs()
    # SIGTERM while starting up must clean up too: turn it into the ^C path.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        streams = start_everything(programs)
        if args.check:
            return 0 if check(streams) else 1
        return serve(programs, streams)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        programs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
