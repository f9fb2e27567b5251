"""rtsp_proxy.py end to end: real RTSP clients, the proxy process and an emulated DVR."""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from _proxy_support import (  # noqa: F401  (fixtures)
    CREDS_ENV,
    RawRTSP,
    dvr_factory,
    h264_big,
    h264_small,
    proxied,
    start_proxy,
    wait_until,
)

import rtsp_proxy
from conftest import play
from dvr_rtsp_emulator import access_units
from helpers import ExitCode

MODES = ["tcp", "udp"]
def assert_clean(dvr, sessions: int = 1) -> None:
    assert dvr.violations == []
    assert dvr.rtsp_sessions_started == sessions


def assert_decoded(result, frames: int = 50) -> None:
    assert result.frames >= frames and not result.errors, result.output[-4000:]


# --------------------------------------------------------------------------
# Real clients


@pytest.mark.real_peer
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("client", "transport"),
    [
        ("ffprobe", "tcp"),
        ("ffprobe", "udp"),
        ("ffmpeg", "tcp"),
        ("ffmpeg", "udp"),
        ("gst", "tcp"),
        ("gst", "udp"),
    ],
)
def test_real_clients_decode(proxied, mode: str, client: str, transport: str) -> None:  # noqa: F811
    dvr, _, address = proxied(mode)
    result = play(f"rtsp://{address}/live.000", client, transport, seconds=4)
    assert_decoded(result)
    assert_clean(dvr)


@pytest.mark.real_peer
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("client", "transport"), [("ffprobe", "tcp"), ("gst", "udp")])
def test_keyframes_over_64k_decode(proxied, h264_big, mode, client, transport) -> None:  # noqa: F811
    dvr, _, address = proxied(mode, h264=h264_big)
    result = play(f"rtsp://{address}/live.000", client, transport, seconds=4)
    assert_decoded(result)
    assert_clean(dvr)


@pytest.mark.real_peer
@pytest.mark.parametrize("mode", MODES)
def test_four_clients_share_one_dvr_session(proxied, mode: str) -> None:  # noqa: F811
    dvr, _, address = proxied(mode, "--linger", "0.5")
    url = f"rtsp://{address}/live.001"
    clients = [("ffprobe", "tcp"), ("ffprobe", "udp"), ("gst", "tcp"), ("ffmpeg", "udp")]
    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(lambda c: play(url, c[0], c[1], seconds=4), clients))
    for result in results:
        assert_decoded(result)
    assert_clean(dvr, sessions=1)
    assert dvr.dcp.logins == 1
    # the last viewer gone, the DVR session and the DCP login end
    wait_until(lambda: dvr.active_sessions == 0, what="the DVR session to end")
    wait_until(lambda: dvr.dcp.open_connections == 0, what="the DCP login to end")


@pytest.mark.real_peer
def test_late_joiner_gets_cached_parameter_sets(proxied) -> None:  # noqa: F811
    # The DVR sends SPS/PPS only once: a later viewer depends on the proxy's cache.
    dvr, _, address = proxied("tcp", parameter_sets="first")
    with RawRTSP(address) as first:
        first.play_tcp()
        first.read_interleaved()
        with RawRTSP(address) as late:
            info = late.play_tcp()
            seq0 = int(info["rtp-info"].split("seq=")[1].split(";")[0])
            packets = [late.read_interleaved()[1] for _ in range(3)]
        seqs = [struct.unpack("!H", p[2:4])[0] for p in packets]
        assert seqs == [seq0, (seq0 + 1) & 0xFFFF, (seq0 + 2) & 0xFFFF]
        kinds = [p[12] & 0x1F for p in packets]
        assert kinds[:2] == [7, 8]
        assert kinds[2] == 5 or (kinds[2] == 28 and packets[2][13] & 0x1F == 5)
        result = play(f"rtsp://{address}/live.000", "ffprobe", "tcp", seconds=3)
        assert_decoded(result, 40)
    assert_clean(dvr)


# --------------------------------------------------------------------------
# Slow and hostile clients


@pytest.mark.real_peer
def test_client_that_never_reads_is_dropped(proxied, h264_big) -> None:  # noqa: F811
    args = ("--client-buffer", "262144", "--client-stall", "2")
    dvr, proc, address = proxied("tcp", *args, h264=h264_big)
    stalled = RawRTSP(address, rcvbuf=4096)
    try:
        stalled.play_tcp()
        with ThreadPoolExecutor(1) as pool:
            viewer = pool.submit(play, f"rtsp://{address}/live.000", "ffprobe", "tcp", 5.0)
            proc.wait_line(r"dropping slow client", timeout=30)
            result = viewer.result()
        stalled.sock.settimeout(10)
        with pytest.raises((ConnectionError, OSError)):
            while True:
                stalled._fill()  # drain what was queued; then the proxy's close shows
    finally:
        stalled.close()
    assert_decoded(result)
    assert_clean(dvr)


