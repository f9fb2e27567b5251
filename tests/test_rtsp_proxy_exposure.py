"""rtsp_proxy.py against hostile clients: the probes of issue 13, replayed.

Each test repeats one probe (connection floods, slow and silent clients,
unread replies, session pinning, channels the DVR does not have, guessed
logins, odd digits) against the proxy process and the emulated DVR, and
checks that the proxy keeps its limits while a real viewer plays.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _proxy_support import (  # noqa: F401  (fixtures)
    RawRTSP,
    dvr_factory,
    h264_small,
    proxied,
    start_proxy,
    wait_until,
)

import rtsp_proxy
from conftest import play


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (``Threads``, ``VmRSS`` in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the proxy has closed ``sock`` (without blocking)."""
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def connect(address: str, source: str = "127.0.0.1") -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    return sock


def raw_from(address: str, source: str) -> RawRTSP:
    """A RawRTSP client whose connection comes from another loopback address."""
    raw = RawRTSP(address)
    raw.sock.close()
    raw.sock = connect(address, source=source)
    return raw


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------
# Connection floods


@pytest.mark.real_peer
def test_floods_leave_no_threads_behind_and_a_viewer_plays_throughout(proxied) -> None:  # noqa: F811
    # Issue 13: 500 idle connections held 1004 threads, 50 slowloris connections were held
    # for 150 s, 4000 connections made 8004 threads and 208 MB and a viewer got 503.
    dvr, proc, address = proxied("tcp", "-vv", "--linger", "0.5", "--header-timeout", "1")
    pid = proc.popen.pid
    url = f"rtsp://{address}/live.000"
    baseline_threads = proc_status(pid, "Threads")
    warm = play(url, "ffprobe", "tcp", seconds=2)  # imports, first channel: the RSS baseline
    assert warm.frames >= 25 and not warm.errors, warm.output[-2000:]
    wait_until(lambda: dvr.active_sessions == 0, what="the warm-up session to end")
    baseline_rss = proc_status(pid, "VmRSS")
    bound = 2 * 64 + 12  # two threads per admitted client, the service threads, a channel
    most_threads = [0]

    def sample() -> None:
        most_threads[0] = max(most_threads[0], proc_status(pid, "Threads"))

    def idle_500() -> None:
        socks = []
        try:
            for _ in range(500):
                socks.append(connect(address))
                if len(socks) % 50 == 0:
                    sample()
            sample()
        finally:
            for sock in socks:
                sock.close()

    def slowloris_50() -> None:
        socks = [connect(address) for _ in range(50)]
        try:
            for sock in socks:
                sock.setblocking(False)
            deadline = time.monotonic() + 30
            while not all(closed_by_peer(s) for s in socks):
                assert time.monotonic() < deadline, "slowloris connections still held"
                for sock in socks:
                    try:
                        sock.send(b"O")
                    except OSError:
                        pass
                sample()
                time.sleep(0.2)  # the attacker's drip rate, one byte per connection
        finally:
            for sock in socks:
                sock.close()

    def attempts_4000() -> None:
        for _ in range(8):
            wave = []
            for _ in range(500):
                try:
                    wave.append(connect(address))
                except OSError:
                    pass  # a refused or dropped attempt is an attempt too
            sample()
            for sock in wave:
                sock.close()

    for attack in (idle_500, slowloris_50, attempts_4000):
        plays = proc.output.count(": PLAY rtsp://")
        with ThreadPoolExecutor(1) as pool:
            viewer = pool.submit(play, url, "ffprobe", "tcp", 5.0)
            wait_until(
                lambda p=plays: proc.output.count(": PLAY rtsp://") > p,
                what="the viewer to play",
            )
            attack()
            result = viewer.result()
        assert result.frames >= 60 and not result.errors, (attack.__name__, result.output[-2000:])
    assert 0 < most_threads[0] <= bound, most_threads
    wait_until(lambda: dvr.active_sessions == 0, what="the last session to end")
    wait_until(
        lambda: proc_status(pid, "Threads") <= baseline_threads,
        what=f"threads back to {baseline_threads}",
    )
    assert proc_status(pid, "VmRSS") <= baseline_rss + 30 * 1024, (baseline_rss, pid)
    assert proc.popen.poll() is None


