"""The emulated DVR itself: its faults and its strictness, so "zero violations" means something."""

from __future__ import annotations

import socket

import pytest
from _proxy_support import dvr_factory, h264_small  # noqa: F401  (fixtures)

import rtsp_proxy
import svtool
from dvr_rtsp_emulator import access_units, frame_payload


def _recv_until_quiet(sock: socket.socket, timeout: float = 1.0) -> bytes:
    """Everything the DVR sends until it has been silent for ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except TimeoutError:
        return data


@pytest.fixture
def dvr_session(dvr_factory, h264_small):  # noqa: F811
    """Start a DVR, log in over DCP; yield (dvr, token, control socket)."""
    opened = []

    def _open(mode: str, **kwargs):
        dvr = dvr_factory(mode, h264=h264_small, **kwargs)
        keeper = svtool.TokenKeeper(dvr.host, dvr.dcp_port, "admin", "4321", timeout=5)
        token = keeper.start()
        sock = socket.create_connection((dvr.host, dvr.rtsp_port), 5)
        opened.append((keeper, sock))
        return dvr, token, sock

    yield _open
    for keeper, sock in opened:
        sock.close()
        keeper.close()


def req(method: str, url: str, *headers: str) -> bytes:
    return ("\r\n".join([f"{method} {url} RTSP/1.0", *headers]) + "\r\n\r\n").encode()


@pytest.mark.parametrize("mode", ["tcp", "udp"])
def test_emulator_faults_and_stream(dvr_session, h264_small, mode: str) -> None:  # noqa: F811
    dvr, token, sock = dvr_session(mode)
    url = f"rtsp://{dvr.address}/live.002"
    sock.sendall(req("DESCRIBE", url, "CSeq: 1", f"Authorization: {token}"))
    data = _recv_until_quiet(sock, 0.5)
    assert data.startswith(b"RTSP/1.0 200 OK\r\nCSeq: 0\r\n") and data.endswith(b"\x00")
    assert b"Content-Type: text/parameters" in data
    tcp_line = b"m=video 0 TCP RTP/AVP 96 H.264" in data
    assert tcp_line == (mode == "tcp") and b"a=rtpmap" not in data and b"a=control" not in data

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        transport = (
            "RTP/AVP/TCP;unicast"
            if mode == "tcp"
            else f"RTP/AVP/UDP;unicast;client_port={udp.getsockname()[1]}"
        )
        sock.sendall(
            req("SETUP", url, "CSeq: 2", f"Transport: {transport}", f"Authorization: {token}")
        )
        data = _recv_until_quiet(sock, 0.5)
        assert b"\r\n\r\n" not in data and data.endswith(b"\r\n\x00")  # unterminated
        assert b"CSeq: 3\r\n" in data  # the wrong CSeq
        session_line = next(x for x in data.split(b"\r\n") if x.startswith(b"Session: "))
        session = session_line[9:].split(b";")[0].decode()
        defrag = rtsp_proxy.SamsungDefragmenter()
        if mode == "tcp":
            side = socket.create_connection((dvr.host, dvr.side_port), 5)
            side.sendall(session_line + b"\x00")
        else:
            udp.sendto(b"\x00", (dvr.host, dvr.side_port))
        sock.sendall(
            req(
                "PLAY", url, "CSeq: 3", f"Session: {session}", "Range: npt=0.000-",
                "Speed: +1.0", "Bandwidth: 2048", f"Authorization: {token}",
            )  # fmt: skip
        )
        assert _recv_until_quiet(sock, 0.5).startswith(b"RTSP/1.0 200 OK\r\nCSeq: 3\r\n")
        frames = []
        reader = side if mode == "tcp" else udp
        reader.settimeout(5)
        while len(frames) < 30:
            data = reader.recv(65536)
            frames += defrag.feed_stream(data) if mode == "tcp" else defrag.feed_datagram(data)
        if mode == "tcp":
            side.close()
    finally:
        udp.close()
    source = [frame_payload(au) for au in access_units(h264_small)]
    assert [f.payload for f in frames] == source[:30]
    assert all(b.timestamp - a.timestamp == 40 for a, b in zip(frames, frames[1:], strict=False))
    assert dvr.violations == [] and dvr.rtsp_sessions_started == 1


def test_emulator_is_silent_on_options(dvr_session) -> None:
    dvr, _, sock = dvr_session("tcp")
    sock.sendall(req("OPTIONS", f"rtsp://{dvr.address}/live.000", "CSeq: 1"))
    assert _recv_until_quiet(sock, 0.5) == b""
    assert dvr.violations and "OPTIONS" in dvr.violations[0] and not dvr.dead


@pytest.mark.parametrize(
    "case",
    ["bad-url", "setup-order", "setup-extra", "play-order", "pipelined", "teardown"],
)
def test_emulator_deadlocks_on_violations(dvr_session, case: str) -> None:
    dvr, token, sock = dvr_session("tcp")
    url = f"rtsp://{dvr.address}/live.000"
    auth = f"Authorization: {token}"
    transport = "Transport: RTP/AVP/TCP;unicast"
    if case == "bad-url":
        bad = req("DESCRIBE", f"rtsp://{dvr.address}/cam/realmonitor", "CSeq: 1", auth)
    elif case == "setup-order":
        bad = req("SETUP", url, "CSeq: 1", auth, transport)
    elif case == "setup-extra":
        bad = req("SETUP", url, "CSeq: 1", transport, auth, "User-Agent: x")
    elif case == "play-order":
        sock.sendall(req("SETUP", url, "CSeq: 1", transport, auth))
        session = _recv_until_quiet(sock, 0.5).split(b"Session: ")[1].split(b";")[0].decode()
        bad = req(
            "PLAY", url, "CSeq: 2", f"Session: {session}", "Speed: +1.0",
            "Range: npt=0.000-", "Bandwidth: 2048", auth,
        )  # fmt: skip
    elif case == "pipelined":
        one = req("DESCRIBE", url, "CSeq: 1", auth)
        bad = one + req("DESCRIBE", url, "CSeq: 2", auth)
    else:
        bad = req("TEARDOWN", url, "CSeq: 1", auth)
    sock.sendall(bad)
    _recv_until_quiet(sock, 0.5)
    assert dvr.violations and dvr.dead
    # a deadlocked box answers nobody, not even a correct request on a new connection
    with socket.create_connection((dvr.host, dvr.rtsp_port), 5) as other:
        other.sendall(req("DESCRIBE", url, "CSeq: 1", auth))
        assert _recv_until_quiet(other, 0.5) == b""


def test_emulator_refuses_stale_tokens(dvr_session) -> None:
    dvr, token, sock = dvr_session("tcp")
    url = f"rtsp://{dvr.address}/live.000"
    dvr.dcp.drop_connections()
    sock.sendall(req("DESCRIBE", url, "CSeq: 1", f"Authorization: {token}"))
    assert _recv_until_quiet(sock, 0.5).startswith(b"RTSP/1.0 401 ")
    assert dvr.violations == []
