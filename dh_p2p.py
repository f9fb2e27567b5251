#!/usr/bin/env python3
"""Reach a Dahua (or rebranded) device by serial number through Easy4IPCloud
and forward local TCP ports to it over a PTCP tunnel (PROTOCOLS 2).

The cloud handshake (PROTOCOLS 2.2-2.4) is the sans-IO :class:`Handshake`:
feed it datagrams and the time, collect datagrams to send.  The PTCP session it
opens is handed to ``ptcp.PTCPTunnel``, which bridges every accepted local TCP
client to its own realm.  The driver at the bottom owns sockets, threads,
signals and the reconnect loop.

Example::

    dh_p2p.py -u admin --password secret ABCDEF0123456789
    ffplay "rtsp://admin:secret@127.0.0.1:554/cam/realmonitor?channel=1&subtype=0"
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import argtypes
import helpers
import ptcp
from helpers import P2PProtocolError

log = logging.getLogger("dh_p2p")

NAT_INFO = b"Server Nat Info!"
DEVICE_VERSION = "5.0.0"

# socket names used by Handshake outputs
MAIN = "S"  # main server, then the device (PROTOCOLS 2.2: same local port for both)
P2PSRV = "P"  # the P2P server (step 3: a socket of its own)
RELAY = "R"  # relay server and relay agent; the tunnel in relay mode

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_OFFLINE = 3
EXIT_AUTH = 4
EXIT_UNREACHABLE = 5


class HandshakeError(Exception):
    """The handshake failed; ``kind`` is offline, auth, unreachable, timeout or punch."""

    def __init__(self, message: str, kind: str = "timeout") -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------
# Handshake state (sans-IO): PROTOCOLS 2.2 - 2.4
# ---------------------------------------------------------------------------


@dataclass
class Retry:
    """Retransmission schedule: first retry after ``initial`` s, doubling up to ``cap``."""

    initial: float = 0.5
    cap: float = 4.0
    give_up: float = 15.0


@dataclass
class _Pending:
    sock: str
    addr: tuple[str, int]
    data: bytes
    cseq: int
    started: float
    next_at: float
    interval: float
    what: str
    provisional: bool = False


@dataclass
class Established:
    """A finished handshake: the PTCP session and where it runs."""

    path: str  # "direct" or "relay"
    sock: str  # MAIN or RELAY
    peer: tuple[str, int]
    session: ptcp.Session
    token: str | None = None
    relay_addr: tuple[str, int] | None = None
    relay_cseq: int = 1  # the next CSeq on the relay socket (for /relay/unbind)


@dataclass
class Handshake:
    """Client side of the Easy4IPCloud handshake (sans-IO).

    Call :meth:`start`, then feed every datagram to :meth:`receive` and call
    :meth:`handle_timers` at :meth:`next_deadline`; after each call send
    :meth:`datagrams_to_send` (``(socket name, address, bytes)``).  Finished when
    :attr:`result` (an :class:`Established`) or :attr:`error` is set.
    ``local_addr`` is the address of socket ``S`` (sent as LocalAddr).
    """

    serial: str
    cloud: tuple[str, int]
    local_addr: tuple[str, int]
    mode: str = "auto"  # auto, direct, relay
    cloud_user: str = helpers.DEFAULT_CLOUD_USER
    cloud_key: str = helpers.DEFAULT_CLOUD_KEY
    username: str | None = None
    password: str | None = None
    retry: Retry = field(default_factory=Retry)
    punch_timeout: float = 5.0
    session_options: dict = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.SystemRandom)

    result: Established | None = None
    error: HandshakeError | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "direct", "relay"):
            raise ValueError(f"mode must be auto, direct or relay, not {self.mode!r}")
        self.state = "idle"
        self._out: list[tuple[str, tuple[str, int], bytes]] = []
        self._pending: dict[str, _Pending] = {}  # key: step name
        self._cseq: dict[str, int] = {}
        self.identify = bytes(self.rng.getrandbits(8) for _ in range(8))
        self.randsalt: str | None = None
        self.key: bytes | None = None
        self.nonce: int | None = None
        self.p2p_addr: tuple[str, int] | None = None
        self.relay_addr: tuple[str, int] | None = None
        self.agent_addr: tuple[str, int] | None = None
        self.token: str | None = None
        self.relay_started = False
        self.channel_reply: helpers.Reply | None = None
        self.device_pub: tuple[str, int] | None = None
        self.device_local: tuple[str, int] | None = None
        self.device_nonce: int | None = None
        self.nat_info = False
        self.sign: bytes | None = None
        self.agent_session: ptcp.Session | None = None
        self.device_session: ptcp.Session | None = None
        self.device_peer: tuple[str, int] | None = None
        self.punch_cookie = bytes(self.rng.getrandbits(8) for _ in range(4))
        self.punch_tid = bytes(self.rng.getrandbits(8) for _ in range(12))
        self.device_tid: tuple[tuple[str, int], bytes] | None = None
        self._punch_deadline = 0.0
        self._punch_next = 0.0
        self._punch_interval = self.retry.initial
        self._sign_step = ""
        self._step_deadline: float | None = None

    @property
    def has_credentials(self) -> bool:
        return self.username is not None and self.password is not None

    # -- output ---------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[str, tuple[str, int], bytes]]:
        """Datagrams produced since the last call: (socket name, address, bytes)."""
        out, self._out = self._out, []
        return out

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    # -- requests ---------------------------------------------------------------

    def _request(
        self, key: str, sock: str, addr: tuple[str, int], path: str, now: float, body=None
    ) -> None:
        cseq = self._cseq[sock] = self._cseq.get(sock, 0) + 1  # counted per socket
        data = helpers.build_request(
            path, cseq, body=body, cloud_user=self.cloud_user, cloud_key=self.cloud_key
        )
        what = path.replace(self.token, "{token}") if self.token else path  # keep it out of logs
        self._pending[key] = _Pending(
            sock, addr, data, cseq, now, now + self.retry.initial, self.retry.initial, what
        )
        self._out.append((sock, addr, data))
        log.debug("-> %s", key)  # not the path: relay paths carry the token

    def _match(self, sock: str, reply: helpers.Reply) -> str | None:
        candidates = [k for k, p in self._pending.items() if p.sock == sock]
        if reply.cseq is not None:
            candidates = [k for k in candidates if self._pending[k].cseq == reply.cseq]
        return candidates[0] if candidates else None

    def _fail(self, message: str, kind: str) -> None:
        if self.error is None and self.result is None:
            self.error = HandshakeError(message, kind)
            self.state = "failed"
            self._pending.clear()
            log.debug("handshake failed: %s", message)

    # -- flow -----------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin with ``/probe/p2psrv`` on the main server."""
        self.state = "signalling"
        self._request("probe", MAIN, self.cloud, "/probe/p2psrv", now)

    def receive(self, sock: str, addr: tuple[str, int], data: bytes, now: float) -> None:
        """Feed one datagram received on socket ``sock`` from ``addr``."""
        if self.done:
            return
        if data[:4] == b"PTCP":
            self._on_ptcp(sock, addr, data, now)
            return
        if sock == RELAY and data == NAT_INFO:
            self.nat_info = True
            self._advance(now)
            return
        if data[:5] == b"HTTP/":
            try:
                reply = helpers.parse_reply(data)
            except P2PProtocolError as exc:
                log.info("ignoring malformed reply on %s from %s: %s", sock, addr, exc)
                return
            key = self._match(sock, reply)
            if key is None:
                log.debug("ignoring unexpected reply %d on %s", reply.code, sock)
                return
            if reply.provisional:
                self._pending[key].provisional = True
                return
            del self._pending[key]
            self._on_reply(key, reply, now)
            return
        if sock == MAIN:
            try:
                msg = helpers.parse_punch(data)
            except P2PProtocolError:
                log.debug("ignoring stray datagram on %s from %s", sock, addr)
                return
            self._on_punch(addr, msg, now)
            return
        log.debug("ignoring stray datagram on %s from %s", sock, addr)

    def _on_reply(self, key: str, reply: helpers.Reply, now: float) -> None:
        sn = self.serial
        try:
            if key == "probe":
                if not reply.ok:
                    return self._fail(f"cloud refused /probe/p2psrv ({reply.code})", "unreachable")
                self._request("online", MAIN, self.cloud, f"/online/p2psrv/{sn}", now)
            elif key == "online":
                if reply.code == 404:
                    return self._fail(f"device {sn} is unknown or offline", "offline")
                if not reply.ok:
                    return self._fail(f"cloud error {reply.code} {reply.reason}", "cloud")
                self.p2p_addr = helpers.parse_host_port(reply.fields.get("US", ""))
                if self.has_credentials:
                    self._request("info", MAIN, self.cloud, f"/info/device/{sn}", now)
                else:
                    self._request("probe_device", P2PSRV, self.p2p_addr, f"/probe/device/{sn}", now)
            elif key == "info":
                if reply.ok:
                    try:
                        self.randsalt = helpers.decrypt_info(reply.fields.get("Info", "")).get(
                            "randsalt"
                        )
                    except P2PProtocolError as exc:
                        log.info("device info unreadable (%s); using the default salt", exc)
                assert self.p2p_addr is not None
                self._request("probe_device", P2PSRV, self.p2p_addr, f"/probe/device/{sn}", now)
            elif key == "probe_device":
                if reply.code == 404:
                    return self._fail(f"device {sn} is unknown or offline", "offline")
                self._request("online_relay", MAIN, self.cloud, "/online/relay", now)
            elif key == "online_relay":
                if not reply.ok:
                    return self._fail(f"no relay server ({reply.code})", "cloud")
                self.relay_addr = helpers.parse_host_port(reply.fields.get("Address", ""))
                self._send_p2p_channel(now)
                self._request("relay_agent", RELAY, self.relay_addr, "/relay/agent", now)
            elif key == "relay_agent":
                if not reply.ok:
                    return self._fail(f"relay server refused ({reply.code})", "cloud")
                self.token = reply.fields.get("Token", "")
                self.agent_addr = helpers.parse_host_port(reply.fields.get("Agent", ""))
                if not self.token:
                    raise P2PProtocolError("relay reply without a Token")
                body = "<body><Client>:0</Client></body>"
                path = f"/relay/start/{self.token}"
                self._request("relay_start", RELAY, self.agent_addr, path, now, body)
            elif key == "relay_start":
                if not reply.ok:
                    return self._fail(f"relay agent refused ({reply.code})", "cloud")
                self.relay_started = True
            elif key == "p2p_channel":
                self._on_channel_reply(reply)
            elif key == "relay_channel":
                if reply.code == 403:
                    return self._auth_failed(reply)
                if not reply.ok:
                    return self._fail(f"relay-channel refused ({reply.code})", "cloud")
            elif key == "unbind":
                pass
        except P2PProtocolError as exc:
            return self._fail(f"bad reply to {key}: {exc}", "cloud")
        self._advance(now)

    def _auth_failed(self, reply: helpers.Reply) -> None:
        if not self.has_credentials:
            self._fail(
                "the device wants its own login for P2P: pass -u USER and --password PASS "
                "(or set DH_P2P_USERNAME and DH_P2P_PASSWORD)",
                "auth",
            )
        else:
            self._fail(f"the device refused the credentials ({reply.reason})", "auth")

    def _send_p2p_channel(self, now: float) -> None:
        local = f"{self.local_addr[0]}:{self.local_addr[1]}"
        ident = helpers.format_identify(self.identify)
        if self.has_credentials:
            assert self.username is not None and self.password is not None
            self.key = helpers.device_key(self.username, self.password, self.randsalt)
            self.nonce = self.rng.randrange(2**31)
            enc = helpers.encrypt_local_addr(self.key, self.nonce, local)
            auth = helpers.dev_auth_xml(
                self.key, self.username, self.nonce, int(time.time()), enc, self.randsalt
            )
            body = (
                f"<body>{auth}<Identify>{ident}</Identify><IpEncrptV2>true</IpEncrptV2>"
                f"<LocalAddr>{enc}</LocalAddr><version>{DEVICE_VERSION}</version></body>"
            )
        else:
            body = (
                f"<body><Identify>{ident}</Identify><IpEncrpt>true</IpEncrpt>"
                f"<LocalAddr>{local}</LocalAddr><version>{DEVICE_VERSION}</version></body>"
            )
        path = f"/device/{self.serial}/p2p-channel"
        self._request("p2p_channel", MAIN, self.cloud, path, now, body)

    def _on_channel_reply(self, reply: helpers.Reply) -> None:
        if reply.code == 403:
            return self._auth_failed(reply)
        if reply.code == 404:
            return self._fail(f"device {self.serial} is offline", "offline")
        if not reply.ok:
            return self._fail(f"p2p-channel refused ({reply.code} {reply.reason})", "cloud")
        fields = reply.fields
        self.device_pub = helpers.parse_host_port(fields.get("PubAddr", ""))
        local = fields.get("LocalAddr", "")
        if self.key is not None and "Nonce" in fields:
            try:
                self.device_nonce = int(fields["Nonce"])
            except ValueError as exc:
                raise P2PProtocolError("non-numeric device Nonce") from exc
            local = helpers.decrypt_local_addr(self.key, self.device_nonce, local)
        self.device_local = helpers.parse_host_port(local) if local else self.device_pub
        self.channel_reply = reply

    def _advance(self, now: float) -> None:
        """Start whatever the facts gathered so far allow."""
        if self.done:
            return
        if (
            self.channel_reply is not None
            and self.relay_started
            and "relay_channel" not in self._pending
            and self.state == "signalling"
        ):
            self.state = "relay_channel"
            auth = ""
            if self.key is not None and self.username is not None:
                # PROTOCOLS 2.4: relay-channel signs an empty payload with the reply's nonce
                nonce = self.device_nonce if self.device_nonce is not None else self.nonce
                auth = helpers.dev_auth_xml(
                    self.key, self.username, int(nonce or 0), int(time.time()), "", self.randsalt
                )
            assert self.agent_addr is not None
            agent = f"{self.agent_addr[0]}:{self.agent_addr[1]}"
            body = f"<body>{auth}<agentAddr>{agent}</agentAddr></body>"
            path = f"/device/{self.serial}/relay-channel"
            self._request("relay_channel", RELAY, self.cloud, path, now, body)
            self._step_deadline = now + self.retry.give_up
        if self.state == "relay_channel" and self.nat_info:
            # PROTOCOLS 2.2 step 9: SYN and 17 00*11 to the agent; its answer holds the sign.
            self.state = "sign"
            self.agent_session = self._new_session(now)
            self.agent_session.send_syn(now)
            self.agent_session.send_command(0x17, b"", now)
            self._flush_session(RELAY, self.agent_addr, self.agent_session)
        if self.state == "sign" and self.sign is not None:
            if self.mode == "relay":
                self._start_relay_tunnel(now)
            else:
                self._start_punch(now)

    def _new_session(self, now: float) -> ptcp.Session:
        options = {"initial_rto": self.retry.initial, "max_rto": self.retry.cap}
        options.update(self.session_options)
        return ptcp.Session(now=now, **options)

    def _flush_session(self, sock: str, addr, session: ptcp.Session | None) -> None:
        if session is None or addr is None:
            return
        for data in session.datagrams_to_send():
            self._out.append((sock, addr, data))

    # -- sign exchange on a PTCP session --------------------------------------

    def _start_relay_tunnel(self, now: float) -> None:
        self.state = "relay_sign"
        self._sign_step = "19"
        self._step_deadline = now + self.retry.give_up
        assert self.agent_session is not None and self.sign is not None
        self.agent_session.send_command(0x19, self.sign, now)
        self._flush_session(RELAY, self.agent_addr, self.agent_session)

    def _on_ptcp(self, sock: str, addr, data: bytes, now: float) -> None:
        if sock == RELAY and self.agent_session is not None:
            session, peer = self.agent_session, self.agent_addr
        elif sock == MAIN and self.device_session is not None and addr == self.device_peer:
            session, peer = self.device_session, self.device_peer
        else:
            log.debug("ignoring PTCP on %s from %s", sock, addr)
            return
        try:
            session.receive_datagram(data, now)
        except ptcp.PTCPError as exc:
            log.info("ignoring bad PTCP datagram: %s", exc)
            return
        for event in session.events():
            if isinstance(event, ptcp.CommandReceived):
                self._on_command(session, event, now)
        self._flush_session(sock, peer, session)
        self._check_open(now)
        self._advance(now)

    def _on_command(self, session: ptcp.Session, event: ptcp.CommandReceived, now: float) -> None:
        if session is self.agent_session and self.state == "sign" and event.payload:
            self.sign = event.payload
        elif event.body_type == 0x1A and self._sign_step == "19":
            # PROTOCOLS 2.2 step 10: 1a from the peer, we answer 1b and wait for its ack.
            self._sign_step = "1b"
            session.send_command(0x1B, b"", now)

    def _check_open(self, now: float) -> None:
        if self._sign_step != "1b":
            return
        if self.state == "relay_sign":
            session, sock, peer, path = self.agent_session, RELAY, self.agent_addr, "relay"
        else:
            session, sock, peer, path = self.device_session, MAIN, self.device_peer, "direct"
        if session is not None and peer is not None and session.unacked_bytes == 0:
            self.state = "open"
            self._pending.clear()
            self.result = Established(
                path,
                sock,
                peer,
                session,
                self.token,
                self.relay_addr,
                self._cseq.get(RELAY, 0) + 1,
            )

    # -- hole punch (PROTOCOLS 2.3) ------------------------------------------

    def _punch_targets(self) -> list[tuple[str, int]]:
        targets = []
        for addr in (self.device_pub, self.device_local):
            if addr is not None and addr not in targets:
                targets.append(addr)
        return targets

    def _start_punch(self, now: float) -> None:
        self.state = "punch"
        self._step_deadline = None  # the punch has its own silence limit
        self._punch_deadline = now + self.punch_timeout
        self._punch_interval = self.retry.initial
        self._send_punches(now)
        if self.device_tid is not None:  # the device punched first
            addr, tid = self.device_tid
            self._answer_punch(addr, tid, now)

    def _send_punches(self, now: float) -> None:
        assert self.device_pub is not None
        msg = helpers.build_punch_request(
            self.identify,
            self.device_pub,
            cookie=self.punch_cookie,
            transaction_id=self.punch_tid,
        )
        for target in self._punch_targets():
            self._out.append((MAIN, target, msg.to_wire()))
        self._punch_next = now + self._punch_interval
        self._punch_interval = min(self._punch_interval * 2, self.retry.cap)

    def _on_punch(self, addr, msg: helpers.StunMessage, now: float) -> None:
        if self.state not in ("punch", "direct_sign"):
            # early: remember the device's transaction id for when punching starts
            if self.device_tid is None:
                self.device_tid = (addr, msg.transaction_id)
            return
        if self.state == "punch":
            self._answer_punch(addr, msg.transaction_id, now)
        # later punch datagrams are skipped (PROTOCOLS 2.3)

    def _answer_punch(self, addr, tid: bytes, now: float) -> None:
        assert self.device_local is not None and self.sign is not None
        answer = helpers.build_punch_response(
            self.identify, self.device_local, self.punch_cookie, tid
        )
        self._out.append((MAIN, addr, answer.to_wire()))
        self.state = "direct_sign"
        self.device_peer = addr
        self._step_deadline = now + self.retry.give_up
        self._sign_step = "19"
        self.device_session = self._new_session(now)
        self.device_session.send_syn(now)
        self.device_session.send_command(0x19, self.sign, now)
        self._flush_session(MAIN, addr, self.device_session)

    def _punch_failed(self, now: float) -> None:
        if self.mode == "auto":
            log.info("hole punch failed; using the relay")
            self.device_session = None
            self._start_relay_tunnel(now)
        else:
            self._fail("hole punching failed (no answer from the device); try --relay", "punch")

    # -- timers -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Earliest time :meth:`handle_timers` has work to do."""
        if self.done:
            return None
        times = [p.next_at for p in self._pending.values() if not p.provisional]
        times += [p.started + self.retry.give_up for p in self._pending.values()]
        if self.state == "punch":
            times += [self._punch_next, self._punch_deadline]
        if self._step_deadline is not None:
            times.append(self._step_deadline)
        for session in (self.agent_session, self.device_session):
            if session is not None:
                deadline = session.next_deadline()
                if deadline is not None:
                    times.append(deadline)
        return min(times) if times else None

    def handle_timers(self, now: float) -> None:
        """Retransmit requests and punches, give up on silent steps."""
        if self.done:
            return
        for key, p in list(self._pending.items()):
            if now >= p.started + self.retry.give_up:
                if key == "probe":
                    return self._fail(
                        f"no answer from the cloud at {self.cloud[0]}:{self.cloud[1]}",
                        "unreachable",
                    )
                return self._fail(f"no answer to {p.what}", "timeout")
            if not p.provisional and now >= p.next_at:
                self._out.append((p.sock, p.addr, p.data))
                p.interval = min(p.interval * 2, self.retry.cap)
                p.next_at = now + p.interval
        if self.state == "punch":
            if now >= self._punch_deadline:
                self._punch_failed(now)
            elif now >= self._punch_next:
                self._send_punches(now)
        if self._step_deadline is not None and now >= self._step_deadline and not self.done:
            if self.state == "direct_sign" and self.mode == "auto":
                self._step_deadline = None
                self._punch_failed(now)
            else:
                return self._fail(f"handshake stalled in step {self.state}", "timeout")
        for sock, addr, session in (
            (RELAY, self.agent_addr, self.agent_session),
            (MAIN, self.device_peer, self.device_session),
        ):
            if session is not None:
                session.handle_timers(now)
                session.events()
                self._flush_session(sock, addr, session)