def test_over_max_clients_the_silent_make_room_then_newcomers_get_503(proxied) -> None:  # noqa: F811
    _, proc, address = proxied("tcp", "--max-clients", "3")
    with RawRTSP(address) as a, RawRTSP(address) as b:
        assert a.request("OPTIONS")[0] == 200 and b.request("OPTIONS")[0] == 200
        silent = connect(address)
        with RawRTSP(address) as c:  # full: the silent one is closed to make room
            wait_until(lambda: closed_by_peer(silent), what="the silent client to be closed")
            assert c.request("OPTIONS")[0] == 200
            with RawRTSP(address) as d:  # full of clients that spoke: 503 and close
                d.sock.settimeout(10)
                assert d.read_response()[0] == 503
                with pytest.raises((ConnectionError, OSError)):
                    while True:
                        d._fill()
            assert a.request("OPTIONS")[0] == 200
        silent.close()
    assert "refused, 3 clients connected" in proc.output


def test_incomplete_requests_and_idle_connections_are_closed(proxied) -> None:  # noqa: F811
    _, proc, address = proxied("tcp", "--header-timeout", "0.5", "--idle-timeout", "1")
    slow = connect(address)
    slow.sendall(b"OPTIONS * RTSP/1.0\r\nCS")
    idle = connect(address)
    with RawRTSP(address) as viewer:
        viewer.play_tcp()
        for sock in (slow, idle):
            sock.setblocking(False)
            wait_until(lambda s=sock: closed_by_peer(s), what="the proxy to close it")
        viewer.read_interleaved()  # a client with a session may be silent
        assert viewer.request("OPTIONS")[0] == 200
    slow.close()
    idle.close()
    assert "(incomplete request)" in proc.output and "(idle)" in proc.output


def test_a_session_set_up_but_never_played_is_closed_and_released(proxied) -> None:  # noqa: F811
    # A connection that SETUPs a channel and then says nothing held its DVR
    # session for ever: a handful of them would take every channel of the box.
    dvr, proc, address = proxied("tcp", "--idle-timeout", "1", "--linger", "0.5")
    with RawRTSP(address) as parked, RawRTSP(address) as paused:
        assert parked.request("DESCRIBE")[0] == 200
        transport = "RTP/AVP/TCP;unicast;interleaved=0-1"
        status, headers, _ = parked.request("SETUP", Transport=transport)
        assert status == 200 and "session" in headers
        session = paused.play_tcp()["session"]
        assert paused.request("PAUSE", Session=session)[0] == 200
        assert dvr.active_sessions >= 1
        for raw in (parked, paused):
            raw.sock.setblocking(False)
            wait_until(lambda r=raw: closed_by_peer(r.sock), what="the proxy to close it")
    wait_until(lambda: dvr.active_sessions == 0, what="the DVR sessions to be released")
    wait_until(lambda: proc.output.count("(idle)") >= 2, what="both closes in the log")


# --------------------------------------------------------------------------
# Clients that do not read


def test_client_that_does_not_read_its_replies_is_closed(proxied) -> None:  # noqa: F811
    # Issue 13: 30 MiB of pipelined OPTIONS, never read, took the proxy from 85 to 234 MB.
    _, proc, address = proxied("tcp", "--client-buffer", "65536", "--client-stall", "1")
    pid = proc.popen.pid
    with RawRTSP(address) as warm:
        assert warm.request("OPTIONS")[0] == 200
    rss = proc_status(pid, "VmRSS")
    requests = b"".join(
        f"OPTIONS rtsp://{address}/live.000 RTSP/1.0\r\nCSeq: {i}\r\n\r\n".encode()
        for i in range(1, 1001)
    )
    sent = 0
    with RawRTSP(address, rcvbuf=4096, timeout=20) as greedy:
        try:
            while sent < 30 << 20:
                greedy.sock.sendall(requests)
                sent += len(requests)
        except TimeoutError:
            raise AssertionError("the proxy neither read on nor closed the connection") from None
        except OSError:
            pass  # closed by the proxy
    assert sent < 30 << 20
    assert "does not read its replies" in proc.output
    assert proc_status(pid, "VmRSS") <= rss + 20 * 1024
    with RawRTSP(address) as other:
        assert other.request("OPTIONS")[0] == 200


