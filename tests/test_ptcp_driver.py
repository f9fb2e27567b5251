"""PTCP threaded driver over real loopback UDP: realms bridged to local TCP services."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from _ptcp_support import (
    BulkServer,
    EchoServer,
    Pair,
    digest_of,
    echo_roundtrip,
    read_all,
    udp_socket,
)

from helpers import ExitCode
from ptcp import (
    Packet,
    PTCPError,
    PTCPTunnel,
    RealmClosed,
    Session,
    Syn,
    _Bridge,
    decode_packet,
    encode_packet,
)

REPO = Path(__file__).resolve().parents[1]
PTCP = str(REPO / "ptcp.py")
MB = 1024 * 1024


@pytest.fixture
def echo():
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pair_factory():
    made: list[Pair] = []

    def make(ports: dict[int, int], relay: dict | None = None, **options) -> Pair:
        p = Pair(ports, relay, **options)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


def test_in_process_echo_and_stray_datagrams(pair_factory, echo):
    pair = pair_factory({7: echo.port})
    host, port = pair.client.listen(7)
    assert host == "127.0.0.1"
    # signalling text and an inverted STUN punch from the peer's own socket
    pair.device_sock.sendto(b"HTTP/1.1 200 OK\r\nCSeq: 3\r\n\r\n", pair.client_sock.getsockname())
    pair.device_sock.sendto(bytes(b ^ 0xFF for b in bytes(20)), pair.client_sock.getsockname())
    # and a datagram from a stranger: the socket is connected to the peer, so the
    # kernel drops it before anyone reads it
    with udp_socket() as stranger:
        stranger.sendto(b"PTCP" + bytes(20), pair.client_sock.getsockname())
    sent, got = echo_roundtrip(port, seed=1, total=3 * MB)
    assert sent == got
    assert pair.client.stats.stray == 2
    assert not pair.client.dead.is_set()


def test_datagrams_of_others_queued_before_start_are_counted_not_taken() -> None:
    events: list = []
    seen = threading.Condition()

    def on_event(ev) -> None:
        with seen:
            events.append(type(ev).__name__)
            seen.notify_all()

    with udp_socket() as sock, udp_socket() as device, udp_socket() as stranger:
        # a forged acknowledgement of bytes never sent, and a forged SYN, from a stranger
        stranger.sendto(encode_packet(Packet(0, 4, 0xFFFF, 1, 0, None)), sock.getsockname())
        stranger.sendto(encode_packet(Packet(0, 0, 0x2FFFF, 1, 0, Syn())), sock.getsockname())
        tunnel = PTCPTunnel(sock, device.getsockname(), own_socket=False, on_event=on_event)
        tunnel.send_syn()
        tunnel.start()
        try:
            device.settimeout(10)
            syn = decode_packet(device.recv(2048))
            assert isinstance(syn.body, Syn)
            stranger.sendto(encode_packet(Packet(0, 0, 0x2FFFF, 1, 0, Syn())), sock.getsockname())
            device.sendto(encode_packet(Packet(0, 4, 0x2FFFF, 7, 1, Syn())), sock.getsockname())
            with seen:
                assert seen.wait_for(lambda: "SynReceived" in events, 10)
            assert events == ["SynReceived"]  # only the device's
            assert tunnel.stats.stray == 2  # the two from before start(); the third never came
            assert tunnel.session.unacked_bytes == 0  # the device's SYN acknowledged ours
        finally:
            tunnel.close()


def test_a_realm_the_peer_closed_before_its_bridge_started_still_delivers() -> None:
    # The race behind a rare hostile-test failure: a short answer and the DISC were
    # handled while forward() was still returning, and the socket was closed unsent.
    with udp_socket() as udp:
        tunnel = PTCPTunnel(udp, ("127.0.0.1", 9), own_socket=False)  # never started
        near, far = socket.socketpair()
        bridge = _Bridge(tunnel, 7, near)
        assert bridge.push([b"a short answer", b", then DISC"], 0.0)
        bridge.finish()
        bridge.start()
        far.settimeout(10)
        got = b""
        while chunk := far.recv(100):
            got += chunk
        far.close()
        assert got == b"a short answer, then DISC"
        for thread in bridge.threads:
            thread.join(10)
            assert not thread.is_alive()


@pytest.mark.parametrize("device_gso", [False, True])
def test_a_peer_that_sends_no_runs_is_read_one_datagram_per_call(
    pair_factory, device_gso: bool
) -> None:
    bulk = BulkServer(seed=3, total=16 * MB)  # over 12000 datagrams
    try:
        pair = pair_factory({9: bulk.port}, device_tunnel={"gso": device_gso})
        _host, port = pair.client.listen(9)
        assert read_all(port) == (16 * MB, digest_of(3, 16 * MB))
    finally:
        bulk.close()
    stats = pair.client.stats
    if device_gso:  # runs came, and UDP_GRO handed them over whole
        assert stats.gro_runs > 0 and stats.exact_batches == 0
    else:  # a device sends one datagram at a time: GRO off, plain recv on the connected socket
        assert stats.gro_runs == 0 and stats.exact_batches > 0


@pytest.mark.timeout(120)
def test_real_time_retransmission_through_a_lossy_relay(pair_factory, echo):
    pair = pair_factory({7: echo.port}, relay={"loss": 0.05, "dup": 0.01, "reorder": 0.05})
    _host, port = pair.client.listen(7)
    results = run_threads(
        {f"echo{i}": (lambda i=i: echo_roundtrip(port, seed=i, total=2 * MB)) for i in range(3)},
        timeout=100,
    )
    for sent, got in results.values():
        assert sent == got
    assert pair.relay.dropped > 0
    stats = (pair.client.session.stats, pair.device.session.stats)
    assert all(s.retransmits > 0 and s.out_of_order > 0 for s in stats), stats


def test_refused_bind_raises_and_closes_the_client(pair_factory):
    pair = pair_factory({})
    a, b = socket.socketpair()
    with b:
        with pytest.raises(PTCPError, match="refused"):
            pair.client.forward(a, 80)
        assert b.recv(10) == b""  # our end of the local client was closed
    assert pair.client.session.realms == {}


def test_close_sends_disc_for_every_realm(pair_factory, echo):
    pair = pair_factory({7: echo.port})
    clients = []
    for _ in range(2):
        a, b = socket.socketpair()
        pair.client.forward(a, 7)
        b.sendall(b"hello")
        assert b.recv(5) == b"hello"
        clients.append(b)
    pair.client.close()
    closed = pair.wait_device_event(lambda e: isinstance(e, RealmClosed))
    assert [e.reason for e in closed] == ["peer", "peer"]
    assert len(echo.wait_ended(2, 10.0)) == 2  # the far end's TCP connections were closed
    for b in clients:
        assert b.recv(10) == b""
        b.close()
    assert pair.device.session.realms == {}
    assert pair.client.session.unacked_bytes == 0  # the DISCs were acknowledged


def test_peer_going_silent_is_declared_dead(pair_factory, echo):
    pair = pair_factory({7: echo.port}, heartbeat_interval=0.2, dead_after=1.0)
    # idle for twice dead_after: only the heartbeats keep both alive
    assert not pair.device.dead.wait(2.0) and not pair.client.dead.is_set()
    assert pair.device.session.stats.packets_in >= 5
    started = time.monotonic()
    pair.client.close(timeout=0)  # stops answering without telling anyone
    assert pair.device.dead.wait(10.0)
    assert time.monotonic() - started >= 0.5


# -- two CLI processes, the services in this one -------------------------------


def start_tunnel(spawn, maps: dict[int, int], forwards: list[int], *extra: str):
    """Spawn `ptcp.py serve` and `ptcp.py connect`; return both and the local ports."""
    args = [f"--map={rp}=127.0.0.1:{lp}" for rp, lp in maps.items()]
    serve = spawn([sys.executable, PTCP, *extra, "serve", *args], ready=r"ptcp: udp ")
    udp = int(serve.wait_line(r"ptcp: udp 127\.0\.0\.1:(\d+)").group(1))
    fw = [f"--forward=0:{rp}" for rp in forwards]
    conn = spawn([sys.executable, PTCP, *extra, "connect", f"--peer=127.0.0.1:{udp}", *fw])
    local = {}
    for rp in forwards:
        m = conn.wait_line(rf"forwarding 127\.0\.0\.1:(\d+) -> remote port {rp}$")
        local[rp] = int(m.group(1))
    serve.wait_line(r"ptcp: session with")
    return serve, conn, local


def run_threads(jobs: dict[str, callable], timeout: float, *procs) -> dict[str, object]:
    results: dict[str, object] = {}

    def wrap(name, fn):
        try:
            results[name] = fn()
        except BaseException as exc:  # reported below
            results[name] = exc

    threads = [threading.Thread(target=wrap, args=(n, f), daemon=True) for n, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    logs = "\n".join(p.output for p in procs)
    assert not any(t.is_alive() for t in threads), f"jobs still running after {timeout}s\n{logs}"
    failed = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    assert not failed, f"{failed}\n{logs}"
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("acks", ["per-packet", "delayed"])
def test_hundred_megabytes_over_three_realms(spawn, echo, acks):
    bulk = BulkServer(seed=99, total=34 * MB)
    extra = ["--delayed-ack"] if acks == "delayed" else []
    try:
        serve, conn, local = start_tunnel(spawn, {7: echo.port, 9: bulk.port}, [7, 9], *extra)
        results = run_threads(
            {
                "echo1": lambda: echo_roundtrip(local[7], seed=1, total=33 * MB),
                "echo2": lambda: echo_roundtrip(local[7], seed=2, total=33 * MB),
                "bulk": lambda: read_all(local[9]),
            },
            200,
            conn,
            serve,
        )
        for name in ("echo1", "echo2"):
            sent, got = results[name]
            assert sent == got, name
        assert results["bulk"] == (34 * MB, digest_of(99, 34 * MB))
        assert bulk.wait_ended(1, 10) == [f"done {34 * MB}"]
        assert conn.stop() == 0 and serve.stop() == 0
    finally:
        bulk.close()


@pytest.mark.timeout(240)
def test_client_that_stops_reading_is_disconnected_others_finish(spawn, echo):
    bulk = BulkServer(seed=5, total=None)  # endless
    try:
        serve, conn, local = start_tunnel(
            spawn,
            {7: echo.port, 9: bulk.port},
            [7, 9],
            "-v",
            "--stall-timeout=2",
        )
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.connect(("127.0.0.1", local[9]))
        assert len(stalled.recv(1000)) > 0  # flowing; now stop reading
        results = run_threads(
            {
                "echo1": lambda: echo_roundtrip(local[7], seed=3, total=12 * MB),
                "echo2": lambda: echo_roundtrip(local[7], seed=4, total=12 * MB),
                "bulk_end": lambda: bulk.wait_ended(1, 60),
            },
            200,
            conn,
            serve,
        )
        for name in ("echo1", "echo2"):
            sent, got = results[name]
            assert sent == got, name
        assert results["bulk_end"] and results["bulk_end"][0].startswith("broken")
        conn.wait_line("local client is not reading")
        # the stalled client gets what was buffered, then the connection ends
        stalled.settimeout(30)
        total = 0
        try:
            while True:
                n = len(stalled.recv(1 << 20))
                if not n:
                    break
                total += n
        except ConnectionResetError:
            pass
        stalled.close()
        assert total < 64 * MB
        assert conn.stop() == 0 and serve.stop() == 0
    finally:
        bulk.close()


def test_cli_help_and_usage_errors():
    import subprocess

    ok = subprocess.run([sys.executable, PTCP, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "serve" in ok.stdout and "connect" in ok.stdout
    bad = subprocess.run(
        [sys.executable, PTCP, "serve", "--map", "nonsense"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "PORT=HOST:PORT" in bad.stderr


def test_cli_connect_sends_the_syn_vector_and_gives_up_on_silence(spawn, vectors):
    with udp_socket() as silent:
        silent.settimeout(20)
        port = silent.getsockname()[1]
        # the vector has the older public tools' header fields
        argv = [sys.executable, PTCP, "--ptcp-ids=counter", "connect", f"--peer=127.0.0.1:{port}"]
        proc = spawn([*argv, "--timeout=1"])
        first, _addr = silent.recvfrom(2048)
        assert first == bytes.fromhex(vectors["ptcp"]["syn_hex"])
        assert proc.wait(timeout=20) == ExitCode.UNREACHABLE
    assert "no SYN" in proc.output


def test_internal_error_ends_the_tunnel_loudly(caplog):
    class Broken(Session):
        def receive_datagrams(self, datagrams, now):  # what the driver feeds
            raise RuntimeError("bug")

    with udp_socket() as other:
        sock = udp_socket()
        tunnel = PTCPTunnel(sock, other.getsockname(), Broken(now=time.monotonic())).start()
        try:
            other.sendto(b"PTCP" + bytes(20), sock.getsockname())
            assert tunnel.dead.wait(10)
        finally:
            tunnel.close(timeout=0)
    assert "internal error" in caplog.text


def test_local_queue_policy_on_a_fake_clock():
    from types import SimpleNamespace

    from ptcp import _Bridge

    a, b = socket.socketpair()
    with a, b:
        t = [0.0]
        tunnel = SimpleNamespace(queue_bytes=1000, stall_timeout=2.0, clock=lambda: t[0])
        bridge = _Bridge(tunnel, 1, a)
        assert bridge.push([b"x" * 900], 0.0)  # under the soft limit
        assert bridge.push([b"x" * 500, b"x" * 400], 1.0)  # over it, but the queue started 1 s ago
        assert not bridge.push([b"x" * 100], 2.5)  # over it and no progress for 2.5 s
        bridge.backlog.waiting = True  # we hold the client's own writes back: not its fault
        assert bridge.push([b"x" * 100], 9.0)
        assert not bridge.push([b"x" * 3000], 9.0)  # the hard limit (4x) holds regardless


def test_cli_stops_cleanly_before_any_peer(spawn):
    serve = spawn([sys.executable, PTCP, "serve"], ready=r"ptcp: udp ")
    assert serve.stop() == 0
    with udp_socket() as silent:
        port = silent.getsockname()[1]
        conn = spawn([sys.executable, PTCP, "connect", f"--peer=127.0.0.1:{port}"])
        silent.settimeout(20)
        silent.recvfrom(2048)  # its SYN: it is waiting for ours now
        assert conn.stop() == 0


def test_idle_realm_outlives_socket_timeouts(pair_factory, echo):
    def on_bind_with_timeout(port, _ip):
        sock = socket.create_connection(("127.0.0.1", echo.port))
        sock.settimeout(0.2)  # as socket.create_connection(..., timeout=...) leaves it
        return sock

    pair = pair_factory({})
    pair.device.on_bind = on_bind_with_timeout
    a, b = socket.socketpair()
    a.settimeout(0.2)
    with b:
        pair.client.forward(a, 7)
        b.sendall(b"one")
        assert b.recv(3) == b"one"
        # stay idle well past both sockets' timeouts (the point of the test)
        threading.Event().wait(1.0)
        b.sendall(b"two")
        b.settimeout(10)
        assert b.recv(3) == b"two"


def test_cli_serve_with_peer_takes_the_syn_only_from_that_peer(spawn, vectors):
    # Issue 13: without --peer, the first SYN from anyone becomes the session.
    syn = bytes.fromhex(vectors["ptcp"]["syn_hex"])
    with udp_socket() as rogue, udp_socket() as peer:
        port = peer.getsockname()[1]
        serve = spawn([sys.executable, PTCP, "-v", "serve", f"--peer=127.0.0.1:{port}"])
        udp = int(serve.wait_line(r"ptcp: udp 127\.0\.0\.1:(\d+)").group(1))
        rogue.sendto(syn, ("127.0.0.1", udp))
        serve.wait_line(rf"ignoring a datagram from 127\.0\.0\.1:{rogue.getsockname()[1]}")
        peer.sendto(syn, ("127.0.0.1", udp))
        serve.wait_line(rf"ptcp: session with 127\.0\.0\.1:{port}$")
        peer.settimeout(10)
        assert decode_packet(peer.recv(2048)).sent == 0  # its answer goes to the peer


def test_is_syn_from():
    from ptcp import Packet, encode_packet, is_syn_from

    syn = encode_packet(Packet(0, 0, 0xFFFF, 0, 0, Syn()))
    assert is_syn_from(syn, ("10.0.0.1", 5), None)
    assert is_syn_from(syn, ("10.0.0.1", 5), ("10.0.0.1", 5))
    assert is_syn_from(syn, ("10.0.0.1", 5), ("10.0.0.1", 0))
    assert not is_syn_from(syn, ("10.0.0.1", 6), ("10.0.0.1", 5))
    assert not is_syn_from(syn, ("10.0.0.2", 5), ("10.0.0.1", 0))
    assert not is_syn_from(b"PTCP junk", ("10.0.0.1", 5), None)
