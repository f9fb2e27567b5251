"""Loopback emulators of the Dahua P2P cloud and a device (PROTOCOLS 2), for tests.

One :class:`Emulator` runs, on its own thread with one select loop, every party
of PROTOCOLS 2.2 on its own loopback UDP port: the main cloud server, the P2P
server, the relay server, the relay agent and the device (a public and a LAN
socket).  It is as strict as the spec: every request's WSSE header, header
order and CSeq are checked, device credentials and the encrypted LocalAddr are
checked, PTCP packets are decoded here independently of ptcp.py and checked
for lmid order, pid reuse, acknowledgement of unsent bytes and sequence gaps.
Anything wrong is appended to :attr:`Emulator.violations`; a test asserts the
list is empty.

Binds on the device open real TCP connections to ``port_map[port]``.  The
device side retransmits its own unacknowledged data (go-back-N), so tests can
impair the datagrams it sends (loss, reordering, duplication).

Where the parties live: by default every socket is on 127.0.0.1.  In the NAT
lab (tests/natlab.py) ``cloud_at`` and ``device_at`` put the cloud's sockets and
the device's into network namespaces of their own, so the device reaches the
cloud through its NAT gateway: it registers from its public socket and keeps
that registration alive, and the cloud advertises the address it saw as the
device's PubAddr, as the real service does.  The relay agent answers
relay-channel with ``HTTP/1.1 200 Server Nat Info!`` (PROTOCOLS 2.2 step 8).

Two main servers, each on its own port and strict about its dialect (PROTOCOLS
2.7 (c)): "main" speaks SmartPSS's, "dmss" DMSS's; a request in the other
dialect (the legacy header order included) gets ``403 DevPwd_InvalidDigest``,
``/online/stun`` needs no auth, and the device is known only to the main server
of its ``app`` (the other answers 404).  The relay server, agent and P2P server
take either dialect, checked by its method.

Switches: ``app`` ("smartpss" or "dmss"), ``fw2024`` (firmware 6.x: sessions
open at SYN; after a 0x17/0x19 BINDs get a made-up CONN and no data is routed),
``relay_only`` (punches never answered, direct PTCP ignored),
``auth`` ((user, password): 403 without device credentials, randsalt in
/info/device), ``loss``/``reorder``/``duplicate`` on the device's datagrams,
``stray`` (signalling/STUN junk on the tunnel socket), :meth:`Emulator.reboot`.

Run alone for manual testing: ``python tests/p2p_emulator.py --map 554=127.0.0.1:8554``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import heapq
import itertools
import logging
import os
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from helpers import P2PProtocolError  # noqa: E402

log = logging.getLogger("p2p_emulator")

PTCP_HEADER = struct.Struct("!4sIIIII")
SYN_BODY = b"\x00\x03\x01\x00"
SYN_PID = 0x0002FFFF
NAT_INFO = b"Server Nat Info!"
REGISTER = b"DEVREG "  # emulator-private: the device's registration with the cloud
REGISTER_INTERVAL = 2.0
MASK32 = 0xFFFFFFFF
CHUNK = 1280
WINDOW = 48  # packets in flight from the device
MIN_RTO = 0.25  # PROTOCOLS 2.7 (b): the device resends what we do not acknowledge after ~250 ms
MAX_RTO = 1.0
DEVICE_LMID_START = 143_000_000  # PROTOCOLS 2.7 (a): the device's uptime clock seen in a capture
LMID_LIMIT = 1 << 31  # an lmid at or above this made a device stop consuming (2.7 (a))
PID_FLOOR = 0xFFFF - 4500  # the captured pid never went more than ~4000 below 0xFFFF
NACK_EVERY = 0.01  # 0x0a requests while a hole in the client's stream lasts (2.7 (b))
NACK_GIVE_UP = 3.0  # then the device goes silent
SIGN_REFUSED_HEARTBEAT = 0.3  # how often an agent that gives no sign sends a heartbeat
REALM_BUFFER = 1 << 20  # bytes queued for a slow local service before data is refused


def _diff(a: int, b: int) -> int:
    """(a - b) mod 2**32 as a signed 32-bit number."""
    d = (a - b) & MASK32
    return d - (1 << 32) if d & 0x80000000 else d


@dataclass
class Channel:
    """What the device learned from one p2p-channel request."""

    identify: bytes
    client_addr: tuple[str, int]
    client_local: list[tuple[str, int]]
    nonce: int | None
    device_tids: set[bytes] = field(default_factory=set)
    client_tids: set[bytes] = field(default_factory=set)
    punched: bool = False


class Realm:
    """A device-side TCP connection and the bytes not yet written to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()

    def flush(self) -> bool:
        """Write what the socket takes now; False when the connection is broken."""
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                return True
            except OSError:
                return False
            del self.out[:n]
        return True


