"""The whole chain as a user runs it, and live555 (VLC's RTSP client code) as a viewer.

* The emulated DVR's command line (README "try it without hardware"):
  ``tests/dvr_rtsp_emulator.py`` behind ``rtsp_proxy.py``, both as processes, watched by ffprobe.
* live555: PyPI's ``liblivemedia`` wraps live555's ``ProxyServerMediaSession`` (a live555
  ``RTSPClient`` on the back end, a live555 ``RTSPServer`` in front).  It pulls
  ``rtsp://[user:pass@]PROXY/live.000`` from our proxy and ffprobe watches live555's re-served
  URL.  The binding hard-codes the back-end transport to RTP over UDP (``addURI`` passes
  ``tunnelOverHTTPPortNum=0``), so live555 always asks our proxy for UDP; ffprobe asks live555
  for both UDP and TCP.

This file is also the live555 runner: ``python tests/test_live555.py URL [USER PASSWORD]``
serves ``URL`` through live555 on a free loopback port, prints
``live555 proxy rtsp://127.0.0.1:PORT/cam`` and runs until SIGTERM/SIGINT.  It runs in its own
process because the binding's event loop is a detached C++ thread that cannot be joined and
its destructor frees objects it did not allocate.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _proxy_support import (  # noqa: F401  (fixtures)
    PROXY,
    RawRTSP,
    dvr_factory,
    h264_small,
    start_proxy,
)

import dvr_rtsp_emulator
from conftest import play

EMULATOR = Path(__file__).resolve().parent / "dvr_rtsp_emulator.py"
CREDS_ENV = {"SV_USER": "admin", "SV_PASS": "4321"}
LINE_RE = r"emulated DVR: rtsp://127\.0\.0\.1:(\d+)/ \(DCP (\d+), side port (\d+), mode (\w+), "


def assert_decoded(result, frames: int = 50) -> None:
    assert result.frames >= frames and not result.errors, result.output[-4000:]


# --------------------------------------------------------------------------
# The emulated DVR's command line, behind the proxy's command line


@pytest.mark.real_peer
@pytest.mark.parametrize("mode", ["tcp", "udp"])
def test_emulator_cli_behind_proxy_cli(spawn, mode: str) -> None:
    dvr = spawn(
        [sys.executable, EMULATOR, "--mode", mode, "--port", "0"], ready=LINE_RE, timeout=60
    )
    match = dvr.wait_line(LINE_RE)
    port, dcp, side, shown_mode = match.groups()
    assert (int(dcp), int(side), shown_mode) == (int(port) + 1, int(port) + 2, mode)
    assert "login admin/4321)" in match.string
    proxy = spawn(
        [sys.executable, PROXY, "127.0.0.1:0", f"127.0.0.1:{port}"],
        ready=r"listening rtsp://",
        env=CREDS_ENV,
    )
    address = proxy.wait_line(r"listening rtsp://([\d.]+:\d+)/").group(1)

    result = play(f"rtsp://{address}/live.000", "ffprobe", "udp", seconds=4)
    assert_decoded(result)

    assert proxy.stop() == 0
    assert dvr.stop() == 0, dvr.output
    assert not [line for line in dvr.lines if "violation:" in line], dvr.output
    assert re.search(r"stopped after [1-9]\d* frames, 0 violations", dvr.output), dvr.output


def test_emulator_cli_logs_violations_as_they_happen(spawn, tmp_path, h264_small) -> None:  # noqa: F811
    sample = tmp_path / "sample.h264"
    sample.write_bytes(h264_small)
    dvr = spawn([sys.executable, EMULATOR, "-q", "--h264", sample], ready=LINE_RE)
    port = int(dvr.wait_line(LINE_RE).group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        # PROTOCOLS 1.2: the box never answers OPTIONS; the emulator says so at once
        sock.sendall(b"OPTIONS rtsp://127.0.0.1/live.000 RTSP/1.0\r\nCSeq: 1\r\n\r\n")
        dvr.wait_line(r"DVR violation: OPTIONS sent", timeout=10)
    assert dvr.stop(signal.SIGINT) == 0
    assert "1 violations" in dvr.output


def test_emulator_cli_errors(tmp_path, h264_small, caplog) -> None:  # noqa: F811
    sample = tmp_path / "sample.h264"
    sample.write_bytes(h264_small)
    for bad in (["--port", "70000"], ["--mode", "sctp"]):
        with pytest.raises(SystemExit) as usage:
            dvr_rtsp_emulator.main(bad)
        assert usage.value.code == 2
    assert dvr_rtsp_emulator.main(["--h264", str(tmp_path / "missing.h264")]) == 1
    assert "No such file" in caplog.text
    no_h264 = tmp_path / "text.h264"
    no_h264.write_bytes(b"not a video")
    assert dvr_rtsp_emulator.main(["--h264", str(no_h264)]) == 1
    assert "no H.264 frames" in caplog.text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert dvr_rtsp_emulator.main(["--h264", str(sample), "--port", str(port)]) == 1
    assert f"ports {port}..{port + 2} are not all free" in caplog.text


# --------------------------------------------------------------------------
# live555


def require_liblivemedia() -> None:
    """Skip (fail under REQUIRE_REAL_PEERS=1) unless live555's ProxyServer is importable."""
    try:
        module = importlib.import_module("liblivemedia")
        reason = None if hasattr(module, "ProxyServer") else (
            "liblivemedia is installed without its compiled module (its build needs cmake, "
            "g++ and python3-dev, and a python3 on PATH matching the venv's)"
        )  # fmt: skip
    except ImportError as exc:
        reason = f"liblivemedia is not importable ({exc}); pip install -r tests/requirements.txt"
    if reason is None:
        return
    if os.environ.get("REQUIRE_REAL_PEERS") == "1":
        pytest.fail(f"REQUIRE_REAL_PEERS=1 but {reason}")
    pytest.skip(reason)