def unbind_request(token: str, cseq: int, cloud_user: str, cloud_key: str) -> bytes:
    """``/relay/unbind/{token}`` for the relay server (relay-mode teardown)."""
    return helpers.build_request(
        f"/relay/unbind/{token}", cseq, cloud_user=cloud_user, cloud_key=cloud_key
    )


# ---------------------------------------------------------------------------
# Command line parsing (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """A local listener forwarded to a device port."""

    bind: str
    local: int
    remote: int
    explicit: bool = True


def parse_forward(text: str) -> Forward:
    """``[BIND:]LOCAL:REMOTE`` -> Forward; raises ValueError."""
    parts = text.rsplit(":", 2)
    if len(parts) == 2:
        bind, local, remote = "127.0.0.1", parts[0], parts[1]
    elif len(parts) == 3:
        bind, local, remote = parts
        if ":" in bind and not (bind.startswith("[") and bind.endswith("]")):
            raise ValueError(f"expected [BIND:]LOCAL:REMOTE, got {text!r}")
        bind = bind.strip("[]") or "127.0.0.1"
    else:
        raise ValueError(f"expected [BIND:]LOCAL:REMOTE, got {text!r}")
    try:
        return Forward(bind, argtypes.split_port(local, lowest=0), argtypes.split_port(remote))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{exc} in {text!r}") from None


