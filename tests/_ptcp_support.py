"""Helpers for the PTCP tests and benchmark: local TCP echo and bulk services, a lossy
UDP relay, sessions joined in memory and tunnels joined over loopback UDP.

The services listen on an ephemeral loopback port, serve each connection in a
thread, and record how every connection ended.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

from ptcp import BindRequested, PTCPTunnel, RealmConnected, Session, SynReceived

CHUNK = 256 * 1024


def stream_chunks(seed: int, total: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """A deterministic pseudo-random byte stream of ``total`` bytes (None: endless)."""
    rng = random.Random(seed)
    sent = 0
    while total is None or sent < total:
        n = chunk if total is None else min(chunk, total - sent)
        yield rng.randbytes(n)
        sent += n


def digest_of(seed: int, total: int) -> str:
    h = hashlib.sha256()
    for c in stream_chunks(seed, total):
        h.update(c)
    return h.hexdigest()


class TcpService:
    """A loopback TCP server running ``serve(conn)`` on a thread per connection.

    ``serve`` returns how the connection ended (kept in ``ended``).
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ended: list[str] = []
        self.changed = threading.Condition()
        self.threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            outcome = self.serve(conn)
        except OSError as exc:
            outcome = f"broken: {exc.__class__.__name__}"
        finally:
            conn.close()
        with self.changed:
            self.ended.append(outcome)
            self.changed.notify_all()

    def serve(self, conn: socket.socket) -> str:
        raise NotImplementedError

    def wait_ended(self, count: int, timeout: float) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.ended) >= count, timeout)
            return list(self.ended)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(10)
        self._acceptor.join(10)


class EchoServer(TcpService):
    """Echoes everything until the client closes."""

    def serve(self, conn: socket.socket) -> str:
        buf = bytearray(CHUNK)
        total = 0
        while True:
            n = conn.recv_into(buf)
            if not n:
                return f"eof after {total}"
            conn.sendall(memoryview(buf)[:n])
            total += n


class BulkServer(TcpService):
    """Sends ``stream_chunks(seed, total)`` (total None: until the connection breaks)."""

    def __init__(self, seed: int, total: int | None) -> None:
        self.seed, self.total = seed, total
        super().__init__()

    def serve(self, conn: socket.socket) -> str:
        sent = 0
        for chunk in stream_chunks(self.seed, self.total):
            conn.sendall(chunk)
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(CHUNK):
            pass
        return f"done {sent}"