@pytest.mark.real_peer
def test_viewer_survives_a_pause_of_the_proxy(proxied, h264_big) -> None:  # noqa: F811
    # A paused proxy (a loaded machine, a GC pause) gets the frames held up meanwhile
    # all at once and queues them faster than the writer hands them to the socket: a
    # healthy viewer behind by a burst must not be taken for a stuck one.
    dvr, proc, address = proxied("tcp", "--client-buffer", "262144", h264=h264_big)
    with ThreadPoolExecutor(1) as pool:
        viewer = pool.submit(play, f"rtsp://{address}/live.000", "ffprobe", "tcp", 5.0)
        wait_until(lambda: dvr.frames_sent >= 50, what="two seconds of video sent")
        os.kill(proc.popen.pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)  # the stimulus: how long the proxy is frozen, not a readiness wait
        finally:
            os.kill(proc.popen.pid, signal.SIGCONT)
        result = viewer.result()
    assert "dropping slow client" not in proc.output
    assert_decoded(result)
    assert_clean(dvr)


class _BlockingSocket:
    """Stands in for a client socket: send() takes bytes only when the test allows."""

    def __init__(self) -> None:
        self.allowance = 0
        self.cond = threading.Condition()

    def allow(self, size: int) -> None:
        with self.cond:
            self.allowance += size
            self.cond.notify_all()

    def send(self, data) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.allowance > 0)
            sent = min(len(data), self.allowance)
            self.allowance -= sent
            return sent

    def shutdown(self, how: int) -> None:
        pass


def test_outbox_drops_only_a_client_that_takes_nothing() -> None:
    now = [0.0]
    sock = _BlockingSocket()
    box = rtsp_proxy.Outbox(sock, 65536, stall_timeout=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    try:
        chunk = bytes(40000)
        # a burst far past the limit is queued: the client was not given time to take it
        assert all(box.put(chunk, media=True) for _ in range(20))
        assert box.queued == 20 * len(chunk)
        now[0] = 4.9
        assert box.put(chunk, media=True)
        now[0] = 5.1  # over the limit and nothing taken for more than stall_timeout: stuck
        assert not box.put(chunk, media=True)
        assert box.put(b"RTSP/1.0 200 OK\r\n\r\n")  # replies are never refused
        sock.allow(1000)  # the client takes a little: it is slow, not stuck
        wait_until(lambda: box.stalled_for() == 0.0, what="the writer to see progress")
        now[0] = 9.0
        assert box.put(chunk, media=True)
        # past the hard limit even a client that just made progress is dropped
        assert box.hard_limit >= 4 * 65536
        assert not box.put(bytes(box.hard_limit), media=True)
    finally:
        box.close()
        sock.allow(1 << 30)
        box.join(5)


def test_outbox_stall_clock_starts_with_a_non_empty_queue() -> None:
    now = [100.0]
    sock = _BlockingSocket()
    box = rtsp_proxy.Outbox(sock, 65536, stall_timeout=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    try:
        now[0] = 200.0  # long idle with nothing to send is no stall
        assert box.put(bytes(100000), media=True)
        assert box.put(bytes(100000), media=True)
        assert box.stalled_for() == 0.0
    finally:
        box.close()
        sock.allow(1 << 30)
        box.join(5)


def expect_400_or_close(address: str, data: bytes, close_after: bool = False) -> int | None:
    """Send ``data``; return the status the proxy answered with, None if it just closed."""
    with RawRTSP(address, timeout=10) as raw:
        try:
            raw.send(data)
            if close_after:
                return None
            status, _, _ = raw.read_response()
        except (ConnectionError, OSError):
            return None
        # after a 400 the proxy closes the connection
        with pytest.raises((ConnectionError, OSError)):
            while True:
                raw._fill()
        return status


@pytest.mark.real_peer
def test_garbage_requests_do_not_disturb_a_viewer(proxied) -> None:  # noqa: F811
    dvr, proc, address = proxied("udp")
    url = f"rtsp://{address}/live.000"
    rng = random.Random(4)
    with ThreadPoolExecutor(1) as pool:
        viewer = pool.submit(play, url, "ffprobe", "tcp", 5.0)
        assert expect_400_or_close(address, b"GARBAGE\r\n\r\n") == 400
        assert expect_400_or_close(address, b"\x00\xff" * 5000) == 400
        oversized = f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nX-Big: ".encode() + b"a" * 20000
        assert expect_400_or_close(address, oversized) == 400
        many = f"OPTIONS {url} RTSP/1.0\r\nCSeq: 1\r\n".encode() + b"X-A: b\r\n" * 200 + b"\r\n"
        assert expect_400_or_close(address, many) == 400
        truncated = f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nAcc".encode()
        assert expect_400_or_close(address, truncated, close_after=True) is None
        no_cseq = f"OPTIONS {url} RTSP/1.0\r\n\r\n".encode()
        assert expect_400_or_close(address, no_cseq) == 400
        for _ in range(20):
            junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 600)))
            junk = b"X" + junk if junk.startswith(b"$") else junk  # '$' starts binary data
            expect_400_or_close(address, junk + b"\r\n\r\n")
        with RawRTSP(address) as raw:  # never forwarded: the DVR would crash
            for bad in ("/cam/realmonitor", "/live.0", "/live.000/../x", "/live.000?x"):
                assert raw.request("DESCRIBE", raw.base + bad)[0] == 404
                transport = "RTP/AVP/TCP;unicast;interleaved=0-1"
                assert raw.request("SETUP", raw.base + bad, Transport=transport)[0] == 404
        result = viewer.result()
    assert_decoded(result)
    assert_clean(dvr)
    assert proc.popen.poll() is None