def parse_cloud(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (default port 8800)."""
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, helpers.DEFAULT_CLOUD_PORT
    if not host:
        raise ValueError(f"expected HOST[:PORT], got {text!r}")
    try:
        return host, argtypes.split_port(port)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{exc} in {text!r}") from None


def rtsp_url(host: str, port: int, user: str | None, password: str | None, channel=1, sub=0):
    """The Dahua RTSP URL through the tunnel (PROTOCOLS 2.6)."""
    auth = ""
    if user:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        auth += "@"
    hostport = host if port == 554 else f"{host}:{port}"
    return f"rtsp://{auth}{hostport}/cam/realmonitor?channel={channel}&subtype={sub}"


def parse_channel_titles(text: str) -> dict[int, str]:
    """``table.ChannelTitle[0].Name=Front`` lines -> {1: "Front"} (channels count from 1)."""
    titles: dict[int, str] = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if not eq or not key.startswith("table.ChannelTitle[") or not key.endswith("].Name"):
            continue
        index = key[len("table.ChannelTitle[") : -len("].Name")]
        if index.isdigit():
            titles[int(index) + 1] = value
    return titles


# ---------------------------------------------------------------------------
# Driver: sockets, threads, signals, reconnects
# ---------------------------------------------------------------------------


class Client:
    """Runs handshakes and tunnels; listeners stay open across reconnects."""

    fallback_port = 1554  # for the default 554 forward when binding 554 is not permitted

    def __init__(self, args: argparse.Namespace, cloud: tuple[str, int]) -> None:
        self.args = args
        self.cloud = cloud
        self.stop = threading.Event()
        self.tunnel: ptcp.PTCPTunnel | None = None
        self.established: Established | None = None
        self.cond = threading.Condition()
        self.listeners: list[tuple[socket.socket, Forward]] = []
        self.ready_printed = False
        self.relay_sock: socket.socket | None = None

    # -- handshake driver -----------------------------------------------------

    def _resolve(self, addr: tuple[str, int]) -> tuple[str, int]:
        host, port = addr
        try:
            return socket.gethostbyname(host), port
        except OSError as exc:
            raise HandshakeError(f"cannot resolve {host}: {exc}", "unreachable") from exc

    def handshake(self) -> tuple[Established, dict[str, socket.socket]]:
        """Run one handshake to completion; raises HandshakeError."""
        socks = {}
        for name in (MAIN, P2PSRV, RELAY):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0" if self.args.bind_any else "127.0.0.1", 0))
            socks[name] = s
        try:
            local = socks[MAIN].getsockname()
            hs = Handshake(
                self.args.serial,
                self._resolve(self.cloud),
                local,
                mode=self.args.mode,
                cloud_user=self.args.cloud_user,
                cloud_key=self.args.cloud_key,
                username=self.args.user,
                password=self.args.password,
                retry=Retry(give_up=self.args.timeout),
                punch_timeout=self.args.punch_timeout,
                session_options={"dead_after": self.args.peer_timeout},
            )
            hs.start(time.monotonic())
            by_fd = {s.fileno(): name for name, s in socks.items()}
            while not hs.done:
                if self.stop.is_set():
                    raise HandshakeError("interrupted", "stopped")
                for name, addr, data in hs.datagrams_to_send():
                    try:
                        socks[name].sendto(data, addr)
                    except OSError as exc:
                        log.debug("send to %s failed: %s", addr, exc)
                now = time.monotonic()
                deadline = hs.next_deadline()
                wait = 0.2 if deadline is None else min(0.2, max(0.0, deadline - now))
                ready, _, _ = select.select(list(socks.values()), [], [], wait)
                for s in ready:
                    try:
                        data, addr = s.recvfrom(65536)
                    except OSError:
                        continue
                    hs.receive(by_fd[s.fileno()], addr, data, time.monotonic())
                hs.handle_timers(time.monotonic())
            for name, addr, data in hs.datagrams_to_send():
                try:
                    socks[name].sendto(data, addr)
                except OSError:
                    pass
            if hs.error is not None:
                raise hs.error
            assert hs.result is not None
            return hs.result, socks
        except BaseException:
            for s in socks.values():
                s.close()
            raise

    # -- tunnel ---------------------------------------------------------------

    def open_listeners(self, forwards: list[Forward]) -> None:
        for fwd in forwards:
            try:
                lst = socket.create_server((fwd.bind, fwd.local))
            except PermissionError:
                if fwd.explicit:
                    raise
                fallback = Forward(fwd.bind, self.fallback_port, fwd.remote, False)
                print(
                    f"notice: port {fwd.local} is not permitted; "
                    f"listening on {fallback.local} instead",
                    file=sys.stderr,
                    flush=True,
                )
                lst = socket.create_server((fallback.bind, fallback.local))
                fwd = fallback
            host, port = lst.getsockname()[:2]
            self.listeners.append((lst, Forward(host, port, fwd.remote, fwd.explicit)))
            threading.Thread(target=self._accept_loop, args=(lst, fwd.remote), daemon=True).start()

    def _accept_loop(self, lst: socket.socket, remote: int) -> None:
        while not self.stop.is_set():
            try:
                client, _ = lst.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, remote), daemon=True).start()

    def _serve(self, client: socket.socket, remote: int) -> None:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.stop.is_set() or self.tunnel is not None, timeout=60
            )
            tunnel = self.tunnel
        if not ok or tunnel is None or self.stop.is_set():
            client.close()
            return
        try:
            host, port = client.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "a local client"
        try:
            realm = tunnel.forward(client, remote)
        except ptcp.PTCPError as exc:
            log.warning("connection to device port %d failed: %s", remote, exc)
            return
        log.info("%s -> device port %d on realm %08x", peer, remote, realm)

    @staticmethod
    def _on_event(event: ptcp.Event) -> None:
        # who ended a connection: "peer" is the device (its service closed), "local" is us
        if isinstance(event, ptcp.RealmClosed):
            log.info("realm %08x closed (%s)", event.realm, event.reason)

    def _on_dead(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def run(self) -> int:
        backoff = 1.0
        attempts = 0
        while not self.stop.is_set():
            try:
                est, socks = self.handshake()
            except HandshakeError as exc:
                if exc.kind == "stopped":
                    break
                attempts += 1
                fatal = exc.kind in ("auth",) or (
                    not self.ready_printed and attempts > self.args.retries
                )
                if fatal:
                    print(f"dh_p2p: {exc}", file=sys.stderr, flush=True)
                    return {
                        "auth": EXIT_AUTH,
                        "offline": EXIT_OFFLINE,
                        "unreachable": EXIT_UNREACHABLE,
                    }.get(exc.kind, EXIT_ERROR)
                # before the first success only the final error line is shown by default
                level = logging.WARNING if self.ready_printed else logging.INFO
                log.log(level, "handshake failed (%s); retrying in %.0f s", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            attempts = 0
            self._run_tunnel(est, socks)
        return EXIT_OK

    def _run_tunnel(self, est: Established, socks: dict[str, socket.socket]) -> None:
        sock = socks[est.sock]
        tunnel = ptcp.PTCPTunnel(
            sock,
            est.peer,
            est.session,
            on_dead=self._on_dead,
            on_event=self._on_event,
            own_socket=False,
            gso=not self.args.no_gso,
        ).start()
        log.info("tunnel open (%s) to %s", est.path, est.peer)
        with self.cond:
            self.tunnel = tunnel
            self.established = est
            self.cond.notify_all()
        if not self.ready_printed:
            self.ready_printed = True
            self._print_ready(est)
        else:
            print(f"reconnected ({est.path})", flush=True)
        with self.cond:
            self.cond.wait_for(lambda: self.stop.is_set() or tunnel.dead.is_set())
            self.tunnel = None
        if tunnel.dead.is_set() and not self.stop.is_set():
            log.warning("session with the device died; reconnecting")
        tunnel.close()
        if est.path == "relay" and est.token and est.relay_addr:
            try:
                socks[RELAY].sendto(
                    unbind_request(
                        est.token, est.relay_cseq, self.args.cloud_user, self.args.cloud_key
                    ),
                    est.relay_addr,
                )
            except OSError:
                pass
        for s in socks.values():
            s.close()

    def _print_ready(self, est: Established) -> None:
        lines = []
        for _lst, fwd in self.listeners:
            lines.append(f"forwarding {fwd.bind}:{fwd.local} -> device port {fwd.remote}")
            if fwd.remote == 554:
                host = "127.0.0.1" if fwd.bind in ("0.0.0.0", "") else fwd.bind
                url = rtsp_url(host, fwd.local, self.args.user, None)
                lines.append(f"RTSP: {url}")
        for line in lines:
            print(line, flush=True)
        print(f"ready: {est.path} tunnel to {self.args.serial}", flush=True)
        if self.args.channels:
            threading.Thread(target=self._print_channels, daemon=True).start()

    def _print_channels(self) -> None:
        import requests
        from requests.auth import HTTPDigestAuth

        http = next((f for _, f in self.listeners if f.remote == 80), None)
        rtsp = next((f for _, f in self.listeners if f.remote == 554), None)
        if http is None:
            print("channels: no forward to device port 80 (add -p LOCAL:80)", flush=True)
            return
        url = (
            f"http://{http.bind}:{http.local}/cgi-bin/configManager.cgi"
            "?action=getConfig&name=ChannelTitle"
        )
        auth = HTTPDigestAuth(self.args.user or "admin", self.args.password or "")
        try:
            reply = requests.get(url, auth=auth, timeout=15)
        except requests.RequestException as exc:
            print(f"channels: HTTP request failed: {exc}", flush=True)
            return
        if reply.status_code != 200:
            print(f"channels: device answered HTTP {reply.status_code}", flush=True)
            return
        titles = parse_channel_titles(reply.text)
        for number, title in sorted(titles.items()):
            print(f"channel {number}: {title}", flush=True)
            if rtsp is not None:
                for sub, label in ((0, "main"), (1, "sub")):
                    url = rtsp_url(rtsp.bind, rtsp.local, self.args.user, None, number, sub)
                    print(f"  {label}: {url}", flush=True)
        print(f"channels: {len(titles)}", flush=True)

    def shutdown(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()
        for lst, _ in self.listeners:
            try:
                lst.close()
            except OSError:
                pass


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argtypes.Parser(
        prog="dh_p2p.py",
        description="Forward local TCP ports to a Dahua device reached by serial number "
        "through the Easy4IPCloud P2P service.",
        epilog="Secrets may come from DH_P2P_USERNAME, DH_P2P_PASSWORD, DH_P2P_CLOUD_USER and "
        "DH_P2P_CLOUD_KEY. Exit codes: 0 ok, 1 error, 2 usage, 3 device offline/unknown, "
        "4 device credentials needed or refused, 5 cloud unreachable.",
    )
    p.add_argument("serial", help="the device's serial number")
    p.add_argument(
        "-p",
        "--port",
        action="append",
        default=[],
        metavar="[BIND:]LOCAL:REMOTE",
        help="forward BIND:LOCAL to device port REMOTE (repeatable; default 127.0.0.1:554:554, "
        "falling back to 1554 when 554 is not permitted)",
    )
    p.add_argument("-u", "--user", default=env("DH_P2P_USERNAME"), help="device user name")
    p.add_argument(
        "--password", default=env("DH_P2P_PASSWORD"), help="device password (or DH_P2P_PASSWORD)"
    )
    p.add_argument("--password-file", metavar="PATH", help="read --password from this file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--direct", dest="mode", action="store_const", const="direct")
    mode.add_argument("--relay", dest="mode", action="store_const", const="relay")
    p.set_defaults(mode="auto")
    p.add_argument(
        "--cloud",
        default=f"{helpers.DEFAULT_CLOUD_HOST}:{helpers.DEFAULT_CLOUD_PORT}",
        help="main cloud server HOST[:PORT] (default %(default)s)",
    )
    p.add_argument("--cloud-user", default=env("DH_P2P_CLOUD_USER", helpers.DEFAULT_CLOUD_USER))
    p.add_argument("--cloud-key", default=env("DH_P2P_CLOUD_KEY", helpers.DEFAULT_CLOUD_KEY))
    p.add_argument(
        "--channels", action="store_true", help="list channel titles and RTSP URLs (needs :80)"
    )
    seconds = argtypes.positive_seconds
    p.add_argument("--timeout", type=seconds, default=15.0, help="give up a step after S seconds")
    p.add_argument(
        "--retries",
        type=argtypes.integer_in(0, 1000, "count"),
        default=2,
        help="handshake attempts before giving up",
    )
    p.add_argument("--punch-timeout", type=seconds, default=5.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--peer-timeout",
        type=seconds,
        default=120.0,
        help="reconnect after S seconds without a packet from the device",
    )
    p.add_argument("--bind-any", action="store_true", help="UDP sockets on 0.0.0.0 (real NATs)")
    p.add_argument(
        "--no-gso",
        action="store_true",
        help="send and read tunnel datagrams one by one (no Linux UDP segmentation offload)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose + 10 * args.quiet
    logging.basicConfig(
        level=max(logging.DEBUG, level), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        cloud = parse_cloud(args.cloud)
        forwards = [parse_forward(f) for f in args.port]
        if args.password_file is not None:
            args.password = argtypes.read_password_file(args.password_file)
    except ValueError as exc:  # argtypes.UsageError too
        parser.error(str(exc))
    args.user = args.user or None  # an empty environment variable means "not given"
    args.password = args.password or None
    if (args.user is None) != (args.password is None):
        parser.error("give both -u/--user and --password (or neither)")
    if args.channels and not any(f.remote == 80 for f in forwards):
        forwards.append(Forward("127.0.0.1", 0, 80))
    if not any(f.remote == 554 for f in forwards) and not args.port:
        forwards.insert(0, Forward("127.0.0.1", 554, 554, explicit=False))
    client = Client(args, cloud)
    try:
        client.open_listeners(forwards)
    except OSError as exc:
        print(f"dh_p2p: cannot listen: {exc}", file=sys.stderr)
        return EXIT_ERROR

    def on_signal(signum, frame) -> None:
        client.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return client.run()
    finally:
        client.shutdown()


if __name__ == "__main__":
    sys.exit(main())