def describe_status(url: str) -> int:
    """Status of one unauthenticated DESCRIBE of ``url`` (0 if the connection fails)."""
    address = url.split("/")[2]
    try:
        with RawRTSP(address, timeout=5) as raw:
            return raw.request("DESCRIBE", url, Accept="application/sdp")[0]
    except (OSError, ConnectionError):
        return 0


@pytest.fixture
def live555(spawn):
    """Start live555's proxy server in front of ``url``; return its re-served URL once it is
    ready, i.e. once live555 answers DESCRIBE (it DESCRIBEs the back end asynchronously)."""
    require_liblivemedia()

    def _start(url: str, user: str = "", password: str = "", *, ready: bool = True) -> str:
        proc = spawn(
            [sys.executable, __file__, url, user, password], ready=r"^live555 proxy rtsp://"
        )
        served = proc.wait_line(r"^live555 proxy (rtsp://\S+)").group(1)
        if ready:
            deadline = time.monotonic() + 20
            while (status := describe_status(served)) != 200:
                assert time.monotonic() < deadline, f"live555 answers DESCRIBE with {status}"
                time.sleep(0.1)  # polling interval of a readiness check
        return served

    return _start


@pytest.mark.real_peer
@pytest.mark.parametrize("viewer", ["udp", "tcp"])
@pytest.mark.parametrize("mode", ["tcp", "udp"])
def test_live555_pulls_from_proxy(dvr_factory, start_proxy, h264_small, live555, mode, viewer):  # noqa: F811
    dvr = dvr_factory(mode, h264=h264_small)
    _, address = start_proxy(dvr, env=CREDS_ENV)
    served = live555(f"rtsp://{address}/live.000")

    result = play(served, "ffprobe", viewer, seconds=4)
    assert_decoded(result)
    assert dvr.violations == []
    assert dvr.rtsp_sessions_started == 1


@pytest.mark.real_peer
def test_live555_pauses_and_resumes_its_back_end(
    dvr_factory, start_proxy, h264_small, live555  # noqa: F811
) -> None:
    """live555 PAUSEs our proxy when its last viewer leaves and PLAYs the same session
    again for the next one; two viewers at once share it."""
    dvr = dvr_factory("tcp", h264=h264_small)
    proc, address = start_proxy(dvr, "-v", env=CREDS_ENV)  # -vv: requests are logged
    served = live555(f"rtsp://{address}/live.000")

    assert_decoded(play(served, "ffprobe", "udp", seconds=3), 40)
    proc.wait_line(r": PAUSE rtsp://")
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda t: play(served, "ffprobe", t, seconds=3), ["tcp", "udp"]))
    for result in both:
        assert_decoded(result, 40)
    assert len([line for line in proc.lines if ": PLAY rtsp://" in line]) >= 2
    assert dvr.violations == []
    assert dvr.rtsp_sessions_started == 1


@pytest.mark.real_peer
@pytest.mark.parametrize("where", ["url", "arguments"])
def test_live555_with_client_credentials(
    dvr_factory, start_proxy, h264_small, live555, where: str  # noqa: F811
) -> None:
    password = "Zq-77-secret"
    dvr = dvr_factory("udp", h264=h264_small, users={"admin": password})
    proc, address = start_proxy(dvr, env={})  # no SV_USER: the clients' Basic credentials log in
    if where == "url":  # as VLC users type them
        served = live555(f"rtsp://admin:{password}@{address}/live.000")
    else:
        served = live555(f"rtsp://{address}/live.000", "admin", password)

    result = play(served, "ffprobe", "udp", seconds=4)
    assert_decoded(result)
    assert dvr.violations == []
    assert dvr.rtsp_sessions_started == 1
    assert dvr.dcp.logins >= 1 and password not in proc.output


@pytest.mark.real_peer
def test_live555_with_a_wrong_password_gets_nothing(
    dvr_factory, start_proxy, h264_small, live555  # noqa: F811
) -> None:
    dvr = dvr_factory("udp", h264=h264_small)
    proc, address = start_proxy(dvr, env={})
    served = live555(f"rtsp://admin:wrong@{address}/live.000", ready=False)
    proc.wait_line(r"DVR login refused")  # live555's DESCRIBE got as far as the DVR login

    assert describe_status(served) == 404  # live555: nothing to re-serve
    assert dvr.rtsp_sessions_started == 0 and dvr.frames_sent == 0
    assert dvr.violations == []


# --------------------------------------------------------------------------
# The live555 runner (this file as a script)


def serve_live555(argv: list[str] | None = None) -> int:
    """Serve URL through live555's proxy server on 127.0.0.1 until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=serve_live555.__doc__)
    parser.add_argument("url", help="back-end rtsp://[user:pass@]host:port/path")
    parser.add_argument("user", nargs="?", default="", help="back-end user (addURI)")
    parser.add_argument("password", nargs="?", default="", help="back-end password (addURI)")
    parser.add_argument("--name", default="cam", help="stream name live555 serves (cam)")
    args = parser.parse_args(argv)
    import liblivemedia

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = liblivemedia.ProxyServer("127.0.0.1", 0)  # port 0: live555 binds a free one
    server.addURI(args.url, args.name, args.user, args.password)
    server.start()
    print(f"live555 proxy {server.getRootURI()}{args.name}", flush=True)
    stop.wait()
    sys.stdout.flush()
    # The C++ event loop thread cannot be joined and ~ProxyServer frees what `new` made.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(serve_live555())