# --------------------------------------------------------------------------
# Protocol details, seen byte by byte


def test_rtsp_server_behaviour_and_rtp_stream(proxied, h264_small) -> None:  # noqa: F811
    dvr, _, address = proxied("tcp", "--linger", "0.5")
    with RawRTSP(address) as raw:
        status, headers, _ = raw.request("OPTIONS", "*")
        assert status == 200 and headers["cseq"] == "1"
        assert headers["public"] == "OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN, GET_PARAMETER"
        # pipelined requests are answered in order with their own CSeq
        url = raw.base + "/live.000"
        raw.send(
            raw.build("OPTIONS", url)
            + raw.build("DESCRIBE", url, {"Accept": "application/sdp", "User-Agent": "x"})
            + raw.build("SET_PARAMETER", url)
        )
        replies = [raw.read_response() for _ in range(3)]
        assert [(s, h["cseq"]) for s, h, _ in replies] == [(200, "2"), (200, "3"), (200, "4")]
        sdp = replies[1][2].decode()
        assert replies[1][1]["content-type"] == "application/sdp"
        for line in ("v=0", "t=0 0", "m=video 0 RTP/AVP 96", "a=rtpmap:96 H264/90000"):
            assert line + "\r\n" in sdp
        assert "a=fmtp:96 packetization-mode=1" in sdp and f"a=control:{url}\r\n" in sdp
        status, headers, _ = raw.request(
            "SETUP", url, Transport="RTP/AVP/TCP;unicast;interleaved=2-3"
        )
        assert status == 200 and headers["session"].endswith(";timeout=60")
        ssrc = int(headers["transport"].split("ssrc=")[1], 16)
        assert "interleaved=2-3" in headers["transport"]
        session = headers["session"].split(";")[0]
        assert raw.request("GET_PARAMETER", url, Session=session)[0] == 200
        assert raw.request("PLAY", url, Session="WRONG")[0] == 454
        status, headers, _ = raw.request("PLAY", url, Session=session, Range="npt=0-")
        assert status == 200
        info = dict(kv.split("=", 1) for kv in headers["rtp-info"].split(";"))
        assert info["url"] == url
        packets = []
        while len(packets) < 250:
            channel, packet = raw.read_interleaved()
            assert channel == 2
            packets.append(packet)
        # a keepalive in the middle of the stream is answered
        raw.send(raw.build("GET_PARAMETER", url, {"Session": session}))
        assert raw.read_response()[1]["cseq"] == str(raw.cseq)
        assert raw.request("TEARDOWN", url, Session=session)[0] == 200

    fields = [struct.unpack("!BBHII", p[:12]) for p in packets]
    assert fields[0][2] == int(info["seq"]) and fields[0][3] == int(info["rtptime"])
    assert all(f[0] == 0x80 and f[1] & 0x7F == 96 and f[4] == ssrc for f in fields)
    assert all(len(p) - 12 <= 1400 for p in packets)
    for a, b in zip(fields, fields[1:], strict=False):
        assert b[2] == (a[2] + 1) & 0xFFFF  # continuous sequence numbers
        if b[3] != a[3]:
            assert a[1] & 0x80  # the marker closes each frame
            assert (b[3] - a[3]) & 0xFFFFFFFF == 3600  # 40 ms at 90 kHz

    # Reassemble NAL units and compare them with the DVR's source frames, byte for byte.
    frames: list[list[bytes]] = [[]]
    fu = b""
    for f, p in zip(fields, packets, strict=True):
        kind = p[12] & 0x1F
        if kind == 28:
            if p[13] & 0x80:
                fu = bytes([(p[12] & 0xE0) | (p[13] & 0x1F)])
            fu += p[14:]
            if p[13] & 0x40:
                frames[-1].append(fu)
        else:
            frames[-1].append(p[12:])
        if f[1] & 0x80:
            frames.append([])
    frames.pop()
    source = access_units(h264_small)
    start = source.index(frames[0])
    assert start % 25 == 0 and frames[0][0][0] & 0x1F == 7  # starts at a keyframe with SPS
    for i, frame in enumerate(frames):
        assert frame == source[(start + i) % len(source)]

    wait_until(lambda: dvr.active_sessions == 0, what="the DVR session to end after TEARDOWN")
    assert_clean(dvr)