def echo_roundtrip(
    port: int, seed: int, total: int, timeout: float = 120.0, max_ahead: int = 2 << 20
) -> tuple[str, str]:
    """Send ``total`` bytes through an echo path; return (sent digest, received digest).

    The writer stays at most ``max_ahead`` bytes ahead of the echo, like an
    application that waits for answers (PTCP itself has no receive window).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent_h, got_h = hashlib.sha256(), hashlib.sha256()
    errors: list[BaseException] = []
    progress = threading.Condition()
    state = {"sent": 0, "got": 0, "done": False}

    def writer() -> None:
        try:
            for chunk in stream_chunks(seed, total):
                with progress:
                    if not progress.wait_for(
                        lambda: state["done"] or state["sent"] - state["got"] <= max_ahead,
                        timeout,
                    ):
                        raise TimeoutError("echo stopped coming back")
                    if state["done"]:
                        return
                sent_h.update(chunk)
                sock.sendall(chunk)
                with progress:
                    state["sent"] += len(chunk)
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    got = 0
    buf = bytearray(CHUNK)
    try:
        while got < total:
            n = sock.recv_into(buf)
            if not n:
                break
            got_h.update(memoryview(buf)[:n])
            got += n
            with progress:
                state["got"] = got
                progress.notify_all()
    finally:
        with progress:
            state["done"] = True
            progress.notify_all()
        t.join(timeout)
        sock.close()
    if errors:
        raise errors[0]
    return sent_h.hexdigest(), got_h.hexdigest()


def read_all(port: int, timeout: float = 120.0) -> tuple[int, str]:
    """Read a connection to EOF; return (byte count, digest)."""
    h = hashlib.sha256()
    n = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        buf = bytearray(CHUNK)
        while True:
            k = sock.recv_into(buf)
            if not k:
                break
            h.update(memoryview(buf)[:k])
            n += k
    return n, h.hexdigest()


class LossyRelay:
    """A UDP middlebox on loopback: A <-> relay <-> B, dropping, duplicating and reordering.

    A sends to ``addr_for_a``, B to ``addr_for_b``.  Every datagram is lost with
    probability ``loss``, sent twice with ``dup``, and held back behind the next
    one with ``reorder``.  Counters: ``forwarded``, ``dropped``.  ``inspect``, when
    set, sees every datagram as it arrives (one recv each, as a device reads them).
    """

    def __init__(
        self,
        a_addr: tuple[str, int],
        b_addr: tuple[str, int],
        *,
        loss: float = 0.05,
        dup: float = 0.01,
        reorder: float = 0.02,
        seed: int = 1,
    ) -> None:
        import selectors

        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.face_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.face_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.face_a, self.face_b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind(("127.0.0.1", 0))
        self.addr_for_a = self.face_a.getsockname()
        self.addr_for_b = self.face_b.getsockname()
        # datagrams from A leave through face_b towards B, and the other way round
        self.routes = {self.face_a: (self.face_b, b_addr), self.face_b: (self.face_a, a_addr)}
        self.held: dict[socket.socket, bytes | None] = {self.face_a: None, self.face_b: None}
        self.forwarded = self.dropped = 0
        self.inspect: Callable[[bytes], None] | None = None
        self.sel = selectors.DefaultSelector()
        for s in (self.face_a, self.face_b):
            self.sel.register(s, selectors.EVENT_READ)
        self.stop_r, self.stop_w = socket.socketpair()
        self.sel.register(self.stop_r, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rnd = self.rng.random
        while True:
            for key, _ in self.sel.select():
                src = key.fileobj
                if src is self.stop_r:
                    return
                data = src.recv(65536)
                if self.inspect is not None:
                    self.inspect(data)
                out, dst = self.routes[src]
                if rnd() < self.loss:
                    self.dropped += 1
                    continue
                if self.held[src] is None and rnd() < self.reorder:
                    self.held[src] = data  # goes out after the next one
                    continue
                copies = 2 if rnd() < self.dup else 1
                for _ in range(copies):
                    out.sendto(data, dst)
                held, self.held[src] = self.held[src], None
                if held is not None:
                    out.sendto(held, dst)
                self.forwarded += 1

    def close(self) -> None:
        self.stop_w.send(b"x")
        self.thread.join(10)
        for s in (self.face_a, self.face_b, self.stop_r, self.stop_w):
            s.close()
        self.sel.close()


# --------------------------------------------------------------------------
# Two sans-IO sessions joined in memory (fake clock, lossless, in order)


def connect_pair(a: Session, b: Session, now: float = 0.0) -> int:
    """Lossless handshake + one realm a->b; returns the realm."""
    a.send_syn(now)
    shuttle(a, b, now)
    assert any(isinstance(e, SynReceived) for e in b.events())
    b.send_syn(now)
    shuttle(a, b, now)
    assert any(isinstance(e, SynReceived) for e in a.events())
    realm = a.open_realm(554, now)
    shuttle(a, b, now)
    (bind,) = [e for e in b.events() if isinstance(e, BindRequested)]
    assert (bind.realm, bind.port, bind.ip) == (realm, 554, "127.0.0.1")
    b.accept(realm, now)
    shuttle(a, b, now)
    assert RealmConnected(realm) in a.events()
    return realm


def shuttle(a: Session, b: Session, now: float) -> None:
    """Deliver everything both ways until quiet (lossless, in order)."""
    while True:
        da, db = a.datagrams_to_send(), b.datagrams_to_send()
        if not da and not db:
            return
        for d in da:
            b.receive_datagram(d, now)
        for d in db:
            a.receive_datagram(d, now)


# --------------------------------------------------------------------------
# Two threaded tunnels joined over loopback UDP


def udp_socket(sock_type: type[socket.socket] = socket.socket) -> socket.socket:
    sock = sock_type(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


class Pair:
    """A client tunnel and a device tunnel in this process, joined over loopback UDP.

    ``tunnel`` holds PTCPTunnel options (``device_tunnel`` more for the device's
    side only), ``sock_type`` makes the client's socket.
    """

    def __init__(
        self,
        ports: dict[int, int],
        relay: dict | None = None,
        *,
        tunnel: dict | None = None,
        device_tunnel: dict | None = None,
        sock_type: type[socket.socket] = socket.socket,
        **options,
    ) -> None:
        self.device_events: list = []
        self.event_seen = threading.Condition()
        a_sock, b_sock = udp_socket(sock_type), udp_socket()
        a, b = Session(now=time.monotonic(), **options), Session(now=time.monotonic(), **options)
        now = time.monotonic()
        a.send_syn(now)  # handshake in memory; the tunnels continue the counters
        for d in a.datagrams_to_send():
            b.receive_datagram(d, now)
        b.send_syn(now)
        for d in b.datagrams_to_send():
            a.receive_datagram(d, now)
        for d in a.datagrams_to_send():
            b.receive_datagram(d, now)
        assert SynReceived() in a.events() and SynReceived() in b.events()

        def on_bind(port: int, _ip: str):
            target = ports.get(port)
            return None if target is None else socket.create_connection(("127.0.0.1", target))

        a_peer, b_peer = b_sock.getsockname(), a_sock.getsockname()
        self.relay = None
        if relay is not None:
            self.relay = LossyRelay(a_sock.getsockname(), b_sock.getsockname(), **relay)
            a_peer, b_peer = self.relay.addr_for_a, self.relay.addr_for_b
        tunnel = tunnel or {}
        self.device = PTCPTunnel(
            b_sock,
            b_peer,
            b,
            on_bind=on_bind,
            on_event=self._device_event,
            **(tunnel | (device_tunnel or {})),
        )
        self.client = PTCPTunnel(a_sock, a_peer, a, **tunnel)
        self.client_sock, self.device_sock = a_sock, b_sock
        self.device.start()
        self.client.start()

    def _device_event(self, ev) -> None:
        with self.event_seen:
            self.device_events.append(ev)
            self.event_seen.notify_all()

    def wait_device_event(self, pred, timeout: float = 10.0) -> list:
        with self.event_seen:
            assert self.event_seen.wait_for(
                lambda: [e for e in self.device_events if pred(e)], timeout
            ), self.device_events
            return [e for e in self.device_events if pred(e)]

    def close(self) -> None:
        self.client.close()
        self.device.close()
        if self.relay is not None:
            self.relay.close()