# --------------------------------------------------------------------------
# The DVR behind the proxy


def test_a_client_connection_holds_at_most_its_dvr_sessions(proxied) -> None:  # noqa: F811
    # Issue 13: one unauthenticated connection held 20 DVR sessions (live.016 ... live.035).
    dvr, proc, address = proxied(env={})
    auth = basic("admin", "4321")
    with RawRTSP(address) as pinning:
        statuses = [
            pinning.request("DESCRIBE", f"{pinning.base}/live.{n:03d}", Authorization=auth)[0]
            for n in range(20)
        ]
        # two sessions; then refused, and channels 16-19 the DVR does not have: 404
        assert statuses == [200, 200] + [503] * 14 + [404] * 4
        assert dvr.rtsp_sessions_started == 2 and dvr.active_sessions == 2
    assert "refused a DVR session beyond its 2" in proc.output


def test_channel_the_dvr_does_not_have_is_404_without_a_dvr_request(proxied) -> None:  # noqa: F811
    dvr, _, address = proxied()
    with RawRTSP(address) as raw:
        assert raw.request("DESCRIBE", raw.base + "/live.999")[0] == 404
        transport = "RTP/AVP/TCP;unicast;interleaved=0-1"
        assert raw.request("SETUP", raw.base + "/live.999", Transport=transport)[0] == 404
        assert raw.request("DESCRIBE", raw.base + "/live.016")[0] == 404  # 16 channels: 0-15
        assert dvr.requests == []
        assert dvr.dcp.logins == 1  # the channel count comes with the DCP login
        assert raw.request("DESCRIBE", raw.base + "/live.015")[0] == 200
    assert dvr.requests[0] == ("DESCRIBE", f"rtsp://{dvr.address}/live.015")


def test_wrong_logins_cost_the_dvr_few_logins(proxied) -> None:  # noqa: F811
    # Issue 13: 1000 wrong logins in a row each became a DCP login at the DVR.
    dvr, proc, address = proxied(env={})
    statuses: list[int] = []
    retry_after: list[str] = []

    def guess(worker: int) -> None:
        with RawRTSP(address) as raw:
            for n in range(100):
                status, headers, _ = raw.request(
                    "DESCRIBE", Authorization=basic("admin", f"guess-{worker}-{n}")
                )
                statuses.append(status)
                if "retry-after" in headers:
                    retry_after.append(headers["retry-after"])

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(guess, range(10)))
    assert len(statuses) == 1000 and set(statuses) <= {401, 503}
    assert retry_after and all(v.isdigit() and int(v) >= 1 for v in retry_after)
    # 1, 2, 4, 8 s of backoff: a handful of logins however long the guessing took
    assert dvr.dcp.logins == 0 and 1 <= dvr.dcp.refused_logins <= 5, dvr.dcp.refused_logins
    # one wrong pair from other addresses (no backoff there): refused from memory
    refused = dvr.dcp.refused_logins
    wrong = basic("admin", "guess-from-elsewhere")
    for n in range(2, 12):
        with raw_from(address, f"127.0.0.{n}") as raw:
            assert raw.request("DESCRIBE", Authorization=wrong)[0] == 401
    assert dvr.dcp.refused_logins == refused + 1
    assert "guess-" not in proc.output


def test_concurrent_logins_with_one_pair_make_one_dvr_login(proxied) -> None:  # noqa: F811
    dvr, _, address = proxied("udp", env={})
    good = basic("admin", "4321")

    def describe(n: int) -> int:  # eight channels at once, each opening its DVR session
        with raw_from(address, f"127.0.0.{n + 2}") as raw:
            return raw.request("DESCRIBE", f"{raw.base}/live.{n:03d}", Authorization=good)[0]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(describe, range(8))) == [200] * 8
    assert dvr.dcp.logins == 1 and dvr.dcp.refused_logins == 0