class PeerSession:
    """The device's (or relay agent's) PTCP side for one client address."""

    def __init__(self, emu: Emulator, sock: socket.socket, addr: tuple[str, int], role: str):
        self.emu = emu
        self.sock = sock
        self.addr = addr
        self.role = role  # "device" or "agent"
        self.t0 = time.monotonic()
        self.sent = 0
        self.recv = 0
        self.rx_lmid: int | None = None
        self.rx_bytes = 0  # body bytes received since our last packet (our pid)
        self.acked = 0
        self.unacked: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self.rto = MIN_RTO
        self.retx_at: float | None = None
        self.punished = False  # a header rule of 2.7 broken: consumes nothing more
        self.frozen = False  # takes nothing from the client any more (an outbound stall)
        self.silent = False  # a hole never filled: says nothing more
        self.hole_since: float | None = None
        self.next_nack = 0.0
        self.nacks_sent = 0
        self.holes_filled = 0
        self.binds_granted = 0
        self.client_drops: dict[int, int] = {}  # offset -> copies still to drop
        self.synced = False
        self.open = False
        self.realms: dict[int, Realm] = {}
        self.dropped = 0
        self.dupacks = 0
        self.recovering = False
        self.out_of_order = 0
        self.ooo: dict[int, bytes] = {}
        self.closed_realms: set[int] = set()
        self.close_reasons: dict[int, str] = {}  # why each realm ended (for failing tests)
        self.last_rx = time.monotonic()
        self.next_heartbeat = time.monotonic() + 5.0
        self.routes_nothing = False  # fw2024 after a sign exchange (see Emulator.fw2024)
        self.refusing_sign = False  # agent of Emulator.sign_refused: heartbeats, no sign

    # -- sending -------------------------------------------------------------

    @property
    def lmid(self) -> int:
        """The device's lmid: a millisecond uptime clock in 10 ms steps (2.7 (a))."""
        return DEVICE_LMID_START + int((time.monotonic() - self.t0) * 100) * 10

    def _packet(self, sent: int, body: bytes, pid: int | None = None) -> bytes:
        if pid is None:
            pid = 0xFFFF - min(self.rx_bytes, 0xFFFF)
        self.rx_bytes = 0
        rmid = self.rx_lmid if self.rx_lmid is not None else 0
        header = PTCP_HEADER.pack(b"PTCP", sent & MASK32, self.recv & MASK32, pid, self.lmid, rmid)
        return header + body

    def send(self, body: bytes = b"") -> None:
        if self.silent:
            return
        if not body:
            self.emu.device_send(self.sock, self.addr, self._packet(self.sent, b""))
            return
        pid = SYN_PID if body == SYN_BODY else None
        self.unacked.append((self.sent, body, pid))
        data = self._packet(self.sent, body, pid)
        self.sent = (self.sent + len(body)) & MASK32
        if self.retx_at is None:
            self.retx_at = time.monotonic() + self.rto
        self.emu.device_send(self.sock, self.addr, data)

    def window_open(self) -> bool:
        return len(self.unacked) < WINDOW

    def tick(self, now: float) -> None:
        if self.silent:
            return
        if self.hole_since is not None:
            if now - self.hole_since >= NACK_GIVE_UP:
                self.emu.violation(f"{self.role}: a hole in the client's stream lasted 3 s")
                self.silent = True
                return
            if now >= self.next_nack:
                self._send_nack(now)
        if self.retx_at is not None and now >= self.retx_at and self.unacked:
            # The client keeps what arrives out of order, so resending the head is enough;
            # partial acks then pull the next holes (see _ack).
            self.recovering = True
            self._resend_head()
            self.rto = min(self.rto * 2, MAX_RTO)
            self.retx_at = now + self.rto
        if (self.open or self.refusing_sign) and now >= self.next_heartbeat:
            self.next_heartbeat = now + (SIGN_REFUSED_HEARTBEAT if self.refusing_sign else 5.0)
            self.send(b"\x13" + bytes(11))

    # -- receiving -----------------------------------------------------------

    def violation(self, text: str) -> None:
        self.emu.violation(f"{self.role} PTCP from {self.addr}: {text}")

    def receive(self, data: bytes) -> None:
        magic, sent, recv, pid, lmid, rmid = PTCP_HEADER.unpack_from(data)
        body = data[PTCP_HEADER.size :]
        if self.punished or self.silent:
            return
        if self.frozen:
            return  # its recv never moves again; it still sends (see Emulator.freeze)
        hole_at = self.emu.hole_at
        if hole_at is not None and body[:1] == b"\x10" and not self.client_drops:
            if _diff(sent, hole_at) >= 0:
                self.client_drops[sent] = 2  # this packet and its first resend are lost
        if body and body[0] == 0x10 and self.client_drops.get(sent):
            self.client_drops[sent] -= 1  # the hole a test asked for
            return
        self.last_rx = time.monotonic()
        self.rx_bytes += len(body)
        if not self._header_ok(pid, lmid, body):
            return
        # repeated lmids and pids are normal (2.7 (a)): only the rules above hold
        self.rx_lmid = lmid
        if _diff(rmid, self.lmid) > 0:
            self.violation(f"rmid {rmid} is later than any lmid sent ({self.lmid})")
        self._ack(recv, not body)
        if not body:
            return
        ahead = _diff(sent, self.recv)
        if ahead < 0:  # a retransmission of something we already have
            self.send()
            return
        if ahead > 0:
            # A hole before this one: hold it, and ask for the hole with 0x0a every
            # ~10 ms (2.7 (b)) instead of acknowledging.
            self.out_of_order += 1
            if len(self.ooo) < 4096:
                self.ooo.setdefault(sent, body)
            if self.hole_since is None:
                self.hole_since = time.monotonic()
                self._send_nack(self.hole_since)
            return
        if self._accept(body):
            while self.recv in self.ooo:
                if not self._accept(self.ooo[self.recv], drain=True):
                    break
        if self.hole_since is not None and not self.ooo:
            self.hole_since = None
            self.holes_filled += 1
        elif self.ooo:
            self.hole_since = self.hole_since or time.monotonic()
        self.send()

    def _header_ok(self, pid: int, lmid: int, body: bytes) -> bool:
        """The header rules a device is reported to punish (2.7 (a)); a breach makes
        it stop consuming anything from this client."""
        why = None
        if lmid >= LMID_LIMIT:
            why = f"lmid {lmid} >= 2^31"
        elif body == SYN_BODY:
            if pid != SYN_PID:
                why = f"SYN with pid {pid:#x}"
        elif not PID_FLOOR <= pid <= 0xFFFF:
            why = f"pid {pid:#x} outside the captured band"
        if why is None:
            return True
        self.violation(why + ": the device stops consuming")
        self.punished = True
        return False

    def _send_nack(self, now: float) -> None:
        """0x0a for the hole at our recv: out of band, not counted in our sent, in one
        of the layouts reported (2.7 (b))."""
        hole = min(self.ooo, key=lambda off: _diff(off, self.recv)) if self.ooo else self.recv
        missing = _diff(hole, self.recv) & 0xFFFFFF
        forms = [
            b"\x0a\x00\x08" + bytes([self.recv & 0xFF]) + bytes(4) + bytes([0, missing & 0xFF, 0]),
            b"\x0a\x00\x00\x08" + (self.recv & MASK32).to_bytes(4, "big") + bytes(4)
            + missing.to_bytes(4, "big"),
        ]  # fmt: skip
        body = forms[self.nacks_sent % len(forms)]
        self.nacks_sent += 1
        self.next_nack = now + NACK_EVERY
        self.emu.device_send(self.sock, self.addr, self._packet(self.sent, body))

    def _accept(self, body: bytes, drain: bool = False) -> bool:
        """Take the next in-order body; False when there is no room for it."""
        if body[0] == 0x10 and len(body) >= 12:
            realm = self.realms.get(int.from_bytes(body[4:8], "big"))
            if realm is not None and len(realm.out) > REALM_BUFFER:
                self.dropped += 1  # the service is not reading: no room, like a full window
                return False
        if drain:
            del self.ooo[self.recv]
        self.recv = (self.recv + len(body)) & MASK32
        self._body(body)
        return True

    def _ack(self, recv: int, pure: bool) -> None:
        if _diff(recv, self.acked) < 0:
            return
        if _diff(recv, self.sent) > 0:
            self.violation(f"acknowledges byte {recv} but only {self.sent} were sent")
            return
        progressed = False
        while self.unacked:
            offset, body, _ = self.unacked[0]
            if _diff(recv, (offset + len(body)) & MASK32) >= 0:
                self.unacked.popleft()
                progressed = True
            else:
                break
        self.acked = recv
        if progressed:
            self.dupacks = 0
            self.rto = MIN_RTO
            self.retx_at = time.monotonic() + self.rto if self.unacked else None
            if self.recovering and self.unacked:
                self._resend_head()  # partial ack: the next hole is at the head
            elif not self.unacked:
                self.recovering = False
        elif pure and self.unacked:
            self.dupacks += 1
            if self.dupacks == 3:  # fast retransmit
                self.recovering = True
                self._resend_head()

    def _resend_head(self) -> None:
        offset, body, pid = self.unacked[0]  # same sent, fresh recv/lmid/rmid/pid (2.7 (b))
        self.emu.device_send(self.sock, self.addr, self._packet(offset, body, pid))

    def _body(self, body: bytes) -> None:
        kind = body[0]
        if body == SYN_BODY:
            self.synced = True
            self.send(SYN_BODY)
            if self.emu.fw2024 and not self.open:  # PROTOCOLS 2.7 (c): straight to BIND/DATA
                self.open = True
                self.emu.sessions_opened += 1
            return
        if not self.synced:
            self.violation(f"body {kind:#x} before SYN")
        if kind in (0x17, 0x19) and self.emu.fw2024:
            self.routes_nothing = True  # answered, but no DATA will ever be routed
        if kind == 0x17 and self.role == "agent":
            if body != b"\x17" + bytes(11):
                self.violation(f"bad sign request {body.hex()}")
            if self.emu.sign_refused:  # PROTOCOLS 2.7 (c): a short reply, then heartbeats
                self.send(b"\x18" + bytes(11))
                self.refusing_sign = True
                self.next_heartbeat = time.monotonic() + SIGN_REFUSED_HEARTBEAT
                return
            self.send(b"\x18" + bytes(11) + self.emu.sign_for(self))
            return
        if kind == 0x19:
            if body[:12] != b"\x19" + bytes(11) or not self.emu.sign_ok(self, body[12:]):
                self.violation("0x19 does not carry the sign from the relay agent")
                return
            self.send(b"\x1a" + bytes(11))
            return
        if kind == 0x1B:
            if body != b"\x1b" + bytes(11):
                self.violation(f"bad 0x1b body {body.hex()}")
            if not self.open:
                self.open = True
                self.emu.sessions_opened += 1
            return
        if kind == 0x13:
            if body[1:] != bytes(11):
                self.violation(f"bad heartbeat {body.hex()}")
            return
        if not self.open:
            self.violation(f"body {kind:#x} before the sign exchange finished")
            return
        if len(body) < 12:
            self.violation(f"short body {body.hex()}")
            return
        length = int.from_bytes(body[1:4], "big")
        realm = int.from_bytes(body[4:8], "big")
        if body[8:12] != bytes(4):
            self.violation(f"non-zero padding in body {kind:#x}")
        if kind == 0x10:
            if length != len(body) - 12:
                self.violation(f"data length field {length} != {len(body) - 12}")
            if len(body) - 12 > CHUNK:
                self.violation(f"data chunk of {len(body) - 12} bytes > {CHUNK}")
            conn = self.realms.get(realm)
            if conn is None:
                if realm not in self.closed_realms:
                    self.violation(f"data for unknown realm {realm:#x}")
                return
            conn.out += body[12:]
            self.emu.realm_bytes[self.role] += len(body) - 12
            if not conn.flush():
                self._close_realm(realm, notify=True, why="writing to the service failed")
            return
        if kind == 0x11:
            self._bind(realm, body)
            return
        if kind == 0x12:
            status = body[12:]
            if status == b"DISC":
                if realm in self.realms:
                    self._close_realm(realm, notify=True, why="DISC from the client")
                elif realm not in self.closed_realms:
                    self.violation(f"DISC for unknown realm {realm:#x}")
            elif status != b"CONN":
                self.violation(f"bad status {status!r}")
            return
        self.violation(f"unknown body type {kind:#x}")

    def _bind(self, realm: int, body: bytes) -> None:
        if len(body) != 20 or body[16:20] != b"\x7f\x00\x00\x01":
            self.violation(f"bad bind body {body.hex()}")
            return
        if realm in self.realms or realm in self.closed_realms:
            self.violation(f"bind reuses realm {realm:#x}")
            return
        port = int.from_bytes(body[12:16], "big")
        self.emu.bind_lengths.append(int.from_bytes(body[1:4], "big"))
        limit = self.emu.bind_limit
        if limit is not None and self.binds_granted >= limit:
            self.closed_realms.add(realm)  # the client's DISC for it is fair
            return  # this tunnel stopped granting binds: no answer at all (2.7 (b))
        self.binds_granted += 1
        self.emu.binds.append(port)
        if self.routes_nothing:  # a made-up CONN: the realm's data goes nowhere
            self.closed_realms.add(realm)
            self.send(b"\x12\x00\x00\x00" + realm.to_bytes(4, "big") + bytes(4) + b"CONN")
            return
        target = self.emu.port_map.get(port)
        conn = None
        if target is not None:
            try:
                conn = socket.create_connection(target, timeout=5)
                conn.setblocking(False)
            except OSError:
                conn = None
        if conn is None:
            self.closed_realms.add(realm)
            self.send(b"\x12\x00\x00\x00" + realm.to_bytes(4, "big") + bytes(4) + b"DISC")
            return
        self.realms[realm] = Realm(conn)
        self.send(b"\x12\x00\x00\x00" + realm.to_bytes(4, "big") + bytes(4) + b"CONN")

    def _close_realm(self, realm: int, notify: bool, why: str = "closed") -> None:
        conn = self.realms.pop(realm, None)
        self.closed_realms.add(realm)
        if conn is not None:
            try:
                port = conn.sock.getsockname()[1]
            except OSError:
                port = 0
            self.close_reasons[realm] = f"{why} (service connection from port {port})"
            log.debug("realm %08x closed: %s", realm, self.close_reasons[realm])
            conn.sock.close()
        if notify:
            self.send(b"\x12\x00\x00\x00" + realm.to_bytes(4, "big") + bytes(4) + b"DISC")

    def pump_tcp(self, conn: socket.socket) -> None:
        """Move bytes from a realm's TCP socket into data packets."""
        realm = next((r for r, c in self.realms.items() if c.sock is conn), None)
        if realm is None:
            return
        while self.window_open():
            try:
                data = conn.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close_realm(realm, notify=True, why=f"reading the service failed: {exc}")
                return
            if not data:
                self._close_realm(realm, notify=True, why="the service closed")
                return
            head = b"\x10" + len(data).to_bytes(3, "big") + realm.to_bytes(4, "big") + bytes(4)
            self.emu.realm_bytes[self.role] += len(data)
            self.send(head + data)

    def drop(self) -> None:
        """Forget the session without a word (device reboot)."""
        for conn in self.realms.values():
            conn.sock.close()
        self.realms.clear()


