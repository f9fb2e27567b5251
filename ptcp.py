#!/usr/bin/env python3
"""PTCP: the reliable-stream-over-UDP transport of Dahua P2P tunnels (PROTOCOLS 2.5).

Three layers, usable separately:

* codec: :func:`encode_packet` / :func:`decode_packet` and the body dataclasses;
* :class:`Session`: a sans-IO protocol engine.  Feed it datagrams and the current
  time, collect datagrams to send and events.  It adds what no public
  implementation has: in-order delivery by the ``sent`` offset, duplicate
  suppression, retransmission with an RTT-derived timeout, and a bounded window;
* :class:`PTCPTunnel`: a threaded driver that bridges local TCP sockets to realms
  over one UDP socket.

The CLI runs either end of a bare PTCP tunnel (no cloud handshake):
``ptcp.py serve`` plays the device (binds become TCP connections to mapped local
services), ``ptcp.py connect`` plays the client (local TCP ports forwarded to
remote ports).
"""

from __future__ import annotations

import argparse
import collections
import errno
import functools
import logging
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import helpers
from helpers import EPILOG, ExitCode

log = logging.getLogger("ptcp")

__all__ = [
    "PTCPError",
    "Packet",
    "Syn",
    "Data",
    "Bind",
    "Status",
    "Heartbeat",
    "Command",
    "ResendRequest",
    "encode_body",
    "decode_body",
    "encode_packet",
    "decode_packet",
    "Session",
    "SynReceived",
    "CommandReceived",
    "BindRequested",
    "RealmConnected",
    "RealmClosed",
    "DataReceived",
    "HeartbeatReceived",
    "PeerDead",
    "PTCPTunnel",
    "SessionStats",
    "TunnelStats",
    "TunnelHealth",
    "TunnelUnavailable",
    "DEFAULT_MAX_DATA",
    "main",
]

# ---------------------------------------------------------------------------
# Wire format (PROTOCOLS 2.5)
# ---------------------------------------------------------------------------

MAGIC = b"PTCP"
HEADER = struct.Struct(">4sIIIII")  # magic, sent, recv, pid, lmid, rmid
HEADER_LEN = HEADER.size  # 24
_TYPELEN = struct.Struct(">I")  # body type (high byte) + 24-bit length
_REALM_HEAD = struct.Struct(">III")  # type/len, realm, zero
REALM_HEAD_LEN = _REALM_HEAD.size  # 12: where a realm-scoped body's own bytes start
_DATA_HEAD = struct.Struct(">4sIIIIIIII")  # header + type/len, realm, zero of a data body
_RUN_PACKETS = 64  # data packets joined into one DataReceived (< 128 KiB: no mmap per join)
_BIND_TAIL = struct.Struct(">I4s")  # port, IPv4
MASK32 = 0xFFFFFFFF
HALF32 = 0x80000000

SYN_BODY = b"\x00\x03\x01\x00"
SYN_PID = 0x0002FFFF
T_SYN = 0x00  # the SYN body 00 03 01 00 reads as type 0x00
T_DATA = 0x10
T_BIND = 0x11
T_STATUS = 0x12
T_HEARTBEAT = 0x13
T_RESEND = 0x0A  # PROTOCOLS 2.5, 2.7 (b): the device's retransmission request, out of band
RESEND_EVERY = 0.1  # answer 0x0a requests at most this often, seconds
# Command bodies of the sign exchange (PROTOCOLS 2.2 steps 9-10)
T_SIGN_REQUEST = 0x17  # client to relay agent: ask for a sign
T_SIGN_GRANT = 0x18  # agent's answer: the sign from body offset 12
T_SIGN_PRESENT = 0x19  # client to its peer: the sign
T_SIGN_ACCEPT = 0x1A  # peer: sign accepted
T_SIGN_CONFIRM = 0x1B  # client: exchange finished (the peer acknowledges it)
_CONN = b"CONN"
_DISC = b"DISC"
HEARTBEAT_BODY = b"\x13" + bytes(11)
DEFAULT_MAX_DATA = 1280  # PROTOCOLS 2.5: the official app's chunk size
BIND_LENGTH = 8  # PROTOCOLS 2.7 (a): the app's BIND has 8 in its length field (older tools: 0)
IDS_CAPTURE, IDS_COUNTER = "capture", "counter"  # how pid and lmid are made (PROTOCOLS 2.5)
LMID_START = 60_000  # capture-style lmid: ms since the session began, plus this
LMID_MASK = 0x7FFFFFFF  # PROTOCOLS 2.7 (a): a device stops consuming once lmid >= 2^31
PID_BAND = 4096  # capture-style pid stays within this many bytes below 0xFFFF
ACK_EVERY = 2  # PROTOCOLS 2.7 (b): the app answers about every second data packet...
ACK_DELAY = 0.02  # ...and [G] answers a lone one after 20 ms
MAX_ACK_EVERY = 3  # three full data bodies still keep the capture-style pid within PID_BAND
MAX_WINDOW = 1 << 30  # the largest send window or queue the command line takes


class PTCPError(Exception):
    """Malformed PTCP input, or an operation the protocol state does not allow."""


class TunnelUnavailable(PTCPError):
    """This tunnel takes no new realm (full, retired or closed); the local client
    was left untouched, so another tunnel may serve it."""


@dataclass(frozen=True, slots=True)
class Syn:
    """``00 03 01 00``: opens a PTCP session."""


@dataclass(frozen=True, slots=True)
class Data:
    """0x10: bytes of a realm's TCP stream."""

    realm: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Bind:
    """0x11: ask the device to open a TCP connection to ``ip:port`` as ``realm``.

    ``length_field`` is what the body's 24-bit length field says: 8 in a capture
    of the official app, 0 in the older public tools (PROTOCOLS 2.7 (a), (f) 4).
    """

    realm: int
    port: int
    ip: str = "127.0.0.1"
    length_field: int = BIND_LENGTH


@dataclass(frozen=True, slots=True)
class Status:
    """0x12: ``CONN`` (bind succeeded) or ``DISC`` (realm closed / refused)."""

    realm: int
    connected: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """0x13: keep-alive."""


@dataclass(frozen=True, slots=True)
class Command:
    """Any other body type (0x17-0x1b sign exchange of PROTOCOLS 2.2, unknown ones).

    ``params`` are body bytes 1..11 (zero in every known sender), ``payload`` the
    bytes from offset 12 (the "sign" of 0x19/0x1a).
    """

    type: int
    payload: bytes = b""
    params: bytes = bytes(11)


@dataclass(frozen=True, slots=True)
class ResendRequest:
    """0x0a: the device asks for what we sent after a hole in our stream.

    Out of band: it is not counted in the sender's offsets.  Its field layout is
    not settled (PROTOCOLS 2.7 (b)), so ``fields`` keeps the bytes after the
    type byte as they came.
    """

    fields: bytes = b""


Body = Syn | Data | Bind | Status | Heartbeat | Command | ResendRequest


@dataclass(frozen=True, slots=True)
class Packet:
    """One PTCP datagram; ``body`` None is an empty packet (a pure acknowledgement)."""

    sent: int
    recv: int
    pid: int
    lmid: int
    rmid: int
    body: Body | None = None