def test_basic_credentials_from_clients(proxied) -> None:  # noqa: F811
    # without the login backoff (test_rtsp_proxy_exposure covers it): a retry logs in at once
    dvr, _, address = proxied("tcp", "--login-backoff", "0", env={})
    with RawRTSP(address) as raw:
        assert raw.request("OPTIONS")[0] == 200
        status, headers, _ = raw.request("DESCRIBE")
        assert status == 401 and headers["www-authenticate"].startswith('Basic realm="')
        wrong = "Basic " + base64.b64encode(b"admin:nope").decode()
        assert raw.request("DESCRIBE", Authorization=wrong)[0] == 401
        digest = 'Digest username="admin", realm="x", nonce="1", uri="/", response="0"'
        assert raw.request("DESCRIBE", Authorization=digest)[0] == 401
    assert dvr.dcp.logins == 0
    with RawRTSP(address) as raw:
        good = "Basic " + base64.b64encode(b"admin:4321").decode()
        raw.play_tcp(Authorization=good)
        raw.read_interleaved()
    assert dvr.dcp.logins == 1
    assert_clean(dvr)


@pytest.mark.real_peer
def test_client_credentials_with_ffprobe(proxied) -> None:  # noqa: F811
    password = "Zq-77-secret"
    dvr, proc, _ = proxied("udp", "-v", env={}, users={"admin": password})
    address = proc.wait_line(r"listening rtsp://([\d.]+:\d+)/").group(1)
    result = play(f"rtsp://admin:{password}@{address}/live.000", "ffprobe", "udp", seconds=3)
    assert_decoded(result, 40)
    assert_clean(dvr)
    assert "DESCRIBE rtsp://" in proc.output and password not in proc.output


@pytest.mark.parametrize("event", ["reboot", "dcp-drop"])
def test_dvr_reboot_ends_sessions_and_proxy_recovers(proxied, event: str) -> None:  # noqa: F811
    password = "Pw-9zq!x"
    users = {"admin": password}
    dvr, proc, address = proxied(
        "tcp", "-v", "--username", "admin", env={"SV_PASS": password}, users=users
    )
    raw = RawRTSP(address)
    try:
        raw.play_tcp()
        raw.read_interleaved()
        if event == "reboot":
            dvr.reboot()
        else:
            dvr.dcp.drop_connections()  # the token dies with its DCP connection
        with pytest.raises((ConnectionError, OSError)):
            while True:
                raw._fill()
                raw.buf = b""
    finally:
        raw.close()
    with RawRTSP(address) as again:
        again.play_tcp()
        for _ in range(50):
            again.read_interleaved()
    assert proc.popen.poll() is None
    assert dvr.dcp.logins == 2
    assert_clean(dvr, sessions=2)
    # debug logging (-vv) shows neither the password nor a token
    assert len(dvr.tokens_seen) == 2
    for secret in (password, *dvr.tokens_seen):
        assert secret not in proc.output


def test_unreachable_dvr_gives_503_and_proxy_keeps_running(spawn, start_proxy) -> None:  # noqa: F811
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there

    class Nowhere:
        address = f"127.0.0.1:{port}"

    proc, address = start_proxy(Nowhere, "--timeout", "2", env=CREDS_ENV)
    with RawRTSP(address) as raw:
        assert raw.request("DESCRIBE")[0] == 503
        assert raw.request("OPTIONS")[0] == 200
    assert proc.popen.poll() is None