class Emulator:
    """Every cloud party plus a device, on loopback UDP ports, on one thread."""

    def __init__(
        self,
        serial: str = "EMU0123456789",
        *,
        port_map: dict[int, tuple[str, int]] | None = None,
        auth: tuple[str, str] | None = None,
        randsalt: str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        relay_only: bool = False,
        loss: float = 0.0,
        reorder: float = 0.0,
        duplicate: float = 0.0,
        stray: bool = False,
        cloud_user: str = helpers.DEFAULT_CLOUD_USER,
        cloud_key: str = helpers.DEFAULT_CLOUD_KEY,
        seed: int | None = None,
        cloud_at: tuple[str, str] | None = None,
        device_at: tuple[str, str] | None = None,
        bind_limit: int | None = None,
        hole_at: int | None = None,
        app: str = "smartpss",
        fw2024: bool = False,
        version: str | None = None,
        sign_refused: bool = False,
    ) -> None:
        """``cloud_at``/``device_at``: (network namespace, IP) for the cloud's and the
        device's sockets (default: this namespace, 127.0.0.1).  ``bind_limit``: each
        tunnel grants that many binds, then never answers one again.  ``hole_at``:
        the client's first data packet at or after that stream offset, and its
        first resend, are lost (a hole the device asks for with 0x0a).  ``app``: the
        app whose cloud identity the device is bound to; the other main server
        answers 404 for it.  ``fw2024``: firmware 6.x that wants no sign exchange and
        routes no data after one (PROTOCOLS 2.7 (c)); ``sign_refused``: the relay
        agent answers 0x17 with a short packet and heartbeats, never a sign (2.7
        (c)); ``version``: what p2p-channel
        replies report (default 6.5.0 for fw2024, else 5.0.0).  ``cloud_user``/
        ``cloud_key``: the SmartPSS pair."""
        self.serial = serial
        self.port_map = dict(port_map or {})
        self.auth = auth
        self.randsalt = randsalt
        self.relay_only = relay_only
        self.bind_limit = bind_limit
        self.hole_at = hole_at
        self.bind_lengths: list[int] = []
        self.loss, self.reorder, self.duplicate = loss, reorder, duplicate
        self.stray = stray
        self.cloud_user, self.cloud_key = cloud_user, cloud_key
        if app not in helpers.APP_PROFILES:
            raise ValueError(f"unknown app {app!r}")
        self.app = app
        self.fw2024 = fw2024
        self.sign_refused = sign_refused
        self.version = version or ("6.5.0" if fw2024 else "5.0.0")
        self.refused: list[str] = []  # requests answered 403 for their dialect
        self.local_channels = 0  # local-channel requests (best effort, PROTOCOLS 2.7 (c))
        self.rng = random.Random(seed)
        self.violations: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (component, path)
        self.punched_addrs: set[tuple[str, int]] = set()
        self.binds: list[int] = []
        self.unbound: list[str] = []
        self.sessions_opened = 0
        self.impaired = collections.Counter()  # sent, lost, reordered, duplicated
        self.online = True
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cseq: dict[tuple[str, int], int] = {}  # last CSeq per client address
        self._replies: dict[tuple[str, tuple[str, int], int], bytes] = {}
        self.channels: dict[tuple[str, int], Channel] = {}
        self.relay_tokens: dict[str, dict] = {}
        self.sessions: dict[tuple[int, tuple[str, int]], PeerSession] = {}
        self._held: list[tuple[socket.socket, tuple[str, int], bytes]] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        names = ("main", "dmss", "p2p", "relay", "agent", "device", "lan")
        self.socks: dict[str, socket.socket] = {}
        self.realm_bytes: collections.Counter[str] = collections.Counter()  # by role
        for name in names:
            netns, ip = (device_at if name in ("device", "lan") else cloud_at) or ("", "127.0.0.1")
            if netns:
                from natlab import socket_in_netns

                sock = socket_in_netns(netns)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ip, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setblocking(False)
            self.socks[name] = sock
        self.addr = {name: s.getsockname() for name, s in self.socks.items()}
        self.device_pub = self.addr["device"]  # until the cloud has seen it register
        self._behind_nat = device_at is not None
        self.registered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2p-emulator", daemon=True)

    # -- public --------------------------------------------------------------

    @property
    def cloud_port(self) -> int:
        """The SmartPSS main server's port."""
        return self.addr["main"][1]

    @property
    def dmss_port(self) -> int:
        """The DMSS main server's port."""
        return self.addr["dmss"][1]

    def start(self) -> Emulator:
        self._thread.start()
        if self._behind_nat:
            self.schedule(0, self._register)
        else:  # on one host the cloud sees the device's socket as it is
            self.registered.set()
        RUNNING[self.cloud_port] = self
        return self

    def _register(self) -> None:
        """The device's keep-alive with the cloud, from its public socket."""
        self._sendto(self.socks["device"], self.addr["main"], REGISTER + self.serial.encode())
        self.schedule(REGISTER_INTERVAL, self._register)

    def close(self) -> None:
        RUNNING.pop(self.cloud_port, None)
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(10)
        for session in self.sessions.values():
            session.drop()
        for sock in self.socks.values():
            sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def violation(self, text: str) -> None:
        log.warning("VIOLATION %s", text)
        with self._lock:
            self.violations.append(text)

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the emulator thread and return its result."""
        done = threading.Event()
        box: list[object] = []

        def job() -> None:
            box.append(fn())
            done.set()

        self.schedule(0, job)
        if not done.wait(10):
            raise TimeoutError("emulator thread did not answer")
        return box[0]

    def open_realms(self) -> int:
        """Realms currently open on the device (TCP connections to services)."""
        return int(self.call(lambda: sum(len(s.realms) for s in self.sessions.values())))  # type: ignore[arg-type]

    def open_sessions(self) -> int:
        return int(self.call(lambda: sum(1 for s in self.sessions.values() if s.open)))  # type: ignore[arg-type]

    def freeze(self) -> None:
        """The sessions open now take nothing more from their clients: their recv
        stops moving (PROTOCOLS 2.7 (b), outbound stall) while they keep sending.
        Sessions opened later work."""

        def go() -> None:
            for session in self.sessions.values():
                session.frozen = True

        self.call(go)

    def header_stats(self) -> dict[str, int]:
        """0x0a requests sent and holes filled, over every session."""
        def total(attr: str) -> int:
            return sum(getattr(s, attr) for s in self.sessions.values())

        return self.call(lambda: {"nacks": total("nacks_sent"), "holes": total("holes_filled")})  # type: ignore[return-value]

    def reboot(self, offline_for: float = 1.0) -> None:
        """Drop every session silently and go offline for a while."""

        def go() -> None:
            for session in self.sessions.values():
                session.drop()
            self.sessions.clear()
            self.channels.clear()
            for entry in self.relay_tokens.values():
                entry["dead"] = True
            self.online = False
            self.schedule(offline_for, lambda: setattr(self, "online", True))

        self.call(go)

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- loop ----------------------------------------------------------------

    def _run(self) -> None:
        names = {s: name for name, s in self.socks.items()}
        self._next_stray = time.monotonic() + 0.5
        while not self._stop.is_set():
            try:
                self._iteration(names)
            except Exception as exc:  # an emulator bug must show up, not hang the test
                log.exception("emulator error")
                self.violation(f"emulator loop error: {exc!r}")

    def _iteration(self, names: dict[socket.socket, str]) -> None:
        now = time.monotonic()
        with self._lock:
            due = []
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
            timeout = min(0.05, max(0.0, self._timers[0][0] - now)) if self._timers else 0.05
        for fn in due:
            fn()
        tcp: dict[socket.socket, PeerSession] = {}
        writers: dict[socket.socket, tuple[PeerSession, int]] = {}
        for session in self.sessions.values():
            for realm, conn in list(session.realms.items()):
                if session.window_open():
                    tcp[conn.sock] = session
                if conn.out:
                    writers[conn.sock] = (session, realm)
        rlist = [*self.socks.values(), self._wake_r, *tcp]
        wlist = list(writers)
        try:
            ready, writable, _ = select.select(rlist, wlist, [], timeout)
        except (OSError, ValueError):
            return
        for sock in writable:
            session, realm = writers[sock]
            conn = session.realms.get(realm)
            if conn is not None and not conn.flush():
                session._close_realm(realm, notify=True, why="writing to the service failed")
        for sock in ready:
            if sock is self._wake_r:
                self._wake_r.recv(4096)
                continue
            name = names.get(sock)
            if name is None:
                tcp[sock].pump_tcp(sock)  # a no-op when the realm closed meanwhile
                continue
            for _ in range(64):
                try:
                    data, addr = sock.recvfrom(65536)
                except OSError:  # drained (BlockingIOError) or an ICMP error
                    break
                try:
                    self._datagram(name, sock, data, addr)
                except Exception as exc:  # an emulator bug must not kill the loop
                    log.exception("emulator error")
                    self.violation(f"emulator crashed on a datagram to {name}: {exc!r}")
        now = time.monotonic()
        for session in list(self.sessions.values()):
            session.tick(now)
        self._flush_held()
        if self.stray and now >= self._next_stray:
            self._next_stray = now + 0.5
            self._send_stray()

    # -- device datagram impairments -----------------------------------------

    def device_send(self, sock: socket.socket, addr: tuple[str, int], data: bytes) -> None:
        """Send a datagram of the device (or agent), lost/held back/doubled as configured."""
        self.impaired["sent"] += 1
        if self.loss and self.rng.random() < self.loss:
            self.impaired["lost"] += 1
            return
        if self.reorder and self.rng.random() < self.reorder:
            self.impaired["reordered"] += 1
            self._held.append((sock, addr, data))  # goes out after the next ones
            return
        self._sendto(sock, addr, data)
        if self.duplicate and self.rng.random() < self.duplicate:
            self.impaired["duplicated"] += 1
            self._sendto(sock, addr, data)

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for sock, addr, data in held:
            self._sendto(sock, addr, data)

    @staticmethod
    def _sendto(sock: socket.socket, addr: tuple[str, int], data: bytes) -> None:
        try:
            sock.sendto(data, addr)
        except OSError:
            pass

    def _send_stray(self) -> None:
        junk = [
            b"HTTP/1.1 200 OK\r\nCSeq: 999\r\n\r\n",
            helpers.build_punch_request(bytes(8), ("127.0.0.1", 1)).to_wire(),
            b"\x00\x01garbage",
        ]
        for session in self.sessions.values():
            if session.open and session.role == "device":
                self._sendto(session.sock, session.addr, self.rng.choice(junk))

    # -- dispatch ------------------------------------------------------------

    def _datagram(self, name: str, sock: socket.socket, data: bytes, addr) -> None:
        if data.startswith(REGISTER):
            if name == "main" and data[len(REGISTER) :] == self.serial.encode():
                if addr != self.device_pub:
                    log.info("device registered from %s:%s", *addr)
                self.device_pub = addr
                self.registered.set()
                self._sendto(sock, addr, REGISTER + b"OK")
            return  # on the device: the cloud's answer (keeps its NAT mapping alive)
        if name in ("device", "lan", "agent") and data[:4] == b"PTCP":
            self._ptcp(name, sock, data, addr)
            return
        if name in ("device", "lan"):
            self._punch(name, sock, data, addr)
            return
        try:
            req = helpers.parse_request(data)
        except P2PProtocolError as exc:
            self.violation(f"{name}: unparsable datagram from {addr}: {exc}")
            return
        self.requests.append((name, req.path))
        dialect = self._dialect(req)
        if name in MAIN_SERVERS and dialect is not helpers.APP_PROFILES[MAIN_SERVERS[name]]:
            # PROTOCOLS 2.7 (c): the wrong header order or method gets this, even with
            # correct crypto
            self.refused.append(f"{name}: {req.method} {req.path}")
            self.violation(f"{name}: request in the {dialect.name} dialect")
            self._sendto(sock, addr, helpers.build_reply(403, "DevPwd_InvalidDigest"))
            return
        if req.path == dialect.warmup_path:
            self._warmup(name, sock, req, addr, dialect)
            return
        cseq = self._check_request(name, req, addr, dialect)
        if cseq is None:
            self._sendto(sock, addr, helpers.build_reply(401, "Unauthorized"))
            return
        key = (name, addr, cseq)
        if key in self._replies:  # a retransmission: same answer again
            self._sendto(sock, addr, self._replies[key])
            return
        if name in MAIN_SERVERS:
            self._on_main(name, sock, req, addr, cseq, dialect)
            return
        handler = getattr(self, f"_on_{name}")
        handler(sock, req, addr, cseq)

    def _reply(
        self, sock, addr, name: str, cseq: int, code: int, reason: str, body=None, request_id=None
    ) -> None:
        data = helpers.build_reply(code, reason, cseq=cseq, body=body, request_id=request_id)
        self._replies[(name, addr, cseq)] = data
        self._sendto(sock, addr, data)

    @staticmethod
    def _dialect(req: helpers.Request) -> helpers.AppProfile:
        """The app profile whose dialect ``req`` is in (by its method and header order)."""
        order = tuple(n for n, _ in req.headers if n not in ("Content-Type", "Content-Length"))
        for profile in helpers.APP_PROFILES.values():
            if req.method in (profile.get_method, profile.post_method):
                if order and order[0] == "CSeq" and profile.header_order[0] != "CSeq":
                    return helpers.SMARTPSS  # the legacy order, whatever the method
                return profile
        return helpers.SMARTPSS

    def _pair(self, profile: helpers.AppProfile) -> tuple[str, str]:
        if profile is helpers.SMARTPSS:
            return self.cloud_user, self.cloud_key
        return profile.cloud_user, profile.cloud_key

    def _warmup(self, name: str, sock, req: helpers.Request, addr, dialect) -> None:
        """``/online/stun``: no auth, no version headers (PROTOCOLS 2.7 (c))."""
        order = tuple(n for n, _ in req.headers)
        if order != dialect.warmup_headers or req.method != dialect.get_method:
            self.violation(f"{name}: warm-up {req.method} with headers {order}")
        if req.cseq is None:
            self.violation(f"{name}: warm-up CSeq {req.header('CSeq')!r}")
        self._sendto(sock, addr, helpers.build_reply(200, "OK", cseq=req.cseq))

    def _check_request(
        self, name: str, req: helpers.Request, addr, dialect: helpers.AppProfile
    ) -> int | None:
        order = [n for n, _ in req.headers]
        want = [
            n
            for n in dialect.header_order
            if n != "x-pcs-request-id" or dialect.sends_request_id(req.path)
        ]
        # local-channel is a GET with a body (PROTOCOLS 2.7 (c))
        if req.method == dialect.post_method or req.path.endswith("/local-channel"):
            want += ["Content-Type", "Content-Length"]
            if req.header("Content-Type") != "":
                self.violation(f"{name}: Content-Type must be empty")
            if not req.body:
                self.violation(f"{name}: {req.method} without a body")
        elif req.body:
            self.violation(f"{name}: {req.method} with a body")
        if order != want:
            self.violation(f"{name}: header order {order} != {want}")
        for header, value in dialect.fixed_headers:
            if req.header(header) != value:
                self.violation(f"{name}: {header} {req.header(header)!r} != {value!r}")
        if not req.wsse_valid(*self._pair(dialect)):
            self.violation(f"{name}: bad WSSE on {req.path}")
            return None
        created = req.wsse().get("Created", "")
        if created.endswith("Z") != (dialect.created_style == "Z"):
            self.violation(f"{name}: Created {created!r} in the wrong style")
        if dialect.sends_request_id(req.path):
            if not re.fullmatch(r"[0-9a-f]{32}", req.request_id or ""):
                self.violation(f"{name}: x-pcs-request-id {req.request_id!r}")
        cseq = req.cseq
        if cseq is None or str(cseq) != req.header("CSeq"):
            self.violation(f"{name}: bad CSeq {req.header('CSeq')!r}")
            return None
        if dialect.cseq_style != "counter":
            return cseq  # a random signed int32 per request
        # CSeq counts the requests of one client socket, whichever server they go to;
        # a retransmission repeats an earlier one.
        # Behind a symmetric NAT each server sees the socket under another port, so
        # a newcomer may start anywhere; on loopback the count must start at 1.
        loopback = addr[0].startswith("127.")
        last = self._cseq.get(addr, 0 if loopback else cseq - 1)
        if cseq > last:
            if cseq != last + 1 and loopback:  # else requests to other servers come between
                self.violation(f"{name}: CSeq {cseq} after {last} from {addr} (must be +1)")
            self._cseq[addr] = cseq
        return cseq

    def _addr_text(self, name: str) -> str:
        host, port = self.addr[name]
        return f"{host}:{port}"

    def _on_main(self, name: str, sock, req: helpers.Request, addr, cseq: int, dialect) -> None:
        """A main server: "main" (SmartPSS) or "dmss"; the device is known only to the
        one of its app (PROTOCOLS 2.7 (c), pair-gating)."""
        path = req.path
        sn = self.serial if MAIN_SERVERS[name] == self.app else None
        if dialect.sends_request_id(path):
            self._on_main_with_request_id(name, sock, req, addr, cseq, sn)
            return
        if path == "/probe/p2psrv":
            self._reply(sock, addr, name, cseq, 200, "OK")
        elif path.startswith("/online/p2psrv/"):
            if path == f"/online/p2psrv/{sn}" and self.online:
                body = helpers.xml_body({"US": self._addr_text("p2p")})
                self._reply(sock, addr, name, cseq, 200, "OK", body)
            else:
                self._reply(sock, addr, name, cseq, 404, "Not Found")
        elif path == f"/info/device/{sn}":
            info = ""
            if self.auth:
                info = helpers.encrypt_info(
                    {"httpport": 80, "privport": 37777, "randsalt": self.randsalt, "rtspport": 554}
                )
            self._reply(sock, addr, name, cseq, 200, "OK", helpers.xml_body({"Info": info}))
        elif path == "/online/relay":
            body = helpers.xml_body({"Address": self._addr_text("relay")})
            self._reply(sock, addr, name, cseq, 200, "OK", body)
        elif path == f"/device/{sn}/p2p-channel" and req.body:
            trying = helpers.build_reply(100, "Trying", cseq=cseq)
            self._replies[(name, addr, cseq)] = trying  # a retransmission meanwhile gets 100
            self._sendto(sock, addr, trying)
            code, reason, body = self._p2p_channel(req, addr)
            self.schedule(0.05, lambda: self._reply(sock, addr, name, cseq, code, reason, body))
        elif path == f"/device/{sn}/relay-channel" and req.body:
            code, reason, body = self._relay_channel(req, addr)
            if code != 200:  # success is the agent's to tell (PROTOCOLS 2.2 step 8)
                self._reply(sock, addr, name, cseq, code, reason, body)
        elif path == f"/device/{sn}/local-channel":
            if req.method != dialect.get_method:
                self.violation(f"{name}: local-channel with {req.method}")
            denied = self._check_auth(req.fields, "", "local-channel") if self.auth else None
            if denied or not self.auth:
                self.violation(f"{name}: local-channel {denied or 'without device credentials'}")
            self.local_channels += 1
            self._reply(sock, addr, name, cseq, 403 if denied else 200, denied or "OK")
        else:
            self._reply(sock, addr, name, cseq, 404, "Not Found")

    def _on_main_with_request_id(
        self, name: str, sock, req: helpers.Request, addr, cseq: int, sn: str | None
    ) -> None:
        """p2p-channel in the DMSS dialect: replies carry the request's
        x-pcs-request-id, the final 200 with ``CSeq: 0``; an error carries an id of
        the server's making (PROTOCOLS 2.7 (c), Replies)."""
        request_id = req.request_id
        trying = helpers.build_reply(100, "Trying", cseq=cseq, request_id=request_id)
        self._replies[(name, addr, cseq)] = trying
        self._sendto(sock, addr, trying)
        if req.path == f"/device/{sn}/p2p-channel" and req.body:
            code, reason, body = self._p2p_channel(req, addr)
        else:
            code, reason, body = 404, "Not Found", None
        if code >= 400:
            request_id = hashlib.md5(f"{name}/{self.serial}".encode()).hexdigest()
        final = helpers.build_reply(code, reason, cseq=0, body=body, request_id=request_id)

        def send() -> None:
            self._replies[(name, addr, cseq)] = final
            self._sendto(sock, addr, final)

        self.schedule(0.05, send)

    def _on_p2p(self, sock, req: helpers.Request, addr, cseq: int) -> None:
        if req.path == f"/probe/device/{self.serial}" and self.online:
            self._reply(sock, addr, "p2p", cseq, 200, "OK")
        else:
            self._reply(sock, addr, "p2p", cseq, 404, "Not Found")

    def _on_relay(self, sock, req: helpers.Request, addr, cseq: int) -> None:
        if req.path == "/relay/agent":
            token = f"{self.rng.getrandbits(64):016x}"
            self.relay_tokens[token] = {
                "client": addr, "agent_client": None, "started": False, "sign": None,
                "channelled": False,
            }  # fmt: skip
            body = helpers.xml_body({"Token": token, "Agent": self._addr_text("agent")})
            self._reply(sock, addr, "relay", cseq, 200, "OK", body)
        elif req.path.startswith("/relay/unbind/"):
            token = req.path.rsplit("/", 1)[1]
            if token not in self.relay_tokens:
                self.violation(f"unbind of unknown token {token}")
            else:
                self.relay_tokens[token]["dead"] = True
                client = self.relay_tokens[token]["agent_client"]
                session = self.sessions.pop((self.addr["agent"][1], client), None)
                if session is not None:
                    session.drop()
            self.unbound.append(token)
            self._reply(sock, addr, "relay", cseq, 200, "OK")
        else:
            self._reply(sock, addr, "relay", cseq, 404, "Not Found")

    def _on_agent(self, sock, req: helpers.Request, addr, cseq: int) -> None:
        match = re.fullmatch(r"/relay/start/(\w+)", req.path)
        entry = self.relay_tokens.get(match.group(1)) if match else None
        if entry is None:
            self.violation(f"agent: bad request {req.method} {req.path}")
            self._reply(sock, addr, "agent", cseq, 404, "Not Found")
            return
        if not req.method.endswith("POST") or req.body != "<body><Client>:0</Client></body>":
            self.violation(f"agent: relay/start body {req.body!r}")
        if addr[0] != entry["client"][0]:
            # the same socket; behind a symmetric NAT it shows another port to the agent
            self.violation("agent: relay/start from another host than /relay/agent")
        entry["agent_client"] = addr
        entry["started"] = True
        self._reply(sock, addr, "agent", cseq, 200, "OK")

    # -- device: channels and credentials -------------------------------------

    def _check_auth(self, fields: dict[str, str], payload: str, what: str) -> str | None:
        """None when the credentials are right, else the 403 reason."""
        if self.auth is None:
            return None
        if "DevAuth" not in fields:
            return "DevPwd_InvalidDigest"
        user, password = self.auth
        salt = fields.get("RandSalt") or helpers.DEFAULT_RANDSALT
        if salt != self.randsalt:
            return "DevPwd_InvalidSalt"
        key = helpers.device_key(user, password, salt)
        try:
            nonce, created = int(fields["Nonce"]), int(fields["CreateDate"])
        except (KeyError, ValueError):
            self.violation(f"{what}: auth without numeric Nonce/CreateDate")
            return "DevPwd_InvalidDigest"
        if abs(created - time.time()) > 600:
            self.violation(f"{what}: CreateDate {created} is not now")
        if fields.get("UserName") != user:
            return "DevPwd_InvalidDigest"
        expected = helpers.dev_auth(key, nonce, created, payload)
        if fields["DevAuth"] != expected:
            return "DevPwd_InvalidDigest"
        return None

    def _p2p_channel(self, req: helpers.Request, addr) -> tuple[int, str, str | None]:
        try:
            fields = req.fields
            identify = helpers.parse_identify(fields.get("Identify", ""))
        except P2PProtocolError as exc:
            self.violation(f"p2p-channel: {exc}")
            return 400, "Bad Request", None
        if not self.online:
            return 404, "Not Found", None
        dialect = self._dialect(req)
        if fields.get("version") != dialect.body_version:
            self.violation(f"p2p-channel: version {fields.get('version')!r}")
        for tag, value in dialect.channel_constants:
            if fields.get(tag) != value:
                self.violation(f"p2p-channel: <{tag}> {fields.get(tag)!r} != {value!r}")
        if "ClientId" in dialect.channel_tags:
            if not re.fullmatch(r"[0-9a-f]{32}:[0-9]{1,5}", fields.get("ClientId", "")):
                self.violation(f"p2p-channel: ClientId {fields.get('ClientId')!r}")
        padded = all(len(b) == 2 for b in fields.get("Identify", "").split())
        if dialect.identify_padded and not padded:
            self.violation(f"p2p-channel: Identify not zero-padded {fields.get('Identify')!r}")
        local_text = fields.get("LocalAddr", "")
        denied = self._check_auth(fields, local_text, "p2p-channel")
        if denied:
            return 403, denied, None
        if self.auth:
            if fields.get("IpEncrptV2") != "true":
                self.violation("p2p-channel: auth without <IpEncrptV2>true")
            key = helpers.device_key(self.auth[0], self.auth[1], self.randsalt)
            try:
                local_text = helpers.decrypt_local_addr(key, int(fields["Nonce"]), local_text)
            except P2PProtocolError:
                self.violation("p2p-channel: LocalAddr does not decrypt")
                return 400, "Bad Request", None
        elif fields.get("IpEncrpt") != "true":
            self.violation("p2p-channel: missing <IpEncrpt>true")
        try:
            client_local = parse_local_addr(local_text)
        except P2PProtocolError:
            self.violation(f"p2p-channel: bad LocalAddr {local_text!r}")
            return 400, "Bad Request", None
        if addr[0].startswith("127."):
            if client_local[-1] != addr:
                self.violation(f"p2p-channel: LocalAddr {client_local} is not the socket {addr}")
        elif any(a[0].startswith("127.") or a[0] == "0.0.0.0" for a in client_local):
            # PROTOCOLS 2.8: a device on the client's LAN could never reach that
            self.violation(f"p2p-channel: LocalAddr {local_text!r} from remote host {addr[0]}")
        channel = Channel(identify, addr, client_local, None)
        dev_pub = f"{self.device_pub[0]}:{self.device_pub[1]}"
        dev_lan = self._addr_text("lan")
        items: list[tuple[str, object]] = [("PubAddr", dev_pub)]
        if self.auth:
            channel.nonce = self.rng.randrange(2**31)
            key = helpers.device_key(self.auth[0], self.auth[1], self.randsalt)
            items.append(("LocalAddr", helpers.encrypt_local_addr(key, channel.nonce, dev_lan)))
            items.append(("Nonce", channel.nonce))
        else:
            items.append(("LocalAddr", dev_lan))
        items.append(("Policy", "p2p,udprelay"))
        items.append(("version", self.version))
        self.channels[addr] = channel
        if not self.relay_only:
            for dev in ("device", "lan"):
                for target in {addr, *client_local}:
                    self._device_binding_request(dev, target, channel)
        return 200, "OK", helpers.xml_body(items)

    def _relay_channel(self, req: helpers.Request, addr) -> tuple[int, str, str | None]:
        try:
            fields = req.fields
            agent = helpers.parse_host_port(fields.get("agentAddr", ""))
        except P2PProtocolError as exc:
            self.violation(f"relay-channel: {exc}")
            return 400, "Bad Request", None
        if agent != self.addr["agent"]:
            self.violation(f"relay-channel: agentAddr {agent} is not the agent")
        # the agent and the host (a symmetric NAT shows each server another port)
        entry = next(
            (
                e
                for e in reversed(self.relay_tokens.values())
                if e["client"][0] == addr[0] and e["started"] and not e.get("dead")
            ),
            None,
        )
        if entry is None:
            self.violation("relay-channel from a host that did not start a relay")
            return 400, "Bad Request", None
        denied = self._check_auth(fields, "", "relay-channel")
        if denied:
            return 403, denied, None
        if self.auth:
            device_nonces = {c.nonce for c in self.channels.values()}
            if int(fields["Nonce"]) not in device_nonces:
                self.violation("relay-channel: Nonce is not the device's reply nonce")
        if not self.online:
            return 404, "Not Found", None
        if not entry["channelled"]:  # a retransmitted relay-channel changes nothing
            entry["channelled"] = True
            cseq = self.rng.randrange(1, 1000)  # the agent's own count, not the client's
            nat_info = helpers.build_reply(200, "Server Nat Info!", cseq=cseq)
            target = entry["agent_client"]
            self.schedule(0.02, lambda: self._sendto(self.socks["agent"], target, nat_info))
        return 200, "OK", None

    # -- device: punch -------------------------------------------------------

    def _device_binding_request(self, dev: str, target, channel: Channel) -> None:
        tid = os.urandom(12)
        channel.device_tids.add(tid)
        msg = helpers.StunMessage(
            helpers.STUN_BINDING_REQUEST,
            os.urandom(4),
            tid,
            {helpers.ATTR_ICE_CONTROLLED: channel.identify, helpers.ATTR_ADDRESS: target},
        )
        self.device_send(self.socks[dev], target, msg.to_wire())

    def _punch(self, name: str, sock, data: bytes, addr) -> None:
        try:
            msg = helpers.parse_punch(data)
        except P2PProtocolError as exc:
            self.violation(f"device: unparsable non-PTCP datagram from {addr}: {exc}")
            return
        self.punched_addrs.add(self.addr[name])
        if self.relay_only:
            return
        channel = self.channels.get(addr) or self._channel_by_identify(msg)
        if channel is None:
            self.violation(f"device: punch from {addr} without a p2p-channel")
            return
        self.channels[addr] = channel  # a peer-reflexive address (another NAT port)
        if msg.msg_type == helpers.STUN_BINDING_REQUEST:
            if msg.attributes.get(helpers.ATTR_ICE_CONTROLLING) != channel.identify:
                self.violation("device: Binding Request without our Identify")
                return
            if msg.attributes.get(helpers.ATTR_ADDRESS) != self.device_pub:
                self.violation(f"device: Binding Request address {msg.attributes} != PubAddr")
            channel.client_tids.add(msg.transaction_id)
            reply = helpers.build_punch_response(
                channel.identify, addr, msg.cookie, msg.transaction_id
            )
            self.device_send(sock, addr, reply.to_wire())
        elif msg.msg_type == helpers.STUN_BINDING_SUCCESS:
            if msg.attributes.get(helpers.ATTR_ICE_CONTROLLED) != channel.identify:
                self.violation("device: Binding Success without our Identify")
                return
            if msg.attributes.get(helpers.ATTR_ADDRESS) != self.addr["lan"]:
                self.violation(f"device: Binding Success address {msg.attributes} != LocalAddr")
            if msg.transaction_id not in channel.device_tids | channel.client_tids:
                self.violation("device: Binding Success with an unknown transaction id")
                return
            if not channel.punched:
                channel.punched = True
                for _ in range(3):  # PROTOCOLS 2.3: a few more punch datagrams follow
                    self._device_binding_request(name, addr, channel)
        else:
            self.violation(f"device: punch of type {msg.msg_type:#x}")

    def _channel_by_identify(self, msg: helpers.StunMessage) -> Channel | None:
        attrs = msg.attributes
        identify = attrs.get(helpers.ATTR_ICE_CONTROLLING, attrs.get(helpers.ATTR_ICE_CONTROLLED))
        return next((c for c in self.channels.values() if c.identify == identify), None)

    # -- PTCP ----------------------------------------------------------------

    def _ptcp(self, name: str, sock, data: bytes, addr) -> None:
        if len(data) < PTCP_HEADER.size:
            self.violation(f"{name}: short PTCP datagram")
            return
        port = self.addr[name][1]
        session = self.sessions.get((port, addr))
        if session is None:
            if name == "agent":
                entry = next(
                    (e for e in self.relay_tokens.values() if e["agent_client"] == addr), None
                )
                if entry is None:
                    self.violation("agent: PTCP from a socket without a relay token")
                    return
                if entry.get("dead"):
                    return  # its device rebooted: the agent ignores the old client
            else:
                if self.relay_only:
                    return  # NAT: never reaches the device
                channel = self.channels.get(addr)
                if channel is None:
                    return  # unknown peer (for example after a reboot): ignore
                if not channel.punched:
                    self.violation("device: PTCP before the punch completed")
                    return
            session = PeerSession(self, sock, addr, "agent" if name == "agent" else "device")
            self.sessions[(port, addr)] = session
        session.receive(data)

    def sign_for(self, session: PeerSession) -> bytes:
        entry = next(
            (e for e in self.relay_tokens.values() if e["agent_client"] == session.addr), None
        )
        if entry is None:
            self.violation("agent: sign request without a relay token")
            return bytes(8)
        if entry["sign"] is None:
            entry["sign"] = os.urandom(8)
        return entry["sign"]

    def sign_ok(self, session: PeerSession, sign: bytes) -> bool:
        """Whether ``sign`` is one the relay agent issued (to this client, on the agent)."""
        if session.role == "agent":
            return sign == self.sign_for(session)
        return any(e["sign"] == sign for e in self.relay_tokens.values() if e["sign"])