def _u32(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= MASK32:
        raise PTCPError(f"{what} must be a 32-bit unsigned integer, got {value!r}")
    return value


def _ip_bytes(ip: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET, ip)
    except (OSError, TypeError) as exc:
        raise PTCPError(f"bind address must be IPv4, got {ip!r}") from exc


# The body codec: one row per body type, (class, pack, unpack), as a table.  Both
# directions of the Session use it; only in-order data and pure acks take short cuts
# in Session._receive.


def _pack_data(body: Data) -> bytes:
    data = bytes(body.data)
    if len(data) > 0xFFFFFF:
        raise PTCPError("data body longer than the 24-bit length field")
    return _REALM_HEAD.pack((T_DATA << 24) | len(data), _u32(body.realm, "realm"), 0) + data


def _unpack_data(raw: memoryview) -> Data:
    if len(raw) < REALM_HEAD_LEN:
        raise PTCPError("data body shorter than 12 bytes")
    typelen, realm, _zero = _REALM_HEAD.unpack_from(raw)
    if typelen & 0xFFFFFF != len(raw) - REALM_HEAD_LEN:
        raise PTCPError(
            f"data length field {typelen & 0xFFFFFF} but {len(raw) - REALM_HEAD_LEN} data bytes"
        )
    return Data(realm, bytes(raw[REALM_HEAD_LEN:]))


def _pack_bind(body: Bind) -> bytes:
    if not 0 <= body.length_field <= 0xFFFFFF:
        raise PTCPError("bind length field must fit 24 bits")
    head = _REALM_HEAD.pack((T_BIND << 24) | body.length_field, _u32(body.realm, "realm"), 0)
    return head + _BIND_TAIL.pack(_u32(body.port, "port"), _ip_bytes(body.ip))


def _unpack_bind(raw: memoryview) -> Bind:
    if len(raw) != REALM_HEAD_LEN + _BIND_TAIL.size:
        raise PTCPError(f"bind body of {len(raw)} bytes, expected 20")
    typelen, realm, _zero = _REALM_HEAD.unpack_from(raw)
    port, ip = _BIND_TAIL.unpack_from(raw, REALM_HEAD_LEN)
    return Bind(realm, port, socket.inet_ntop(socket.AF_INET, ip), typelen & 0xFFFFFF)


def _pack_status(body: Status) -> bytes:
    head = _REALM_HEAD.pack(T_STATUS << 24, _u32(body.realm, "realm"), 0)
    return head + (_CONN if body.connected else _DISC)


def _unpack_status(raw: memoryview) -> Status:
    if len(raw) != REALM_HEAD_LEN + 4:
        raise PTCPError(f"status body of {len(raw)} bytes, expected 16")
    word = bytes(raw[REALM_HEAD_LEN:])
    if word not in (_CONN, _DISC):
        raise PTCPError(f"status word {word!r} is neither CONN nor DISC")
    return Status(_REALM_HEAD.unpack_from(raw)[1], word == _CONN)


def _unpack_heartbeat(raw: memoryview) -> Heartbeat:
    if len(raw) != len(HEARTBEAT_BODY):
        raise PTCPError(f"heartbeat body of {len(raw)} bytes, expected 12")
    return Heartbeat()


def _pack_command(body: Command) -> bytes:
    if not 0 <= body.type <= 0xFF or (body.type in _BODY_TYPES and body.type != T_SYN):
        raise PTCPError(f"command type {body.type!r} is not an opaque command type")
    if len(body.params) != 11:
        raise PTCPError("command params must be 11 bytes")
    return bytes((body.type,)) + bytes(body.params) + bytes(body.payload)


def _unpack_command(raw: memoryview) -> Command:
    if len(raw) < 12:
        raise PTCPError(f"command body 0x{raw[0]:02x} of {len(raw)} bytes is shorter than 12")
    return Command(raw[0], bytes(raw[12:]), bytes(raw[1:12]))


def _unpack_syn(raw: memoryview) -> Syn | Command:
    if bytes(raw) == SYN_BODY:
        return Syn()
    return _unpack_command(raw)  # type 0x00 but not the SYN: an opaque command


@dataclass(frozen=True, slots=True)
class _BodyCodec:
    cls: type
    pack: Callable[[Any], bytes]
    unpack: Callable[[memoryview], Body]


_BODY_TYPES: dict[int, _BodyCodec] = {
    T_SYN: _BodyCodec(Syn, lambda _body: SYN_BODY, _unpack_syn),
    T_DATA: _BodyCodec(Data, _pack_data, _unpack_data),
    T_BIND: _BodyCodec(Bind, _pack_bind, _unpack_bind),
    T_STATUS: _BodyCodec(Status, _pack_status, _unpack_status),
    T_HEARTBEAT: _BodyCodec(Heartbeat, lambda _body: HEARTBEAT_BODY, _unpack_heartbeat),
    # any length and layout (PROTOCOLS 2.7 (b)); even a bare type byte
    T_RESEND: _BodyCodec(
        ResendRequest,
        lambda body: bytes((T_RESEND,)) + bytes(body.fields),
        lambda raw: ResendRequest(bytes(raw[1:])),
    ),
}
_COMMANDS = _BodyCodec(Command, _pack_command, _unpack_command)  # every other type
_BY_CLASS = {codec.cls: codec for codec in (*_BODY_TYPES.values(), _COMMANDS)}


def encode_body(body: Body | None) -> bytes:
    """Encode one body (b"" for None)."""
    if body is None:
        return b""
    codec = _BY_CLASS.get(type(body))
    if codec is None:
        raise PTCPError(f"not a PTCP body: {body!r}")
    return codec.pack(body)


def decode_body(raw: bytes | memoryview) -> Body | None:
    """Decode one body; b"" is None (acknowledgement).  Raises PTCPError."""
    if not raw:
        return None
    raw = memoryview(raw)
    codec = _BODY_TYPES.get(raw[0], _COMMANDS)
    if codec is not _BODY_TYPES[T_RESEND] and len(raw) < 4:
        raise PTCPError(f"body of {len(raw)} bytes is shorter than its 4-byte type field")
    return codec.unpack(raw)


def encode_packet(packet: Packet) -> bytes:
    """Encode header and body."""
    head = HEADER.pack(
        MAGIC,
        _u32(packet.sent, "sent"),
        _u32(packet.recv, "recv"),
        _u32(packet.pid, "pid"),
        _u32(packet.lmid, "lmid"),
        _u32(packet.rmid, "rmid"),
    )
    return head + encode_body(packet.body)


def decode_packet(data: bytes | memoryview) -> Packet:
    """Decode one datagram.  Raises PTCPError for anything that is not a valid PTCP packet."""
    if len(data) < HEADER_LEN:
        raise PTCPError(f"datagram of {len(data)} bytes is shorter than the PTCP header")
    magic, sent, recv, pid, lmid, rmid = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PTCPError("bad magic, not a PTCP packet")
    return Packet(sent, recv, pid, lmid, rmid, decode_body(memoryview(data)[HEADER_LEN:]))


def seq_lt(a: int, b: int) -> bool:
    """Serial-number comparison a < b modulo 2^32."""
    return a != b and ((b - a) & MASK32) < HALF32


# ---------------------------------------------------------------------------
# Session state (sans-IO)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynReceived:
    """The peer sent a SYN."""


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """The peer sent an opaque command body (0x17-0x1b, ...)."""

    body_type: int
    payload: bytes
    params: bytes = bytes(11)


@dataclass(frozen=True, slots=True)
class BindRequested:
    """Device side: the peer asks for a TCP connection; answer with accept() or refuse()."""

    realm: int
    port: int
    ip: str


@dataclass(frozen=True, slots=True)
class RealmConnected:
    """Client side: the peer answered our bind with CONN."""

    realm: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """In-order stream bytes for a realm."""

    realm: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RealmClosed:
    """A realm is gone.  reason: refused, peer, local, timeout, or retired (its
    bind never went out: an earlier one was left unanswered, PROTOCOLS 2.7 (b))."""

    realm: int
    reason: str


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """The peer sent a heartbeat."""


@dataclass(frozen=True, slots=True)
class PeerDead:
    """The session is finished: nothing heard from the peer for ``silence`` seconds
    (``reason`` "silence"), or, with realms open, the peer acknowledged none of our
    unacknowledged bytes for ``stall_after`` seconds (``reason`` "stall")."""

    silence: float
    reason: str = "silence"


Event = (
    SynReceived
    | CommandReceived
    | BindRequested
    | RealmConnected
    | DataReceived
    | RealmClosed
    | HeartbeatReceived
    | PeerDead
)

# realm states
OPENING, OPEN, CLOSING, PENDING = "opening", "open", "closing", "pending"


class _Seg:
    """One non-empty packet in the send stream: [offset, offset + size).

    ``body`` is the whole body, or for realm data (``realm`` not None) only the
    data bytes: the 12-byte body head is packed with the header on each send.
    """

    __slots__ = ("offset", "body", "size", "end", "syn", "realm")

    def __init__(
        self, offset: int, body: bytes | memoryview, syn: bool, realm: int | None = None
    ) -> None:
        self.offset = offset
        self.body = body
        self.size = len(body) if realm is None else len(body) + REALM_HEAD_LEN
        self.end = (offset + self.size) & MASK32
        self.syn = syn
        self.realm = realm


@dataclass
class SessionStats:
    """Counters kept by a Session (for logs and benchmarks)."""

    packets_in: int = 0
    packets_out: int = 0
    retransmits: int = 0
    timeouts: int = 0
    fast_retransmits: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    dropped_ahead: int = 0
    ignored: int = 0
    ack_beyond: int = 0  # packets dropped for acknowledging bytes never sent
    out_of_window: int = 0  # packets dropped for a ``sent`` far outside the receive window
    resend_requests: int = 0  # 0x0a bodies received
    resend_answers: int = 0  # of those, the ones answered by resending what is unacked


class Session:
    """Sans-IO PTCP endpoint (either role).

    Every method that may produce output takes ``now`` (a monotonic time in
    seconds); collect the output with :meth:`datagrams_to_send` and
    :meth:`events`, and call :meth:`handle_timers` at :meth:`next_deadline`.

    Every non-empty body (SYN, bind, status, heartbeat, command, data) is one
    stretch ``[sent, sent + len(body))`` of a byte stream per direction: the
    receiver delivers in offset order, holds early packets (at most
    ``max_out_of_order`` packets, ``max_ahead`` bytes ahead) and acknowledges
    contiguous bytes only; the sender keeps unacknowledged bodies (at most
    ``window_bytes``, that is what :meth:`send` accepts), limits what is in
    flight with a NewReno congestion window, and retransmits after an RFC 6298
    timeout (``min_rto``..``max_rto``) or three duplicate acks.  ``initial_*``
    let the counters start anywhere; they wrap modulo 2^32.  ``rng`` draws realm
    ids.  ``open_timeout`` bounds the wait for CONN (and for the DISC answer).

    Binds (PROTOCOLS 2.7 (b)): one BIND is on the wire at a time, the others
    wait their turn; ``bind_timeout`` shortens the wait for CONN, and a BIND left
    unanswered that long *retires* the session: its realms go on, it opens no
    new one, and the binds still waiting end with ``RealmClosed(reason="retired")``.
    ``max_realms`` bounds the realms alive at once.  :attr:`can_open` tells.

    Acknowledgements (PROTOCOLS 2.5, 2.7 (b)): in-order data packets are
    answered every ``ack_every`` packets (2 by default, as the official app does:
    one ack per 1.88 packets in its capture), and at the latest ``ack_delay``
    seconds after the first one left unanswered; ``ack_every=1`` answers each
    one, as the older public tools do.  Any other body, a packet out of order and
    a duplicate are answered at once, so the sender's duplicate-ack detection
    keeps working; a packet going out carries the acknowledgement too.
    ``delayed_ack=True`` (an extension for peers known to cope, e.g. two
    instances of this module) answers in-order data with one acknowledgement per
    :meth:`datagrams_to_send` call instead.
    """

    def __init__(
        self,
        *,
        now: float,
        heartbeat_interval: float | None = 5.0,
        dead_after: float = 60.0,
        stall_after: float | None = 20.0,
        max_data: int = DEFAULT_MAX_DATA,
        window_bytes: int = 1 << 20,
        max_ahead: int = 8 << 20,
        max_out_of_order: int = 4096,
        open_timeout: float = 10.0,
        min_rto: float = 0.2,
        max_rto: float = 10.0,
        initial_rto: float = 1.0,
        initial_sent: int = 0,
        initial_recv: int = 0,
        initial_lmid: int = 0,
        ids: str = IDS_CAPTURE,
        bind_length: int = BIND_LENGTH,
        ack_every: int = ACK_EVERY,
        ack_delay: float = ACK_DELAY,
        delayed_ack: bool = False,
        max_realms: int | None = None,
        bind_timeout: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= max_data <= 0xFFFFFF:
            raise ValueError("max_data out of range")
        if window_bytes < max_data + REALM_HEAD_LEN:
            raise ValueError("window_bytes must hold at least one data body")
        if not 1 <= ack_every <= MAX_ACK_EVERY:
            raise ValueError(f"ack_every must be 1 to {MAX_ACK_EVERY}")
        if ids not in (IDS_CAPTURE, IDS_COUNTER):
            raise ValueError(f"ids must be {IDS_CAPTURE!r} or {IDS_COUNTER!r}, not {ids!r}")
        self.ids = ids
        self.bind_length = bind_length
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.stall_after = stall_after
        self.max_data = max_data
        self.window_bytes = window_bytes
        self.max_ahead = max_ahead
        self.max_out_of_order = max_out_of_order
        self.open_timeout = open_timeout
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.delayed_ack = delayed_ack
        self.ack_every = ack_every
        self.ack_delay = ack_delay
        self._ack_owed = False  # delayed_ack: one acknowledgement at datagrams_to_send()
        self._unanswered = 0  # in-order data packets received since we last sent
        self._ack_deadline: float | None = None  # answer them by then
        self.stats = SessionStats()
        self._rng = rng or random.SystemRandom()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        # send side
        self._next_off = initial_sent & MASK32  # offset of the next segment created
        self._tx_nxt = self._next_off  # end of the last transmitted segment
        self._snd_una = self._next_off
        self._inflight: collections.deque[_Seg] = collections.deque()
        self._pending: collections.deque[_Seg] = collections.deque()
        self._inflight_bytes = 0
        self._buffered = 0  # bytes in inflight + pending
        self._count = 0  # non-empty non-SYN packets transmitted (counter-style pid)
        self._rx_bytes = 0  # body bytes received since our last transmission (capture pid)
        self._resent_at = -RESEND_EVERY  # when we last answered a 0x0a
        self._echo = 0  # the peer's latest rmid: our lmid it last answered
        self._peer_clock0: tuple[int, float] | None = None  # its first lmid, and when
        self._clock = ids == IDS_CAPTURE
        self._t0 = now
        self._ticked = now - 1.0  # when _tick last ran
        self._lmid = initial_lmid & MASK32
        if self._clock:
            self._lmid = (initial_lmid or LMID_START) & LMID_MASK
            self._lmid0 = self._lmid
        # receive side
        self._rcv_nxt = initial_recv & MASK32
        self._rmid = 0
        self._seen_peer = False
        self._ooo: dict[int, tuple[int, Body | DataReceived]] = {}
        # timing / congestion (RFC 6298 + NewReno, counted in body bytes)
        self._mss = max_data + REALM_HEAD_LEN
        self._cwnd = min(10 * self._mss, window_bytes)
        self._ssthresh = window_bytes
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = initial_rto
        self._rto_deadline: float | None = None
        self._backed_off = False
        self._timed_end: int | None = None  # end offset of the packet being timed
        self._timed_at = 0.0
        self._dupacks = 0
        self._recover: int | None = None  # recovery point while recovering
        self._last_rx = now
        self._stall_since: float | None = None  # unacked bytes have not moved since
        self._next_heartbeat = now + heartbeat_interval if heartbeat_interval else None
        self._dead = False
        # realms
        self.max_realms = max_realms
        self.bind_timeout = bind_timeout
        self.retired = False  # a bind went unanswered: no new realm (PROTOCOLS 2.7 (b))
        self._bind_out: int | None = None  # the realm whose BIND is on the wire
        self._binds_waiting: collections.deque[tuple[int, bytes, float]] = collections.deque()
        self._realms: dict[int, str] = {}
        self._realm_deadline: dict[int, float] = {}
        self._recently_closed: collections.OrderedDict[int, None] = collections.OrderedDict()

    # -- public state -----------------------------------------------------

    @property
    def sent(self) -> int:
        """Offset of the next body byte this side will create (header ``sent``)."""
        return self._next_off

    @property
    def recv(self) -> int:
        """Next expected peer body offset (header ``recv``)."""
        return self._rcv_nxt

    @property
    def lmid(self) -> int:
        """lmid the next transmitted packet will carry."""
        return self._lmid

    @property
    def rmid(self) -> int:
        """Highest lmid received from the peer."""
        return self._rmid

    @property
    def pid(self) -> int:
        """pid the next non-SYN packet will carry."""
        if self._clock:
            return 0xFFFF - min(self._rx_bytes, PID_BAND)
        return (0xFFFF - self._count) & 0xFFFF

    def health(self, now: float, realms: int | None = None) -> TunnelHealth:
        """Counters for logs and metrics (see :class:`TunnelHealth`)."""
        skew = 0
        if self._peer_clock0 is not None and self._clock:
            lmid0, t0 = self._peer_clock0
            skew = ((self._rmid - lmid0) & MASK32) - round((self._last_rx - t0) * 1000)
        return TunnelHealth(
            sent=self._tx_nxt,
            peer_recv=self._snd_una,
            unacked=self.unacked_bytes,
            lmid_lag_ms=(self._lmid - self._echo) & LMID_MASK if self._echo else 0,
            inbound_skew_ms=skew,
            retransmits=self.stats.retransmits,
            resend_requests=self.stats.resend_requests,
            realms=len(self._realms) if realms is None else realms,
        )

    def _tick(self, now: float) -> None:
        """Capture-style lmid (PROTOCOLS 2.7 (a)): a millisecond clock in 10 ms steps,
        so packets of one tick share it; it starts well above 0 (0 is the "nothing
        received" rmid) and stays below 2^31."""
        self._ticked = now
        ms = int((now - self._t0) * 100) * 10
        self._lmid = (self._lmid0 + ms) & LMID_MASK

    @property
    def dead(self) -> bool:
        """True once PeerDead was emitted."""
        return self._dead

    @property
    def unacked_bytes(self) -> int:
        """Body bytes created but not yet acknowledged by the peer."""
        return self._buffered

    @property
    def send_space(self) -> int:
        """How many more stream bytes the send window accepts now."""
        return max(0, self.window_bytes - self._buffered)

    @property
    def rto(self) -> float:
        """Current retransmission timeout."""
        return self._rto

    @property
    def srtt(self) -> float | None:
        """Smoothed round trip, None before the first sample."""
        return self._srtt

    def realm_state(self, realm: int) -> str | None:
        """opening / open / closing / pending, or None when the realm is not live."""
        return self._realms.get(realm)

    @property
    def realms(self) -> dict[int, str]:
        """Live realms and their states (a copy)."""
        return dict(self._realms)

    # -- output -----------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        """Datagrams produced since the last call, in lmid order."""
        if self._ack_owed:
            self._ack()
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        """Events produced since the last call."""
        ev, self._events = self._events, []
        return ev

    # -- sending ----------------------------------------------------------

    def _queue(self, body: bytes, now: float, syn: bool = False) -> None:
        seg = _Seg(self._next_off, body, syn)
        self._next_off = seg.end
        self._buffered += len(body)
        self._pending.append(seg)
        self._push(now)

    def _transmit(self, seg: _Seg, now: float) -> None:
        if self._clock:
            if now != self._ticked:
                self._tick(now)
            # PROTOCOLS 2.7 (a): 0xFFFF less the body bytes received since we last sent
            rx = self._rx_bytes
            pid = SYN_PID if seg.syn else 0xFFFF - (rx if rx < PID_BAND else PID_BAND)
        elif seg.syn:
            pid = SYN_PID
        else:
            pid = (0xFFFF - self._count) & 0xFFFF
            self._count += 1
        self._rx_bytes = 0
        if seg.realm is None:
            head = HEADER.pack(MAGIC, seg.offset, self._rcv_nxt, pid, self._lmid, self._rmid)
        else:
            head = _DATA_HEAD.pack(
                MAGIC, seg.offset, self._rcv_nxt, pid, self._lmid, self._rmid,
                (T_DATA << 24) | len(seg.body), seg.realm, 0,
            )  # fmt: skip
        self._out.append(head + seg.body)
        if not self._clock:
            self._lmid = (self._lmid + 1) & MASK32
        self._ack_owed = False  # this packet carries the acknowledgement too
        self._unanswered = 0
        self._ack_deadline = None
        self.stats.packets_out += 1

    def _ack(self) -> None:
        if self._clock:
            rx = self._rx_bytes
            pid = 0xFFFF - (rx if rx < PID_BAND else PID_BAND)
        else:
            pid = (0xFFFF - self._count) & 0xFFFF
        self._rx_bytes = 0
        self._out.append(
            HEADER.pack(MAGIC, self._tx_nxt, self._rcv_nxt, pid, self._lmid, self._rmid)
        )
        self._ack_owed = False
        self._unanswered = 0
        self._ack_deadline = None
        if not self._clock:
            self._lmid = (self._lmid + 1) & MASK32
        self.stats.packets_out += 1

    def _ack_in_order(self, now: float) -> None:
        """An in-order data packet arrived: answer it now, or with a later one."""
        if self.delayed_ack:
            self._ack_owed = True
            return
        self._unanswered += 1
        if self._unanswered >= self.ack_every:
            self._ack()
        elif self._ack_deadline is None:
            self._ack_deadline = now + self.ack_delay

    def _push(self, now: float) -> None:
        """Move pending segments into flight while the congestion window allows."""
        pending = self._pending
        while pending and (
            not self._inflight or self._inflight_bytes + pending[0].size <= self._cwnd
        ):
            self._send_new(pending.popleft(), now)

    def _send_new(self, seg: _Seg, now: float) -> None:
        self._transmit(seg, now)
        self._inflight.append(seg)
        self._inflight_bytes += seg.size
        self._tx_nxt = seg.end
        if self._timed_end is None:  # time one packet per round trip (RFC 6298)
            self._timed_end = seg.end
            self._timed_at = now
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto
        if self._stall_since is None:
            self._stall_since = now

    def send_syn(self, now: float) -> None:
        """Queue a SYN (it occupies 4 bytes of the stream, PROTOCOLS 2.5)."""
        self._queue(SYN_BODY, now, syn=True)

    def send_command(
        self, body_type: int, payload: bytes, now: float, params: bytes = bytes(11)
    ) -> None:
        """Queue an opaque command body (0x17/0x19/0x1b of the sign exchange)."""
        self._queue(encode_body(Command(body_type, bytes(payload), params)), now)

    def send_heartbeat(self, now: float) -> None:
        """Queue a heartbeat now (also sent automatically every heartbeat_interval)."""
        self._queue(HEARTBEAT_BODY, now)
        if self.heartbeat_interval:
            self._next_heartbeat = now + self.heartbeat_interval

    def _new_realm(self) -> int:
        while True:
            realm = self._rng.getrandbits(32)
            if realm and realm not in self._realms and realm not in self._recently_closed:
                return realm

    @property
    def can_open(self) -> bool:
        """Whether :meth:`open_realm` takes a new realm now (alive, not retired, not full)."""
        return not (
            self._dead
            or self.retired
            or (self.max_realms is not None and len(self._realms) >= self.max_realms)
        )

    def open_realm(
        self, port: int, now: float, ip: str = "127.0.0.1", timeout: float | None = None
    ) -> int:
        """Client side: bind a fresh realm to the peer's ``ip:port``; wait for
        RealmConnected (or RealmClosed).  The BIND goes out once no other is
        outstanding.  Raises TunnelUnavailable when :attr:`can_open` is false."""
        encode_body(Bind(0, port, ip, self.bind_length))  # validates before any state changes
        if not self.can_open:
            why = "dead" if self._dead else "retired" if self.retired else "full"
            raise TunnelUnavailable(f"the session is {why}")
        wait = self.open_timeout if timeout is None else timeout
        if self.bind_timeout is not None:
            wait = min(wait, self.bind_timeout)
        realm = self._new_realm()
        self._realms[realm] = OPENING
        body = encode_body(Bind(realm, port, ip, self.bind_length))
        if self._bind_out is None:
            self._send_bind(realm, body, wait, now)
        else:
            self._binds_waiting.append((realm, body, wait))
        return realm

    def _send_bind(self, realm: int, body: bytes, wait: float, now: float) -> None:
        self._bind_out = realm
        self._realm_deadline[realm] = now + wait
        self._queue(body, now)

    def _bind_over(self, realm: int, now: float) -> None:
        """``realm``'s BIND was answered (or given up): the next waiting one may go."""
        if realm != self._bind_out:
            return
        self._bind_out = None
        while self._binds_waiting and not self._dead and not self.retired:
            waiting, body, wait = self._binds_waiting.popleft()
            if self._realms.get(waiting) == OPENING:  # not closed meanwhile
                self._send_bind(waiting, body, wait, now)
                return

    def _retire(self) -> None:
        """A BIND went unanswered for bind_timeout (PROTOCOLS 2.7 (b)): the peer
        grants no more on this session; the binds still waiting end here."""
        self.retired = True
        while self._binds_waiting:
            realm, _body, _wait = self._binds_waiting.popleft()
            if self._realms.get(realm) == OPENING:
                self._forget(realm)
                self._events.append(RealmClosed(realm, "retired"))

    def accept(self, realm: int, now: float) -> None:
        """Device side: answer a BindRequested with CONN."""
        if self._realms.get(realm) != PENDING:
            raise PTCPError(f"realm {realm:#x} has no pending bind")
        self._realms[realm] = OPEN
        self._realm_deadline.pop(realm, None)
        self._queue(encode_body(Status(realm, True)), now)

    def refuse(self, realm: int, now: float) -> None:
        """Device side: answer a BindRequested with DISC."""
        if self._realms.get(realm) != PENDING:
            raise PTCPError(f"realm {realm:#x} has no pending bind")
        self._forget(realm)
        self._queue(encode_body(Status(realm, False)), now)

    def send(self, realm: int, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue realm bytes in bodies of at most max_data; returns how many the window took."""
        if self._realms.get(realm) != OPEN or self._dead:
            raise PTCPError(f"realm {realm:#x} is not open")
        step = self.max_data
        take = min(len(data), self.window_bytes - self._buffered)
        if take <= 0 or (take < step and take < len(data)):
            return 0  # wait for room for a full body rather than send slivers
        view = memoryview(data)[:take]
        if type(view.obj) is not bytes:  # segments keep views until acknowledged:
            view = memoryview(bytes(view))  # only immutable bytes may be shared
        segs = self._pending
        off = self._next_off
        pos = 0
        while pos < take:
            seg = _Seg(off, view[pos : pos + step], False, realm)
            off = seg.end
            segs.append(seg)
            pos += step
        self._next_off = off
        self._buffered += take + REALM_HEAD_LEN * ((take + step - 1) // step)
        self._push(now)
        return take

    def close_realm(self, realm: int, now: float) -> None:
        """Send DISC for a live realm (no-op for an unknown or already closing one)."""
        state = self._realms.get(realm)
        if state is None or state == CLOSING:
            return
        if state == PENDING:
            self.refuse(realm, now)
            return
        if state == OPENING and realm != self._bind_out:  # its BIND never went out
            self._binds_waiting = collections.deque(
                b for b in self._binds_waiting if b[0] != realm
            )
            self._forget(realm)
            self._events.append(RealmClosed(realm, "local"))
            return
        self._bind_over(realm, now)
        self._realms[realm] = CLOSING
        self._realm_deadline[realm] = now + self.open_timeout
        self._queue(encode_body(Status(realm, False)), now)

    def _forget(self, realm: int) -> None:
        self._realms.pop(realm, None)
        self._realm_deadline.pop(realm, None)
        self._recently_closed[realm] = None
        if len(self._recently_closed) > 1024:
            self._recently_closed.popitem(last=False)

    # -- receiving --------------------------------------------------------

    def receive_datagrams(self, datagrams: list[bytes], now: float) -> int:
        """Process datagrams that arrived together; returns how many were not PTCP.

        The same as :meth:`receive_datagram` on each in turn (the same datagrams
        out, the same events), except that:

        * a pure acknowledgement followed by one that acknowledges more is only
          counted: the later one acknowledges the same bytes at the same ``now``
          (a bulk sender gets one ack per packet, PROTOCOLS 2.5, and reads them
          in batches).  Not while recovering a loss, where every partial ack
          retransmits;
        * in-order data packets of one realm that follow each other make one
          :class:`DataReceived` with all their bytes.
        """
        return self._receive(datagrams, now, strict=False)

    def receive_datagram(self, data: bytes | memoryview, now: float) -> None:
        """Process one datagram from the peer.  Raises PTCPError if it is not PTCP."""
        self._receive([data], now, strict=True)

    def _heard(self, lmid: int, echo: int, now: float) -> None:
        """Bookkeeping for every PTCP packet from the peer: liveness, rmid, echo."""
        self.stats.packets_in += 1
        self._last_rx = now
        self._echo = echo
        if not self._seen_peer:
            self._seen_peer = True
            self._peer_clock0 = (lmid, now)
            self._rmid = lmid
        elif lmid != self._rmid:  # most packets of a tick share it (PROTOCOLS 2.7 (a))
            if (lmid | self._rmid) <= LMID_MASK:
                # a capture-style clock lives below 2^31 and wraps there after 24.8
                # days: compare modulo 2^31, or our echo of it would freeze for good
                newer = ((lmid - self._rmid) & LMID_MASK) < 1 << 30
            else:
                newer = ((lmid - self._rmid) & MASK32) < HALF32
            if newer:
                self._rmid = lmid

    def _receive(self, datagrams: list, now: float, strict: bool) -> int:
        """The one receive path: in-order data and superseded acks take short cuts,
        everything else goes through the codec (:func:`decode_body`)."""
        bad = 0
        last = len(datagrams) - 1
        if self._clock:
            self._tick(now)
        unpack = HEADER.unpack_from
        unpack_data = _DATA_HEAD.unpack_from
        events = self._events
        run_realm = -1  # realm of the data run being collected (-1: none)
        run: list[memoryview] = []
        for i, data in enumerate(datagrams):
            if type(data) is not bytes:
                data = bytes(data)  # segments may keep views of it: only immutable bytes
            n = len(data)
            if (
                n > _DATA_HEAD.size
                and data[HEADER_LEN] == T_DATA
                and not self._ooo
                and not self._dead
            ):
                # short cut: the next bytes of the stream, acknowledging nothing new
                magic, off, ack, _pid, lmid, echo, typelen, realm, _z = unpack_data(data)
                if (
                    magic == MAGIC
                    and off == self._rcv_nxt
                    and ack == self._snd_una
                    and typelen & 0xFFFFFF == n - _DATA_HEAD.size
                ):
                    self._heard(lmid, echo, now)
                    self._rx_bytes += n - HEADER_LEN
                    self._rcv_nxt = (off + n - HEADER_LEN) & MASK32
                    if self._realms.get(realm) == OPEN:
                        if realm != run_realm or len(run) == _RUN_PACKETS:
                            if run:
                                events.append(DataReceived(run_realm, b"".join(run)))
                                run = []
                            run_realm = realm
                        run.append(memoryview(data)[_DATA_HEAD.size :])
                    else:
                        self.stats.ignored += 1
                    self._ack_in_order(now)
                    if self._pending:
                        self._push(now)
                    continue
            if run:  # what follows may add events of its own: keep the order
                events.append(DataReceived(run_realm, b"".join(run)))
                run, run_realm = [], -1
            if (
                i < last
                and n == HEADER_LEN
                and len(datagrams[i + 1]) == HEADER_LEN
                and self._recover is None
                and not self._dead
            ):
                # short cut: a pure ack that the next one in the batch supersedes
                magic, _off, ack, _pid, lmid, echo = unpack(data)
                magic2, _off2, ack2, _pid2, _lmid2, _echo2 = unpack(datagrams[i + 1])
                adv = (ack - self._snd_una) & MASK32
                if (
                    magic == MAGIC
                    and magic2 == MAGIC
                    and 0 < adv <= ((self._tx_nxt - self._snd_una) & MASK32)
                    and 0 < ((ack2 - ack) & MASK32) < HALF32
                ):
                    self._heard(lmid, echo, now)
                    continue
            try:
                self._receive_packet(data, now)
            except PTCPError:
                if strict:
                    raise
                bad += 1
        if run:
            events.append(DataReceived(run_realm, b"".join(run)))
        return bad

    def _receive_packet(self, data: bytes, now: float) -> None:
        """Any one packet, decoded by the codec.  Raises PTCPError if it is not PTCP."""
        if len(data) < HEADER_LEN:
            raise PTCPError(f"datagram of {len(data)} bytes is shorter than the PTCP header")
        magic, off, ack, _pid, lmid, echo = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise PTCPError("bad magic, not a PTCP packet")
        n = len(data) - HEADER_LEN
        body = decode_body(memoryview(data)[HEADER_LEN:]) if n else None
        if self._dead:
            return
        if type(body) is ResendRequest:
            self._on_resend_request(off, ack, lmid, echo, now)
            return
        if self._unacceptable(off, ack, n):
            self.stats.packets_in += 1
            self._ack()  # RFC 9293 3.10.7.4: drop it, answer with the current state
            return
        self._heard(lmid, echo, now)
        self._rx_bytes += n
        if ack != self._snd_una or (not n and self._inflight):
            self._on_ack(ack, now, n == 0)
        if not n:
            if self._pending:
                self._push(now)
            return
        delta = (off - self._rcv_nxt) & MASK32
        if delta == 0:
            self._rcv_nxt = (off + n) & MASK32
            self._deliver(body, now)
            if self._ooo:
                self._drain_ooo(now)  # a hole filled: acknowledge at once
            elif type(body) is Data:
                self._ack_in_order(now)
                if self._pending:
                    self._push(now)
                return
        elif delta < HALF32:
            self.stats.out_of_order += 1
            ooo = self._ooo
            if delta + n > self.max_ahead:
                self.stats.dropped_ahead += 1
            elif off not in ooo:
                if len(ooo) >= self.max_out_of_order:
                    self._prune_ooo()
                if len(ooo) < self.max_out_of_order:
                    ooo[off] = (n, body)
                else:
                    self.stats.dropped_ahead += 1
        else:
            self.stats.duplicates += 1
        self._ack()
        self._push(now)

    def _on_resend_request(self, off: int, ack: int, lmid: int, echo: int, now: float) -> None:
        # PROTOCOLS 2.5 / 2.7 (b): the peer holds a hole in our stream.  The body is
        # not part of its stream (its next data packet carries the same sent), its
        # layout is not settled, so only its header counts: take the acknowledgement
        # and resend everything not acknowledged, at most once per RESEND_EVERY.
        self.stats.resend_requests += 1
        if self._unacceptable(off, ack, 0):  # it acknowledges bytes never sent
            self.stats.packets_in += 1
            self._ack()
            return
        self._heard(lmid, echo, now)
        if ack != self._snd_una:
            self._on_ack(ack, now, False)
        if self._inflight and now - self._resent_at >= RESEND_EVERY:
            self._resent_at = now
            self.stats.resend_answers += 1
            self._timed_end = None  # Karn: no round trip sample across a resend
            for seg in self._inflight:
                self.stats.retransmits += 1
                self._transmit(seg, now)
            self._rto_deadline = now + self._rto

    def _unacceptable(self, off: int, ack: int, n: int) -> bool:
        """True (and counted) for a packet that is neither a real ack nor real data.

        An ack of bytes never sent, or a body whose ``sent`` lies more than twice
        ``max_ahead`` bytes either side of what we expect, comes from a confused or
        forged peer: taking it would stop retransmission or corrupt the stream.
        """
        adv = (ack - self._snd_una) & MASK32
        if HALF32 > adv > ((self._tx_nxt - self._snd_una) & MASK32):
            self.stats.ack_beyond += 1
            return True
        if n:
            far = min(2 * self.max_ahead, HALF32 // 2)
            if far <= ((off - self._rcv_nxt) & MASK32) <= MASK32 + 1 - far:
                self.stats.out_of_window += 1
                return True
        return False

    def _drain_ooo(self, now: float) -> None:
        ooo = self._ooo
        while True:
            item = ooo.pop(self._rcv_nxt, None)
            if item is None:
                break
            self._rcv_nxt = (self._rcv_nxt + item[0]) & MASK32
            self._deliver(item[1], now)

    def _prune_ooo(self) -> None:
        """Drop held packets the stream has already passed (misaligned duplicates)."""
        rcv = self._rcv_nxt
        for off in [o for o in self._ooo if ((o - rcv) & MASK32) >= HALF32]:
            del self._ooo[off]

    def _deliver(self, body: Body | None, now: float) -> None:
        if type(body) is Data:
            if self._realms.get(body.realm) == OPEN:
                self._events.append(DataReceived(body.realm, body.data))
            else:
                self.stats.ignored += 1
        elif isinstance(body, Heartbeat):
            self._events.append(HeartbeatReceived())
        elif isinstance(body, Status):
            self._on_status(body.realm, body.connected, now)
        elif isinstance(body, Bind):
            if body.realm in self._realms:
                self.stats.ignored += 1  # a second bind for a live realm: a peer bug
            else:
                self._realms[body.realm] = PENDING
                self._realm_deadline[body.realm] = now + self.open_timeout
                self._events.append(BindRequested(body.realm, body.port, body.ip))
        elif isinstance(body, Syn):
            self._events.append(SynReceived())
        elif isinstance(body, Command):
            self._events.append(CommandReceived(body.type, body.payload, body.params))

    def _on_status(self, realm: int, connected: bool, now: float) -> None:
        state = self._realms.get(realm)
        if state == OPENING:
            if connected:
                self._realms[realm] = OPEN
                self._realm_deadline.pop(realm, None)
                self._events.append(RealmConnected(realm))
            else:
                self._forget(realm)
                self._events.append(RealmClosed(realm, "refused"))
            self._bind_over(realm, now)
        elif connected:
            self.stats.ignored += 1
        elif state == CLOSING:  # the peer's answer to our DISC
            self._forget(realm)
            self._events.append(RealmClosed(realm, "local"))
        elif state in (OPEN, PENDING):
            # PROTOCOLS 2.5: the peer answers a DISC with its own
            self._forget(realm)
            self._queue(encode_body(Status(realm, False)), now)
            self._events.append(RealmClosed(realm, "peer"))
        else:
            self.stats.ignored += 1  # DISC for an unknown realm: never answer (no ping-pong)

    def _on_ack(self, ack: int, now: float, pure: bool) -> None:
        adv = (ack - self._snd_una) & MASK32
        if adv == 0:
            if pure and self._inflight:
                self._dupack(now)
            return
        if adv >= HALF32:
            return  # an old acknowledgement, overtaken
        inflight = self._inflight
        acked = 0
        while inflight and ((ack - inflight[0].end) & MASK32) < HALF32:
            acked += inflight.popleft().size
        self._snd_una = ack
        self._stall_since = now if inflight else None
        if not acked:
            return  # acknowledges part of a packet: wait for the rest
        self._inflight_bytes -= acked
        self._buffered -= acked
        timed = self._timed_end
        if timed is not None and ((ack - timed) & MASK32) < HALF32:
            self._rtt_sample(now - self._timed_at)
            self._timed_end = None
        elif self._backed_off and self._srtt is not None:
            # new data got through: drop the timer backoff (as Linux does)
            self._rto = min(self.max_rto, max(self.min_rto, self._srtt + 4 * self._rttvar))
            self._backed_off = False
        self._dupacks = 0
        if self._recover is not None:
            if seq_lt(ack, self._recover) and inflight:
                # NewReno partial ack: the next hole is at the new head
                self._retransmit(inflight[0], now)
                self._cwnd = max(self._mss, self._cwnd - acked + self._mss)
            else:
                self._recover = None
                self._cwnd = self._ssthresh
        elif self._cwnd < self._ssthresh:
            self._cwnd += acked  # byte counting: right for per-packet and stretch acks
        else:
            self._cwnd += max(1, self._mss * acked // self._cwnd)
        if self._cwnd > self.window_bytes:
            self._cwnd = self.window_bytes
        self._rto_deadline = now + self._rto if inflight else None

    def _dupack(self, now: float) -> None:
        self._dupacks += 1
        if self._recover is None:
            if self._dupacks < 3 and self._pending:
                # RFC 3042 limited transmit: new data to earn the third duplicate ack
                self._send_new(self._pending.popleft(), now)
            elif self._dupacks == 3:
                self.stats.fast_retransmits += 1
                self._ssthresh = max(self._inflight_bytes // 2, 2 * self._mss)
                self._cwnd = self._ssthresh + 3 * self._mss
                self._recover = self._tx_nxt
                self._retransmit(self._inflight[0], now)
        else:
            self._cwnd += self._mss  # window inflation while recovering

    def _retransmit(self, seg: _Seg, now: float) -> None:
        self.stats.retransmits += 1
        self._timed_end = None  # Karn: no round trip sample across a retransmission
        self._transmit(seg, now)  # a new lmid and pid each time (PROTOCOLS 2.5)

    def _rtt_sample(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt = rtt
            self._rttvar = rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._rto = min(self.max_rto, max(self.min_rto, self._srtt + 4 * self._rttvar))
        self._backed_off = False

    # -- timers -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time handle_timers has work to do (None: nothing scheduled)."""
        if self._dead:
            return None
        best = self._last_rx + self.dead_after
        if self._rto_deadline is not None and self._inflight and self._rto_deadline < best:
            best = self._rto_deadline
        if self._next_heartbeat is not None and self._next_heartbeat < best:
            best = self._next_heartbeat
        for t in self._realm_deadline.values():
            if t < best:
                best = t
        stall = self._stall_deadline()
        if stall is not None and stall < best:
            best = stall
        if self._ack_deadline is not None and self._ack_deadline < best:
            best = self._ack_deadline
        return best

    def _stall_deadline(self) -> float | None:
        # PROTOCOLS 2.7 (b): an outbound stall (the peer's recv frozen while realms
        # write) means a dead path even when the peer still sends, e.g. after its NAT
        # mapping changed; a tunnel without realms is exempt.
        if self.stall_after is None or self._stall_since is None or not self._realms:
            return None
        if not self._inflight:
            return None
        return self._stall_since + self.stall_after

    def handle_timers(self, now: float) -> None:
        """Retransmit, send heartbeats, expire realms, declare the peer dead."""
        if self._dead:
            return
        if self._clock:
            self._tick(now)
        if now - self._last_rx >= self.dead_after:
            self._dead = True
            self._events.append(PeerDead(now - self._last_rx))
            return
        stall = self._stall_deadline()
        if stall is not None and now >= stall:
            self._dead = True
            self._events.append(PeerDead(now - self._last_rx, "stall"))
            return
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack()  # the second packet of a pair did not come (PROTOCOLS 2.7 (b))
        if self._rto_deadline is not None and now >= self._rto_deadline and self._inflight:
            self.stats.timeouts += 1
            self._ssthresh = max(self._inflight_bytes // 2, 2 * self._mss)
            self._cwnd = self._mss
            self._recover = self._tx_nxt
            self._dupacks = 0
            self._rto = min(self.max_rto, self._rto * 2)  # backoff
            self._backed_off = True
            self._retransmit(self._inflight[0], now)
            self._rto_deadline = now + self._rto
        if self._next_heartbeat is not None and now >= self._next_heartbeat:
            self.send_heartbeat(now)
            if self._pending:
                # the heartbeat waits behind a full window: an empty packet shows
                # the peer we are alive meanwhile (empty packets are never answered)
                self._ack()
        if self._realm_deadline:
            for realm, t in list(self._realm_deadline.items()):
                if now >= t:
                    state = self._realms.get(realm)
                    if state == OPENING or state == PENDING:
                        self._forget(realm)
                        self._queue(encode_body(Status(realm, False)), now)
                    else:
                        self._forget(realm)
                    self._events.append(RealmClosed(realm, "timeout"))
                    if realm == self._bind_out and self.bind_timeout is not None:
                        self._retire()
                    self._bind_over(realm, now)


# ---------------------------------------------------------------------------
# Driver: threads and sockets only move bytes
# ---------------------------------------------------------------------------

_RECV_BATCH = 256
_GRO_PROBE = 4096  # datagrams read with UDP_GRO on before it goes off if it coalesced none
_TURN = 256 * 1024  # bytes one realm may put into the shared window per turn
_WRITE_BATCH = 256 * 1024  # queued bytes a writer hands to one sendmsg
_MAX_PARTS = 512  # buffers per sendmsg (IOV_MAX is 1024 on Linux)
# One recv from a realm's local socket: small while the client sends little (a 1 MiB
# recv costs ~10x a 64 KiB one for a short message: the buffer is allocated whole),
# large once reads come back full.
_SMALL_READ = 64 * 1024
_LOCAL_READ = 1 << 20
_BACKLOG_LOW = 256 * 1024  # a realm's reader reads on once its backlog is below this

# Linux UDP segmentation offload, udp(7): one sendmsg with a UDP_SEGMENT size
# sends a run of datagrams of that size (the last may be shorter) and UDP_GRO
# hands a run of equal datagrams from one sender to one recvmsg.  The peer and
# the wire still see one datagram per PTCP packet; a capture on the sending
# host may show the run as one (dh-p2p.lua splits it).
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_UDP_GRO = getattr(socket, "UDP_GRO", 104)
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels
GSO_MAX_BYTES = 65507  # largest IPv4 UDP payload
_GSO_UNSUPPORTED = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_SEGMENT_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")


def gso_runs(
    datagrams: list[bytes],
    max_segments: int = GSO_MAX_SEGMENTS,
    max_bytes: int = GSO_MAX_BYTES,
) -> list[tuple[int, int]]:
    """Split ``datagrams`` (in order) into ``(start, stop)`` runs one GSO send can carry.

    A run has datagrams of one size, except that its last may be shorter, at
    most ``max_segments`` of them and ``max_bytes`` in all.
    """
    runs = []
    i, n = 0, len(datagrams)
    while i < n:
        size = total = len(datagrams[i])
        j = i + 1
        while j < n and j - i < max_segments:
            s = len(datagrams[j])
            if s > size or not s or total + s > max_bytes:
                break
            total += s
            j += 1
            if s < size:
                break
        runs.append((i, j))
        i = j
    return runs


def split_gro(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams of one recvmsg on a UDP_GRO socket (one, or a coalesced run)."""
    for level, kind, value in ancdata:
        if level == _SOL_UDP and kind == _UDP_GRO and len(value) >= _GRO_SIZE.size:
            seg = _GRO_SIZE.unpack_from(value)[0]
            if 0 < seg < len(data):
                return [data[k : k + seg] for k in range(0, len(data), seg)]
    return [data]


@dataclass
class TunnelStats:
    """Counters kept by a PTCPTunnel."""

    datagrams_in: int = 0
    batches: int = 0  # receive batches (datagrams_in / batches = datagrams per wake-up)
    datagrams_out: int = 0
    stray: int = 0  # datagrams that are not PTCP, or from another address
    send_errors: int = 0
    overflows: int = 0  # realms closed because their local client stopped reading
    realms_opened: int = 0
    data_in: int = 0  # realm data bytes received from the peer
    data_out: int = 0  # realm data bytes handed to the session for the peer
    gso_sends: int = 0  # sendmsg calls that carried a run of datagrams (UDP_SEGMENT)
    gro_runs: int = 0  # recvmsg calls that returned a coalesced run (UDP_GRO)
    exact_batches: int = 0  # batches read from the connected socket without sender checks


@dataclass(frozen=True, slots=True)
class TunnelHealth:
    """One look at a tunnel (PROTOCOLS 2.7 (b)): bytes we sent, what the peer
    acknowledged (its recv) and what is unacknowledged; ``lmid_lag_ms`` our lmid
    less the latest echo of it (rests near the heartbeat interval when healthy);
    ``inbound_skew_ms`` how far the peer's lmid clock ran from ours since its
    first packet; retransmissions, 0x0a requests, realms."""

    sent: int
    peer_recv: int
    unacked: int
    lmid_lag_ms: int
    inbound_skew_ms: int
    retransmits: int
    resend_requests: int
    realms: int

    def line(self) -> str:
        return (
            f"sent {self.sent} peer-recv {self.peer_recv} unacked {self.unacked} "
            f"lmid-lag {self.lmid_lag_ms} ms skew {self.inbound_skew_ms} ms "
            f"retransmits {self.retransmits} 0x0a {self.resend_requests} realms {self.realms}"
        )


def _after(parts: list[bytes], sent: int) -> list[bytes]:
    """What is left of ``parts`` once ``sent`` bytes of them went out."""
    i = 0
    while i < len(parts) and sent >= len(parts[i]):
        sent -= len(parts[i])
        i += 1
    rest = parts[i:]
    if sent:
        rest[0] = rest[0][sent:]
    return rest


class _Backlog:
    """What a realm's reader handed over and the Session has not taken yet.

    The tunnel owns it (its lock guards ``views``, ``size``, ``turn_used`` and
    ``taken_total``); the reader thread writes ``read_total`` and ``waiting`` and
    sleeps on ``can_read`` while the backlog is full.
    """

    __slots__ = ("views", "size", "turn_used", "read_total", "taken_total", "waiting", "can_read")

    def __init__(self) -> None:
        self.views: collections.deque[memoryview] = collections.deque()  # read, not yet sent
        self.size = 0
        self.turn_used = 0  # bytes sent in the current turn
        self.read_total = 0  # bytes handed over
        self.taken_total = 0  # of them, sent or dropped
        self.waiting = False  # the reader waits for window room: its client may block on us
        self.can_read = threading.Event()  # the backlog shrank (or the realm ended)


class _Bridge:
    """One realm <-> one local TCP socket: a reader thread and a writer thread."""

    def __init__(self, tunnel: PTCPTunnel, realm: int, sock: socket.socket) -> None:
        self.tunnel = tunnel
        self.realm = realm
        self.sock = sock
        sock.settimeout(None)  # an idle realm is not an error; stalls are handled in push()
        self.limit = tunnel.queue_bytes
        self.hard_limit = 4 * tunnel.queue_bytes
        self.stall_timeout = tunnel.stall_timeout
        self.progress = 0.0  # when the local socket last accepted bytes
        self.backlog = _Backlog()  # the tunnel's: moved into the window under its lock
        self.cond = threading.Condition(threading.Lock())
        self.chunks: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.finishing = False  # the peer closed: drain the queue, then close the socket
        self.writing = False  # the writer thread is sending bytes it took from the queue
        self.aborted = False
        self.opened = threading.Event()
        self.open_result = ""
        self.threads: list[threading.Thread] = []
        self.detachable = False  # until opened, abort() leaves the socket to forward()
        self._closed = False

    def start(self) -> None:
        for name, target in (("rd", self._reader), ("wr", self._writer)):
            t = self.tunnel._thread(f"ptcp-{name}-{self.realm:08x}", target)
            self.threads.append(t)
            t.start()

    def set_opened(self, result: str) -> None:
        self.open_result = result
        self.opened.set()

    def push(self, parts: list[bytes], now: float) -> bool:
        """Queue peer bytes (in order, not joined) for the local socket.

        False when the local client has stopped reading: the queue is past its
        soft limit and nothing was written for stall_timeout, or past the hard limit.
        """
        if len(parts) > _MAX_PARTS:
            parts = [b"".join(parts)]
        total = sum(map(len, parts))
        with self.cond:
            if self.aborted:
                return True
            if not self.queued and not self.writing and self.threads and not self.finishing:
                # fast path: the writer is idle, so write here without waking it
                try:
                    sent = self.sock.sendmsg(parts, (), socket.MSG_DONTWAIT)
                except OSError:  # would block, or broken: the writer finds out
                    sent = 0
                if sent:
                    self.progress = now
                    if sent == total:
                        return True
                    parts = _after(parts, sent)
                    total -= sent
            size = self.queued + total
            if self.backlog.waiting:
                # a client blocked writing to us (we are not taking its bytes)
                # has not stopped reading by its own fault: no stall clock
                self.progress = now
            if size > self.limit and (
                size > self.hard_limit or now - self.progress > self.stall_timeout
            ):
                return False
            if not self.queued:  # the stall clock starts with a non-empty queue
                self.progress = now
            self.chunks.extend(parts)
            self.queued += total
            self.cond.notify()
        return True

    def finish(self) -> None:
        """The peer closed the realm: the writer sends what is queued, then closes the
        socket.  A bridge not started yet (its forward() or bind is still returning,
        while a short answer and the DISC already came) keeps its queue for the
        writer that start() runs."""
        with self.cond:
            self.finishing = True
            self.cond.notify()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.chunks.clear()
            self.queued = 0
            self.cond.notify()
        self.backlog.can_read.set()  # our reader may wait for backlog room
        if not self.detachable:  # else forward() decides: another tunnel may take it
            self.close_socket()
        self.opened.set()

    def close_socket(self) -> None:
        with self.cond:
            if self._closed:
                return
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _writer(self) -> None:
        sock = self.sock
        while True:
            with self.cond:
                while not self.chunks and not self.finishing and not self.aborted:
                    self.cond.wait()
                if self.aborted:
                    return
                if not self.chunks:  # finishing and drained
                    break
                parts, size = [], 0
                chunks = self.chunks
                while chunks and size < _WRITE_BATCH and len(parts) < _MAX_PARTS:
                    part = chunks.popleft()
                    parts.append(part)
                    size += len(part)
                self.writing = True
            try:
                while parts:
                    parts = _after(parts, sock.sendmsg(parts))
            except OSError:
                self.tunnel._local_closed(self, "write failed")
                return
            with self.cond:
                self.queued -= size
                self.writing = False
                self.progress = self.tunnel.clock()
        self.close_socket()

    def _reader(self) -> None:
        sock, send_realm = self.sock, self.tunnel._send_realm
        size = _SMALL_READ
        while True:
            try:
                data = sock.recv(size)
            except OSError:
                data = b""
            if not send_realm(self, data):
                return
            if not data:
                break
            size = _LOCAL_READ if len(data) >= _SMALL_READ else _SMALL_READ
        self.tunnel._local_closed(self, "local EOF")


class PTCPTunnel:
    """Threaded driver: one UDP socket and a Session; realms bridged to local TCP sockets.

    Threads: a receiver (a blocking read, then whatever else is queued, fed to
    the Session under one lock), a timer (sleeps on a condition until the
    Session's next deadline: retransmits, heartbeats, realm timeouts, dead peer),
    and per realm a reader (local socket -> the realm's backlog, up to about
    1.25 MiB; the backlogs enter the send window in turns, moved by whichever
    thread holds the lock when there is room) and a writer (bounded queue ->
    local socket).
    Datagrams are sent while holding the Session lock, so lmid order is kept on
    the wire.  :meth:`start` connects the socket to the peer, so the kernel drops
    datagrams from other addresses; those queued before, and datagrams that are
    not PTCP, are counted in ``stats.stray`` and ignored.

    Client side: :meth:`listen` / :meth:`forward`.  Device side: ``on_bind(port,
    ip)`` returns a connected TCP socket (or None to refuse) for each bind.
    ``on_event`` sees every Session event except data; ``on_dead`` is called
    once the peer is declared dead.  Every thread the tunnel starts runs its work
    as ``run_thread(work)`` when given (e.g. to set a log context for it).  The
    tunnel makes ``sock`` blocking; with
    ``own_socket`` it also closes it.  Without ``session`` a new one is made
    with ``session_options``.  ``gso`` (Linux) sends runs of datagrams with one
    UDP_SEGMENT sendmsg and reads coalesced runs with UDP_GRO; it turns itself
    off when the kernel refuses it.  UDP_GRO goes off once the first 4096
    datagrams came without a single run (a device sends one datagram at a
    time); the connected socket is then read one datagram per ``recv``.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        session: Session | None = None,
        *,
        on_bind: Callable[[int, str], socket.socket | None] | None = None,
        on_event: Callable[[Event], None] | None = None,
        on_dead: Callable[[], None] | None = None,
        queue_bytes: int = 4 << 20,
        stall_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        own_socket: bool = True,
        gso: bool = True,
        run_thread: Callable[[Callable[[], object]], object] | None = None,
        **session_options: object,
    ) -> None:
        self.sock = sock
        self.run_thread = run_thread
        self.peer = peer
        self.clock = clock
        self.session = (
            session if session is not None else Session(now=clock(), **session_options)  # type: ignore[arg-type]
        )
        self.on_bind = on_bind
        self.on_event = on_event
        self.on_dead = on_dead
        self.queue_bytes = queue_bytes
        self.stall_timeout = stall_timeout
        self.own_socket = own_socket
        self.stats = TunnelStats()
        self.dead = threading.Event()
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._bridges: dict[int, _Bridge] = {}
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._sleep_until = float("inf")
        self._timer = threading.Condition(self._lock)
        self._space_waiters = 0  # close() waiting for the last acknowledgements
        self._turns: collections.deque[_Bridge] = collections.deque()  # realms with a backlog
        self._inbox: collections.deque[tuple[_Bridge, memoryview]] = collections.deque()
        self._dispatching = threading.Lock()  # keeps event order across the two threads
        sock.settimeout(None)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        self._connected = False  # start() connects the socket to the peer
        self._settling = True  # datagrams of others may be queued from before connect()
        self._gso = gso and sys.platform.startswith("linux")
        self._gro = False
        if self._gso:
            try:
                sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
                self._gro = True
            except OSError:
                pass
        self._peer_ok = {peer}  # senders the checked reader takes
        try:
            self._peer_ok.add((socket.gethostbyname(peer[0]), peer[1]))
        except OSError:
            pass
        self._recv = self._receiver()
        self._read = self._read_checked  # _queue_drained() may switch to _read_exact
        self._io_thread = self._thread("ptcp-io", self._guarded, self._io_loop)
        self._timer_thread = self._thread("ptcp-timer", self._guarded, self._timer_loop)

    # -- lifecycle --------------------------------------------------------

    def start(self) -> PTCPTunnel:
        """Connect the socket to the peer, send what the Session already queued,
        then start the I/O thread."""
        try:
            # the kernel now drops datagrams from anyone else, as the reader would
            self.sock.connect(self.peer)
        except OSError as exc:
            log.debug("UDP socket not connected to the peer (%s): checking each sender", exc)
        else:
            self._connected = True
        with self._lock:
            self._flush()
            events = self.session.events()
        self._dispatch(events)
        self._io_thread.start()
        self._timer_thread.start()
        return self

    def __enter__(self) -> PTCPTunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 2.0) -> None:
        """DISC every live realm, wait (bounded) for the peer's acks, stop all threads."""
        with self._space:
            if self._stop:
                return
            now = self.clock()
            for realm in list(self.session.realms):
                self.session.close_realm(realm, now)
            self._flush()
            self._wake_locked()
            limit = now + timeout
            self._space_waiters += 1
            while (
                self._io_thread.is_alive()
                and self.session.unacked_bytes
                and not self.session.dead
                and self.clock() < limit
            ):
                self._space.wait(max(0.0, limit - self.clock()))
            self._space_waiters -= 1
            self._stop = True
            self._wake_all_senders()
            self._timer.notify_all()
            bridges = list(self._bridges.values())
            self._bridges.clear()
        me = threading.current_thread()  # close() may run from an on_event/on_dead callback
        if self._io_thread.is_alive():
            self._wake_receiver()
            if self._io_thread is not me:
                self._io_thread.join()
        if self._timer_thread.is_alive() and self._timer_thread is not me:
            self._timer_thread.join()
        for lst in self._listeners:
            _shutdown_close(lst)
        for bridge in bridges:
            bridge.abort()
        for t in [t for b in bridges for t in b.threads] + self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        if self.own_socket:
            self.sock.close()
        elif self._gro:  # the owner's next reader may not expect coalesced runs
            try:
                self.sock.setsockopt(_SOL_UDP, _UDP_GRO, 0)
            except OSError:
                pass
        self.closed.set()

    def send_syn(self) -> None:
        """Queue a SYN on the running tunnel (the Session's counters continue)."""
        with self._lock:
            self.session.send_syn(self.clock())
            self._flush()
            self._wake_locked()

    def send_command(self, body_type: int, payload: bytes) -> None:
        """Queue an opaque command (0x17/0x19/0x1b); answers arrive as CommandReceived."""
        with self._lock:
            self.session.send_command(body_type, payload, self.clock())
            self._flush()
            self._wake_locked()

    # -- client side ------------------------------------------------------

    @property
    def realm_count(self) -> int:
        """Realms bridged now (open or being opened)."""
        return len(self._bridges)

    @property
    def retired(self) -> bool:
        """A bind went unanswered: the tunnel serves its realms and takes no new one."""
        return self.session.retired

    def has_room(self) -> bool:
        """Whether :meth:`forward` may take a new realm here now."""
        return not self._stop and self.session.can_open

    def forward(
        self,
        client: socket.socket,
        remote_port: int,
        ip: str = "127.0.0.1",
        timeout: float = 10.0,
        *,
        keep_client: bool = False,
    ) -> int:
        """Bridge a connected local TCP socket to a new realm bound to ``ip:remote_port``.

        Binds go out one at a time (the Session queues them, PROTOCOLS 2.7 (b)).
        Blocks until the peer answers (CONN) and returns the realm; raises
        PTCPError (and closes ``client``) when the bind is refused, times out or
        the tunnel ends.  With ``keep_client``, when this tunnel cannot take the
        realm (full, retired, closed, or a bind unanswered within the Session's
        ``bind_timeout``, which retires it) it raises :class:`TunnelUnavailable`
        and leaves ``client`` open.
        """
        with self._lock:
            if not self.has_room():
                why = "closed" if self._stop or self.session.dead else "full or retired"
                if not keep_client:
                    client.close()
                raise TunnelUnavailable(f"tunnel is {why}")
            realm = self.session.open_realm(remote_port, self.clock(), ip, timeout)
            bridge = _Bridge(self, realm, client)
            bridge.detachable = keep_client
            self._bridges[realm] = bridge
            self._flush()
            self._wake_locked()
        # the Session ends every bind (CONN, refusal, timeout, retirement), and
        # close() or a dead peer sets every bridge's outcome
        while not bridge.opened.wait(1.0):
            if self._stop or self.session.dead:
                break
        result = bridge.open_result
        if result != "connected":
            bridge.abort()
            with self._lock:
                self._bridges.pop(realm, None)
            if result == "timeout" and self.retired:
                log.warning("a bind went unanswered: this tunnel takes no new realms")
            if keep_client and result in ("timeout", "retired", "peer dead", "closed", ""):
                raise TunnelUnavailable(f"bind to port {remote_port}: {result or 'closed'}")
            bridge.close_socket()
            raise PTCPError(f"bind to port {remote_port} failed: {result or 'closed'}")
        bridge.detachable = False
        self.stats.realms_opened += 1
        bridge.start()
        return realm

    def health(self) -> TunnelHealth:
        """Counters of the session and the tunnel now (for logs and metrics)."""
        with self._lock:
            return self.session.health(self.clock(), realms=len(self._bridges))

    def listen(
        self, remote_port: int, local_port: int = 0, host: str = "127.0.0.1"
    ) -> tuple[str, int]:
        """Accept local TCP clients on ``host:local_port``, each forwarded to ``remote_port``."""
        lst = socket.create_server((host, local_port))
        self._listeners.append(lst)
        t = self._thread("ptcp-accept", self._accept_loop, lst, remote_port)
        self._threads.append(t)
        t.start()
        return lst.getsockname()[:2]

    def _thread(
        self, name: str | None, target: Callable[..., object], *args: object
    ) -> threading.Thread:
        """A daemon thread (not started) that runs ``target(*args)`` through run_thread."""
        run_thread = self.run_thread
        if run_thread is None:
            return threading.Thread(target=target, args=args, name=name, daemon=True)
        return threading.Thread(
            target=run_thread, args=(functools.partial(target, *args),), name=name, daemon=True
        )

    def _accept_loop(self, lst: socket.socket, remote_port: int) -> None:
        while not self._stop:
            try:
                client, _addr = lst.accept()
            except OSError:
                return
            self._thread(None, self._forward_quiet, client, remote_port).start()

    def _forward_quiet(self, client: socket.socket, remote_port: int) -> None:
        try:
            self.forward(client, remote_port)
        except PTCPError as exc:
            log.warning("%s", exc)

    # -- device side ------------------------------------------------------

    def _bind_requested(self, realm: int, port: int, ip: str) -> None:
        sock = None
        if self.on_bind is not None:
            try:
                sock = self.on_bind(port, ip)
            except OSError as exc:
                log.info("bind to %s:%d refused: %s", ip, port, exc)
            except Exception:
                log.exception("on_bind callback failed; refusing the bind")
        bridge = None
        with self._lock:
            now = self.clock()
            if self._stop or self.session.realm_state(realm) != PENDING:
                if sock is not None:
                    sock.close()
                return
            if sock is None:
                self.session.refuse(realm, now)
            else:
                bridge = _Bridge(self, realm, sock)
                self._bridges[realm] = bridge
                self.session.accept(realm, now)
                self.stats.realms_opened += 1
            self._flush()
        if bridge is not None:
            bridge.start()

    # -- used by bridges --------------------------------------------------


    def _send_realm(self, bridge: _Bridge, data: bytes) -> bool:
        """Hand bytes read from a realm's local socket to the Session (b"": EOF).

        The bytes go to the realm's backlog (through ``_inbox``, no lock), and
        the backlogs go into the send window in turns of at most _TURN bytes
        (FIFO), so one busy realm cannot starve the others.  Whoever holds the
        lock when room appears (the I/O thread on acknowledgements, or this
        reader when little is in flight) moves them.  Returns once the realm
        has less than _BACKLOG_LOW waiting (nothing at EOF); False when the
        realm or the tunnel has ended.
        """
        realm, session = bridge.realm, self.session

        def live() -> bool:  # lock-free reads: a stale answer only costs one more look
            return not self._stop and not session.dead and session.realm_state(realm) == OPEN

        if not live():
            return False
        if data:
            bridge.backlog.read_total += len(data)
            self._inbox.append((bridge, memoryview(data)))
            if session.unacked_bytes <= session.window_bytes // 2:
                # else acknowledgements are on their way and the I/O thread pumps
                # when they come: readers keep off the lock it needs
                with self._lock:
                    self._pump()
                    self._flush()
                    self._wake_locked()
        limit = _BACKLOG_LOW if data else 1
        backlog = bridge.backlog
        can_read = backlog.can_read
        while backlog.read_total - backlog.taken_total >= limit:
            can_read.clear()
            if backlog.read_total - backlog.taken_total < limit:
                break
            if not live():
                return False
            backlog.waiting = True
            can_read.wait()
            backlog.waiting = False
        return live()

    def _pump(self) -> None:
        """(lock held) Move realm backlogs into the send window while it has room, in turns."""
        turns, session, inbox = self._turns, self.session, self._inbox
        while inbox:
            bridge, view = inbox.popleft()
            backlog = bridge.backlog
            if not backlog.size:
                turns.append(bridge)
            backlog.views.append(view)
            backlog.size += len(view)
        if not turns:
            return
        now = self.clock()
        while turns:
            bridge = turns[0]
            backlog = bridge.backlog
            if session.realm_state(bridge.realm) != OPEN or self._stop:
                turns.popleft()
                self._drop_backlog(bridge)
                continue
            views = backlog.views
            view = views[0]
            try:
                took = session.send(bridge.realm, view[: _TURN - backlog.turn_used], now)
            except PTCPError:
                took = 0
            if not took:
                break  # no room for a full body
            self.stats.data_out += took
            backlog.turn_used += took
            backlog.taken_total += took
            backlog.size -= took
            if took < len(view):
                views[0] = view[took:]
            else:
                views.popleft()
            if backlog.size < _BACKLOG_LOW:
                backlog.can_read.set()  # the reader may read on
            if not views:
                turns.popleft()
                backlog.turn_used = 0
            elif backlog.turn_used >= _TURN:
                turns.rotate(-1)  # turn used: to the back of the line
                backlog.turn_used = 0

    def _drop_backlog(self, bridge: _Bridge) -> None:
        """(lock held) Forget what the realm's reader handed over, and wake it."""
        backlog = bridge.backlog
        backlog.taken_total += backlog.size
        backlog.views.clear()
        backlog.size = 0
        backlog.can_read.set()

    def _release(self, bridge: _Bridge) -> None:
        """(lock held) The realm ended: drop its backlog and wake its reader."""
        if bridge.backlog.size:
            self._turns.remove(bridge)
        self._drop_backlog(bridge)

    def _room_changed(self) -> None:
        """(lock held) Acknowledgements came: fill the window, and tell close()."""
        self._pump()
        if self._space_waiters:
            self._space.notify_all()

    def _wake_all_senders(self) -> None:
        """(lock held) Stopping or dead: every waiting reader must look again."""
        waiting = tuple(self._inbox)  # readers append without the lock: copy in one go
        for bridge in [*self._turns, *self._bridges.values(), *(b for b, _ in waiting)]:
            bridge.backlog.can_read.set()
        self._space.notify_all()

    def _local_closed(self, bridge: _Bridge, why: str) -> None:
        with self._lock:
            if self._bridges.get(bridge.realm) is bridge:
                del self._bridges[bridge.realm]
                self.session.close_realm(bridge.realm, self.clock())
                self._flush()
                self._wake_locked()
            self._release(bridge)
        log.debug("realm %08x: %s", bridge.realm, why)
        bridge.finish() if why == "local EOF" else bridge.abort()

    # -- I/O thread -------------------------------------------------------

    def _flush(self) -> None:
        """Send the Session's datagrams (lock held, so lmid order is kept on the wire)."""
        out = self.session.datagrams_to_send()
        if not out:
            return
        self.stats.datagrams_out += len(out)
        if self._gso and len(out) > 1:
            sendmsg, peer = self.sock.sendmsg, self.peer
            for i, j in gso_runs(out):
                if j - i == 1:
                    self._send_each(out[i:j])
                    continue
                anc = [(_SOL_UDP, _UDP_SEGMENT, _SEGMENT_SIZE.pack(len(out[i])))]
                try:
                    sendmsg(out[i:j], anc, 0, peer)
                    self.stats.gso_sends += 1
                except OSError as exc:
                    if exc.errno in _GSO_UNSUPPORTED:
                        log.info("UDP segmentation offload refused (%s): sending one by one", exc)
                        self._gso = False
                    self._send_each(out[i:j])  # or a queued ICMP error took the send
        else:
            self._send_each(out)

    def _send_each(self, datagrams: list[bytes]) -> None:
        sendto, peer = self.sock.sendto, self.peer
        for d in datagrams:
            try:
                sendto(d, peer)
            except OSError:
                self.stats.send_errors += 1

    def _wake_locked(self) -> None:
        """(lock held) Wake the timer thread if the Session now has an earlier deadline."""
        deadline = self.session.next_deadline()
        if deadline is not None and deadline < self._sleep_until:
            self._timer.notify()

    def _timer_loop(self) -> None:
        session = self.session
        while True:
            with self._timer:
                while True:
                    if self._stop:
                        return
                    deadline = session.next_deadline()
                    now = self.clock()
                    if deadline is not None and now >= deadline:
                        break
                    self._sleep_until = float("inf") if deadline is None else deadline
                    self._timer.wait(None if deadline is None else deadline - now)
                self._sleep_until = float("-inf")  # busy: nobody needs to wake us
            with self._dispatching:
                with self._lock:
                    session.handle_timers(self.clock())
                    self._room_changed()
                    self._flush()
                    events = session.events()
                if events:
                    self._dispatch(events)

    def _receiver(self) -> Callable[[int], tuple[list[bytes], object]]:
        """recv(flags) -> (datagrams, sender address): plain, or UDP_GRO runs split up."""
        sock = self.sock
        if not self._gro:
            recvfrom = sock.recvfrom

            def recv(flags: int) -> tuple[list[bytes], object]:
                data, addr = recvfrom(65536, flags)
                return [data], addr

            return recv
        recvmsg, space, stats = sock.recvmsg, socket.CMSG_SPACE(_GRO_SIZE.size), self.stats

        def recv_runs(flags: int) -> tuple[list[bytes], object]:
            data, anc, _flags, addr = recvmsg(65536, space, flags)
            if not anc:
                return [data], addr
            datagrams = split_gro(data, anc)
            if len(datagrams) > 1:
                stats.gro_runs += 1
            return datagrams, addr

        return recv_runs

    def _read_checked(self) -> list[bytes]:
        """One batch: a blocking read, then what else is queued; the sender of each
        datagram is checked, runs coalesced by UDP_GRO are split."""
        stats, dontwait = self.stats, socket.MSG_DONTWAIT
        recv, peer_ok = self._recv, self._peer_ok
        batch: list[bytes] = []
        try:
            datagrams, addr = recv(0)  # blocks; close() wakes it
        except OSError:  # e.g. ICMP port unreachable reported on the socket
            if not self._stop:
                stats.send_errors += 1
            return batch
        if addr in peer_ok:
            batch += datagrams
        elif not self._stop:
            stats.stray += len(datagrams)
        while len(batch) < _RECV_BATCH:  # take what else is already there
            try:
                datagrams, addr = recv(dontwait)
            except BlockingIOError:
                self._queue_drained()
                break
            except OSError:
                stats.send_errors += 1
                continue
            if addr in peer_ok:
                batch += datagrams
            else:
                stats.stray += len(datagrams)
        if self._gro and not stats.gro_runs and stats.datagrams_in > _GRO_PROBE:
            self._gro_off()
        return batch

    def _read_exact(self) -> list[bytes]:
        """One batch from a socket connected to the peer, with UDP_GRO off and no
        datagram of anyone else left in its queue: one recv per datagram, no sender
        address to build and check (about 0.4 us less per datagram)."""
        recv, dontwait = self.sock.recv, socket.MSG_DONTWAIT
        batch: list[bytes] = []
        try:
            batch.append(recv(65536))  # blocks; close() wakes it
        except OSError:
            if not self._stop:
                self.stats.send_errors += 1
            return batch
        self.stats.exact_batches += 1
        while len(batch) < _RECV_BATCH:
            try:
                batch.append(recv(65536, dontwait))
            except BlockingIOError:
                break
            except OSError:
                self.stats.send_errors += 1
        return batch

    def _gro_off(self) -> None:
        """The peer never sends runs that UDP_GRO could hand over whole (a device
        sends one datagram at a time): read one datagram per call instead."""
        try:
            self.sock.setsockopt(_SOL_UDP, _UDP_GRO, 0)
        except OSError:
            return
        log.debug("no coalesced runs in %d datagrams: UDP GRO off", self.stats.datagrams_in)
        self._gro = False  # the reader keeps splitting runs: some may be queued still
        self._settling = True

    def _queue_drained(self) -> None:
        """The socket's queue was empty: what comes next was queued after connect()
        and after UDP_GRO went off, so the exact reader may take over."""
        if self._settling and self._connected and not self._gro:
            self._settling = False
            self._read = self._read_exact
            log.debug("reading the connected socket one datagram per call")

    def _io_loop(self) -> None:
        session, stats = self.session, self.stats
        while True:
            batch = self._read()
            if self._stop:
                return
            if not batch:
                continue
            stats.datagrams_in += len(batch)
            stats.batches += 1
            with self._dispatching:
                with self._lock:
                    now = self.clock()
                    stats.stray += session.receive_datagrams(batch, now)
                    self._room_changed()
                    self._flush()
                    events = session.events()
                    self._wake_locked()
                if events:
                    self._dispatch(events)

    def _wake_receiver(self) -> None:
        """Unblock the I/O thread's recvfrom (after _stop is set)."""
        try:
            connected = self.sock.getpeername() is not None
        except OSError:
            connected = False
        if self.own_socket or connected:
            try:
                self.sock.shutdown(socket.SHUT_RD)  # wakes readers even when it reports ENOTCONN
            except OSError:
                pass
            return
        host, port = self.sock.getsockname()[:2]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke:
            poke.sendto(b"", ("127.0.0.1" if host == "0.0.0.0" else host, port))

    def _dispatch(self, events: list[Event]) -> None:
        bridges = self._bridges
        parts: list[bytes] = []
        cur = None
        for ev in events:
            if type(ev) is DataReceived:
                if ev.realm != cur and parts:
                    self._deliver(cur, parts)
                    parts = []
                cur = ev.realm
                parts.append(ev.data)
                continue
            if parts:
                self._deliver(cur, parts)
                parts, cur = [], None
            if isinstance(ev, RealmConnected):
                bridge = bridges.get(ev.realm)
                if bridge is not None:
                    bridge.set_opened("connected")
            elif isinstance(ev, RealmClosed):
                with self._lock:
                    bridge = bridges.pop(ev.realm, None)
                    if bridge is not None:
                        self._release(bridge)
                if bridge is not None:
                    if ev.reason in ("peer", "local"):
                        bridge.finish()
                    else:
                        bridge.set_opened(ev.reason)
                        bridge.abort()
            elif isinstance(ev, BindRequested):
                self._thread(None, self._bind_requested, ev.realm, ev.port, ev.ip).start()
            elif isinstance(ev, PeerDead):
                if ev.reason == "stall":
                    stalled = self.session.stall_after or 0.0
                    log.warning("peer acknowledged nothing for %.0f s: tunnel dead", stalled)
                else:
                    log.warning("peer silent for %.0f s: tunnel dead", ev.silence)
                self._die()
            if self.on_event is not None:
                try:
                    self.on_event(ev)
                except Exception:
                    log.exception("on_event callback failed")
        if parts:
            self._deliver(cur, parts)

    def _die(self) -> None:
        """The session is over: end every realm's local side and tell on_dead."""
        self.dead.set()
        with self._space:
            dead_bridges = list(self._bridges.values())
            self._bridges.clear()
            self._wake_all_senders()
        for bridge in dead_bridges:
            bridge.set_opened("peer dead")
            bridge.abort()
        if self.on_dead is not None:
            try:
                self.on_dead()
            except Exception:
                log.exception("on_dead callback failed")

    def _guarded(self, loop: Callable[[], None]) -> None:
        """Run a thread's loop; an unexpected error ends the tunnel loudly, not silently."""
        try:
            loop()
        except Exception:
            log.exception("internal error in %s: tunnel closed", threading.current_thread().name)
            self._die()

    def _deliver(self, realm: int | None, parts: list[bytes]) -> None:
        bridge = self._bridges.get(realm) if realm is not None else None
        if bridge is None:
            return
        self.stats.data_in += sum(map(len, parts))
        now = self.clock()
        if bridge.push(parts, now):
            return
        log.warning(
            "realm %08x: local client is not reading (%d bytes queued, no progress for %.1f s),"
            " closing it",
            bridge.realm,
            bridge.queued,
            now - bridge.progress,
        )
        with self._lock:
            self.stats.overflows += 1
            if self._bridges.get(bridge.realm) is bridge:
                del self._bridges[bridge.realm]
            self.session.close_realm(bridge.realm, self.clock())
            self._flush()
            self._release(bridge)
        bridge.abort()


def _shutdown_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


_peer_address = helpers.host_port("127.0.0.1")
_bind_address = helpers.host_port("127.0.0.1", lowest_port=0)  # port 0: any free port


def _mapping(text: str) -> tuple[int, tuple[str, int]]:
    """``PORT=HOST:PORT``: binds for PORT connect to HOST:PORT."""
    port, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PORT=HOST:PORT, got {text!r}")
    return helpers.split_port(port), _peer_address(target)


def _syn_peer(text: str) -> tuple[str, int]:
    """``HOST[:PORT]``; port 0 (or none) is any port of HOST."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 0
    if not host:
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT], got {text!r}")
    return host.strip("[]"), helpers.split_port(port, lowest=0)


def _forwarding(text: str) -> tuple[str, int, int]:
    """``[HOST:]LOCALPORT:REMOTEPORT``; LOCALPORT 0 is any free port."""
    parts = text.rsplit(":", 2)
    if len(parts) < 2:
        raise argparse.ArgumentTypeError(f"expected [HOST:]LOCALPORT:REMOTEPORT, got {text!r}")
    host = parts[0] if len(parts) == 3 else "127.0.0.1"
    return host, helpers.split_port(parts[-2], lowest=0), helpers.split_port(parts[-1])


def _build_parser() -> argparse.ArgumentParser:
    p = helpers.Parser(
        prog="ptcp.py",
        description="Run one end of a bare PTCP tunnel over UDP (no cloud handshake).",
        epilog=EPILOG + " A peer that stays silent counts as unreachable.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    seconds = helpers.positive_seconds
    p.add_argument("--heartbeat", type=seconds, default=5.0, help="heartbeat interval, s")
    p.add_argument("--dead-after", type=seconds, default=60.0, help="peer silence limit, s")
    p.add_argument(
        "--max-data",
        type=helpers.integer_in(1, 0xFFFFFF, "byte count"),
        default=DEFAULT_MAX_DATA,
        help=f"data bytes per body, 1-{0xFFFFFF} ({DEFAULT_MAX_DATA})",
    )
    p.add_argument(
        "--window",
        type=helpers.integer_in(1, MAX_WINDOW, "byte count"),
        default=1 << 20,
        help=f"send window, bytes: at least --max-data + 12, at most {MAX_WINDOW} (1 MiB)",
    )
    p.add_argument(
        "--delayed-ack",
        action="store_true",
        help="one ack per received batch instead of --ack-every (both ends must be ptcp.py)",
    )
    add_wire_arguments(p)
    p.add_argument(
        "--queue",
        type=helpers.integer_in(65536, MAX_WINDOW, "byte count"),
        default=4 << 20,
        help="per-realm queue towards a local client, bytes; past it (or 4x it) a client "
        "that made no progress for --stall-timeout is disconnected",
    )
    p.add_argument("--stall-timeout", type=seconds, default=5.0, help="see --queue, s")
    p.add_argument(
        "--no-gso",
        action="store_true",
        help="send and read datagrams one by one (no Linux UDP segmentation offload)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="play the device: turn binds into local TCP connections")
    s.add_argument("--bind", type=_bind_address, default=("127.0.0.1", 0), help="UDP HOST:PORT")
    s.add_argument(
        "--peer",
        type=_syn_peer,
        help="take the session's SYN only from HOST[:PORT] (any port of HOST without one)",
    )
    s.add_argument(
        "--map",
        type=_mapping,
        action="append",
        default=[],
        metavar="PORT=HOST:PORT",
        help="connect binds for PORT to HOST:PORT (repeatable); unmapped ports are refused",
    )
    c = sub.add_parser("connect", help="play the client: forward local TCP ports to the device")
    c.add_argument(
        "--peer", type=_peer_address, required=True, help="UDP HOST:PORT of the far end"
    )
    c.add_argument("--bind", type=_bind_address, default=("127.0.0.1", 0), help="UDP HOST:PORT")
    c.add_argument(
        "--forward",
        type=_forwarding,
        action="append",
        default=[],
        metavar="[HOST:]LPORT:RPORT",
        help="listen on HOST:LPORT (0 = any free port), forward to remote RPORT (repeatable)",
    )
    c.add_argument("--timeout", type=seconds, default=10.0, help="wait this long for the SYN, s")
    return p


def _session_options(args: argparse.Namespace) -> dict[str, object]:
    return {
        "heartbeat_interval": args.heartbeat,
        "dead_after": args.dead_after,
        "max_data": args.max_data,
        "window_bytes": args.window,
        "delayed_ack": args.delayed_ack,
        **wire_options(args),
    }


def wire_options(args: argparse.Namespace) -> dict[str, object]:
    """Session options of ``--ptcp-ids`` and ``--ack-every`` (PROTOCOLS 2.5, 2.7 (a), (b))."""
    if args.ptcp_ids == IDS_COUNTER:
        # the older public tools, whole: counters, BIND length 0, an ack for every data packet
        options: dict[str, object] = {"ids": IDS_COUNTER, "bind_length": 0, "ack_every": 1}
    else:
        options = {"ids": IDS_CAPTURE, "bind_length": BIND_LENGTH, "ack_every": ACK_EVERY}
    if args.ack_every is not None:
        options["ack_every"] = args.ack_every
    return options


def add_wire_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ptcp-ids capture|counter`` and ``--ack-every N``, shared by ptcp.py and dh_p2p.py."""
    parser.add_argument(
        "--ptcp-ids",
        choices=(IDS_CAPTURE, IDS_COUNTER),
        default=IDS_CAPTURE,
        help="PTCP as a capture of the official app shows it (capture, default: lmid a "
        "millisecond clock, pid 0xFFFF less the bytes received since our last packet, BIND "
        "length 8, an ack for every second data packet) or as the older public tools made "
        "it (counter: counters, BIND length 0, an ack for every data packet)",
    )
    parser.add_argument(
        "--ack-every",
        type=helpers.integer_in(1, MAX_ACK_EVERY, "packet count"),
        metavar="N",
        help=f"acknowledge every Nth in-order data packet, a lone one after "
        f"{ACK_DELAY * 1000:.0f} ms (1-{MAX_ACK_EVERY}; default {ACK_EVERY}, 1 with "
        "--ptcp-ids counter)",
    )


def _tunnel_options(args: argparse.Namespace) -> dict[str, object]:
    return {"queue_bytes": args.queue, "stall_timeout": args.stall_timeout, "gso": not args.no_gso}


def is_syn_from(data: bytes, addr: tuple[str, int], peer: tuple[str, int] | None) -> bool:
    """True for a PTCP SYN from ``peer`` (any sender when None; port 0: any port)."""
    if peer is not None and (addr[0] != peer[0] or peer[1] not in (0, addr[1])):
        return False
    try:
        return isinstance(decode_packet(data).body, Syn)
    except PTCPError:
        return False


def _wait_for_syn(
    sock: socket.socket, peer: tuple[str, int] | None
) -> tuple[bytes, tuple[str, int]]:
    """Device side: skip datagrams until a PTCP SYN arrives (from ``peer`` when given)."""
    while True:
        data, addr = sock.recvfrom(65536)
        if is_syn_from(data, addr, peer):
            return data, addr
        log.info("ignoring a datagram from %s:%d: not a PTCP SYN from the peer", *addr)


def _on_signals(handler: Callable[..., None]) -> None:
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run_until(stop: threading.Event, tunnel: PTCPTunnel) -> int:
    _on_signals(lambda *_: stop.set())
    stop.wait()
    dead = tunnel.dead.is_set()
    tunnel.close()
    log.info("tunnel %s; session %s", tunnel.stats, tunnel.session.stats)
    return ExitCode.UNREACHABLE if dead else ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.window < args.max_data + 12:
        parser.error(f"--window must be at least --max-data + 12 ({args.max_data + 12})")
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[
        min(args.verbose, 2)
    ]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    _on_signals(_interrupt)  # until the tunnel runs, a signal just ends the wait
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(args.bind)
        host, port = sock.getsockname()[:2]
        print(f"ptcp: udp {host}:{port}", flush=True)
        if args.cmd == "serve":
            mapping = dict(args.map)

            def on_bind(rport: int, _ip: str) -> socket.socket | None:
                target = mapping.get(rport)
                return None if target is None else socket.create_connection(target, timeout=5)

            peer = args.peer
            if peer is not None:  # compare with what recvfrom reports: a resolved address
                peer = (socket.gethostbyname(peer[0]), peer[1])
            first, peer = _wait_for_syn(sock, peer)
            now = time.monotonic()
            session = Session(now=now, **_session_options(args))  # type: ignore[arg-type]
            session.receive_datagram(first, now)
            session.events()
            session.send_syn(now)
            tunnel = PTCPTunnel(
                sock, peer, session, on_bind=on_bind, on_dead=stop.set, **_tunnel_options(args)
            )
            tunnel.start()
            print(f"ptcp: session with {peer[0]}:{peer[1]}", flush=True)
            return _run_until(stop, tunnel)
        up = threading.Event()
        tunnel = PTCPTunnel(
            sock,
            args.peer,
            on_event=lambda ev: up.set() if isinstance(ev, SynReceived) else None,
            on_dead=stop.set,
            **_tunnel_options(args),
            **_session_options(args),
        )
        tunnel.start()
        tunnel.send_syn()
        try:
            answered = up.wait(args.timeout)
        except KeyboardInterrupt:
            tunnel.close(timeout=0)
            return ExitCode.OK
        if not answered:
            log.error("no SYN from %s:%d within %.0f s", *args.peer, args.timeout)
            tunnel.close(timeout=0)
            return ExitCode.UNREACHABLE
        for lhost, lport, rport in args.forward:
            h, p = tunnel.listen(rport, lport, lhost)
            print(f"ptcp: forwarding {h}:{p} -> remote port {rport}", flush=True)
        return _run_until(stop, tunnel)
    except KeyboardInterrupt:
        return ExitCode.OK
    except OSError as exc:
        log.error("%s", exc)
        return ExitCode.ERROR
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