# --------------------------------------------------------------------------
# Command line


def test_cli_usage_errors(capsys, monkeypatch) -> None:
    monkeypatch.delenv("SV_PASS", raising=False)
    assert rtsp_proxy.main(["--help"]) == 0
    assert "live.000" in capsys.readouterr().out
    assert rtsp_proxy.main(["127.0.0.1:notaport", "127.0.0.1:554"]) == 2
    assert rtsp_proxy.main(["127.0.0.1:0", "127.0.0.1:554", "--username", "u"]) == 2
    assert rtsp_proxy.main(["127.0.0.1:0", "127.0.0.1:554", "--timeout", "0"]) == 2


def test_cli_cannot_listen(monkeypatch) -> None:
    monkeypatch.delenv("SV_USER", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert rtsp_proxy.main([f"127.0.0.1:{port}", "127.0.0.1:554", "-q"]) == ExitCode.ERROR


def test_library_use_in_process(dvr_factory, h264_small) -> None:  # noqa: F811
    dvr = dvr_factory("udp", h264=h264_small)
    server = rtsp_proxy.ProxyServer(
        ("127.0.0.1", 0), (dvr.host, dvr.rtsp_port), username="admin", password="4321", linger=0
    )
    with server:
        address = "{}:{}".format(*server.address)
        with RawRTSP(address) as raw:
            info = raw.play_tcp(url=f"rtsp://{address}/live.007")
            assert info["rtp-info"].startswith(f"url=rtsp://{address}/live.007;seq=")
            for _ in range(20):
                raw.read_interleaved()
            assert server.channel_count == 1
        wait_until(lambda: server.channel_count == 0, what="the channel to close")
    assert_clean(dvr)


def test_silent_udp_viewer_times_out_rtcp_keeps_it(dvr_factory, h264_small) -> None:  # noqa: F811
    dvr = dvr_factory("tcp", h264=h264_small)
    server = rtsp_proxy.ProxyServer(
        ("127.0.0.1", 0),
        (dvr.host, dvr.rtsp_port),
        username="admin",
        password="4321",
        session_timeout=1.0,
    )
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, rtp, rtcp:
        rtp.bind(("127.0.0.1", 0))
        port = rtp.getsockname()[1]
        rtcp.bind(("127.0.0.1", port + 1))
        address = "{}:{}".format(*server.address)
        with RawRTSP(address) as raw:
            assert raw.request("DESCRIBE")[0] == 200
            status, headers, _ = raw.request(
                "SETUP", Transport=f"RTP/AVP;unicast;client_port={port}-{port + 1}"
            )
            assert status == 200
            ports = headers["transport"].split("server_port=")[1].split(";")[0]
            server_rtcp = int(ports.split("-")[1])
            assert raw.request("PLAY", Session=headers["session"].split(";")[0])[0] == 200
            rtp.settimeout(5)
            assert rtp.recv(2048)[0] == 0x80
            # RTCP receiver reports count as signs of life, for 3 timeouts and more
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                rtcp.sendto(b"\x81\xc9\x00\x01" + b"\x00" * 4, ("127.0.0.1", server_rtcp))
                time.sleep(0.2)  # the client's report interval
            assert raw.request("OPTIONS")[0] == 200  # still connected
            # silence: the session expires and the proxy closes the connection
            raw.sock.settimeout(10)
            with pytest.raises((ConnectionError, OSError)):
                while True:
                    raw._fill()
    assert_clean(dvr)


@pytest.mark.parametrize("mode", MODES)
def test_side_port_out_of_step(proxied, mode: str) -> None:  # noqa: F811
    # TCP: the stream cannot be trusted any more, the session ends and the proxy serves on.
    # UDP: the bad datagram and its frame are dropped, the stream goes on.
    dvr, proc, address = proxied(mode, garbage_after=30)
    with RawRTSP(address) as raw:
        raw.play_tcp()
        if mode == "tcp":
            raw.sock.settimeout(10)
            with pytest.raises((ConnectionError, OSError)):
                while True:
                    raw.read_interleaved()
            with RawRTSP(address) as again:
                again.play_tcp()
                again.read_interleaved()
            assert_clean(dvr, sessions=2)
        else:
            for _ in range(400):  # past frame 30 and more
                raw.read_interleaved()
            assert_clean(dvr, sessions=1)
    assert proc.popen.poll() is None