#: The main servers' socket names and the app whose dialect each speaks.
MAIN_SERVERS = {"main": "smartpss", "dmss": "dmss"}

#: Running emulators by their SmartPSS port (tests/_p2p_support.py's dh_p2p_argv
#: passes both main servers of the emulator behind a port).
RUNNING: dict[int, Emulator] = {}


def parse_local_addr(text: str) -> list[tuple[str, int]]:
    """LocalAddr as a list of addresses: ``ip,ip,...,ip:port`` shares the one port
    (PROTOCOLS 2.7 (c)); raises P2PProtocolError."""
    *others, last = text.split(",")
    host, port = helpers.parse_host_port(last)
    return [(ip.strip(), port) for ip in others if ip.strip()] + [(host, port)]


def parse_port_map(items: list[str]) -> dict[int, tuple[str, int]]:
    """``PORT=HOST:PORT`` items -> {device port: where its service really is}."""
    port_map = {}
    for item in items:
        port, _, target = item.partition("=")
        host, _, tport = target.rpartition(":")
        port_map[int(port)] = (host, int(tport))
    return port_map


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serial", default="EMU0123456789")
    parser.add_argument("--map", action="append", default=[], help="PORT=HOST:PORT")
    parser.add_argument("--auth", help="USER:PASSWORD the device wants")
    parser.add_argument("--relay-only", action="store_true")
    parser.add_argument(
        "--app", choices=sorted(helpers.APP_PROFILES), default="smartpss", help="bound to"
    )
    parser.add_argument(
        "--fw2024", action="store_true", help="firmware 6.x: no sign exchange wanted"
    )
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    port_map = parse_port_map(args.map)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    emu = Emulator(
        args.serial,
        port_map=port_map,
        auth=auth,
        relay_only=args.relay_only,
        loss=args.loss,
        app=args.app,
        fw2024=args.fw2024,
    ).start()
    print(
        f"cloud 127.0.0.1:{emu.cloud_port} serial {args.serial} "
        f"(bound to {args.app}; --cloud smartpss=127.0.0.1:{emu.cloud_port} "
        f"--cloud dmss=127.0.0.1:{emu.dmss_port})",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    emu.close()
    for v in emu.violations:
        print("violation:", v)
    return 1 if emu.violations else 0


if __name__ == "__main__":
    sys.exit(main())