# --------------------------------------------------------------------------
# Odd digits


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\nContent-Length: \xb2\r\n\r\n",
        "OPTIONS * RTSP/1.0\r\nCSeq: 1\r\nContent-Length: ²\r\n\r\n".encode(),
        b"OPTIONS * RTSP/1.0\r\nCSeq: \xb9\r\n\r\n",
        b"SETUP rtsp://h/live.000 RTSP/1.0\r\nCSeq: 2\r\n"
        b"Transport: RTP/AVP;unicast;client_port=\xb2-\xb3\r\n\r\n",
    ],
)
def test_odd_digits_get_400(proxied, request_bytes: bytes) -> None:  # noqa: F811
    dvr, proc, address = proxied()
    with RawRTSP(address) as raw:
        raw.send(request_bytes)
        assert raw.read_response()[0] == 400
    with RawRTSP(address) as raw:
        assert raw.request("OPTIONS")[0] == 200
    assert "Traceback" not in proc.output and dvr.requests == []


# --------------------------------------------------------------------------
# The pure parts


def test_login_guard_backs_off_per_address_and_remembers_refusals() -> None:
    now = [0.0]
    guard = rtsp_proxy.LoginGuard(1.0, clock=lambda: now[0])
    assert guard.wait_for("10.0.0.1") == 0
    waits = [guard.refused("10.0.0.1") for _ in range(9)]
    assert waits == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    assert guard.wait_for("10.0.0.1") == 64 and guard.wait_for("10.0.0.2") == 0
    guard.succeeded("10.0.0.1")
    assert guard.wait_for("10.0.0.1") == 0
    guard.remember_refusal(("admin", "nope"))
    assert guard.refused_recently(("admin", "nope"))
    assert not guard.refused_recently(("admin", "4321"))
    now[0] = 10.0
    assert not guard.refused_recently(("admin", "nope"))
    off = rtsp_proxy.LoginGuard(0)
    off.remember_refusal(("a", "b"))
    assert off.refused("x") == 0 and off.wait_for("x") == 0 and not off.refused_recently(("a", "b"))


def test_login_guard_memory_is_bounded() -> None:
    now = [0.0]
    guard = rtsp_proxy.LoginGuard(1.0, clock=lambda: now[0])
    for n in range(3 * guard.MAX_ENTRIES):
        guard.refused(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
        guard.remember_refusal(("admin", str(n)))
    assert len(guard._addresses) <= guard.MAX_ENTRIES
    assert len(guard._refused) <= guard.MAX_ENTRIES


def test_read_deadline() -> None:
    limits = {"header_timeout": 10.0, "idle_timeout": 60.0}
    deadline = rtsp_proxy.read_deadline
    assert deadline(5.0, partial_since=2.0, last_request=0, streaming=True, **limits) == 7.0
    assert deadline(5.0, partial_since=None, last_request=1, streaming=False, **limits) == 56
    assert deadline(5.0, partial_since=None, last_request=1, streaming=True, **limits) is None


class _SilentSocket:
    """A client socket that takes nothing until released."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def send(self, data) -> int:
        self.released.wait()
        return len(data)

    def shutdown(self, how: int) -> None:
        self.released.set()


def test_replies_wait_for_room_and_a_client_that_takes_nothing_is_closed() -> None:
    now = [0.0]
    sock = _SilentSocket()
    box = rtsp_proxy.Outbox(sock, 1000, stall_timeout=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    try:
        assert box.put_reply(bytes(1500))  # an empty queue takes any reply
        outcome: list[bool] = []
        waiter = threading.Thread(target=lambda: outcome.append(box.put_reply(bytes(10))))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # over the limit: the reply waits, and so do the requests
        now[0] = 6.0  # nothing taken for longer than the stall timeout
        with box._cond:
            box._cond.notify_all()
        waiter.join(5)
        assert outcome == [False] and box.closed
        assert not box.put_reply(b"x")
    finally:
        box.close()
        sock.released.set()
        box.join(5)
