"""Fixtures for the rtsp_proxy tests: H.264 samples, the emulated DVR, the proxy process.

Import the fixtures into a test module with
``from _proxy_support import dvr_factory, h264_big, h264_small, proxied, start_proxy``
(with ``# noqa: F401``).
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import REPO_DIR, Proc, require_tool
from dvr_rtsp_emulator import EmulatedDVR, access_units, encode_test_h264

PROXY = REPO_DIR / "rtsp_proxy.py"
CREDS_ENV = {"SV_USER": "admin", "SV_PASS": "4321"}


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling interval of a readiness check


@pytest.fixture(scope="session")
def h264_small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """4 s of 640x360 25 fps H.264, GOP 25, as an Annex-B stream."""
    path = tmp_path_factory.mktemp("h264") / "small.h264"
    return encode_test_h264(path, ffmpeg=require_tool("ffmpeg"))


@pytest.fixture(scope="session")
def h264_big(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A noisy stream whose keyframes are larger than 65,535 bytes (checked)."""
    path = tmp_path_factory.mktemp("h264") / "big.h264"
    data = encode_test_h264(path, big=True, ffmpeg=require_tool("ffmpeg"))
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


@pytest.fixture
def proxied(dvr_factory, start_proxy, h264_small):
    """(dvr, proxy process, "host:port"), credentials held by the proxy unless env says."""

    def _make(mode: str = "tcp", *extra: str, h264: bytes | None = None, env=CREDS_ENV, **kw):
        dvr = dvr_factory(mode, h264=h264 if h264 is not None else h264_small, **kw)
        proc, address = start_proxy(dvr, *extra, env=env)
        return dvr, proc, address

    return _make


class RawRTSP:
    """A minimal blocking RTSP client for byte-level checks of the proxy."""

    def __init__(self, address: str, rcvbuf: int | None = None, timeout: float = 15.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self.buf = b""
        self.cseq = 0
        self.base = f"rtsp://{address}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawRTSP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the proxy")
        self.buf += data

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """Next RTSP reply (interleaved blocks before it are skipped)."""
        while True:
            while self.buf.startswith(b"$"):
                if len(self.buf) < 4:
                    self._fill()
                    continue
                size = 4 + int.from_bytes(self.buf[2:4], "big")
                while len(self.buf) < size:
                    self._fill()
                self.buf = self.buf[size:]
            if self.buf and not self.buf.startswith(b"$") and b"\r\n\r\n" in self.buf:
                break
            self._fill()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            self._fill()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest[length:]
        return status, headers, rest[:length]

    def build(self, method: str, url: str | None = None, headers: dict[str, str] | None = None):
        self.cseq += 1
        lines = [f"{method} {url or self.base + '/live.000'} RTSP/1.0", f"CSeq: {self.cseq}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def request(self, method: str, url: str | None = None, **headers: str):
        self.send(self.build(method, url, {k.replace("_", "-"): v for k, v in headers.items()}))
        return self.read_response()

    def read_interleaved(self) -> tuple[int, bytes]:
        """Next ``$`` block as (channel, packet)."""
        while len(self.buf) < 4:
            self._fill()
        if not self.buf.startswith(b"$"):
            raise AssertionError(f"expected interleaved data, got {self.buf[:40]!r}")
        size = 4 + int.from_bytes(self.buf[2:4], "big")
        while len(self.buf) < size:
            self._fill()
        block, self.buf = self.buf[:size], self.buf[size:]
        return block[1], block[4:]

    def play_tcp(self, url: str | None = None, channel: int = 0, **auth: str) -> dict[str, str]:
        """DESCRIBE, SETUP (interleaved), PLAY; returns the PLAY reply headers."""
        status, _, _ = self.request("DESCRIBE", url, **auth)
        assert status == 200, status
        transport = f"RTP/AVP/TCP;unicast;interleaved={channel}-{channel + 1}"
        status, headers, _ = self.request("SETUP", url, Transport=transport, **auth)
        assert status == 200, status
        session = headers["session"].split(";")[0]
        status, headers, _ = self.request("PLAY", url, Session=session, Range="npt=0-", **auth)
        assert status == 200, status
        headers["session"] = session
        return headers
