#!/usr/bin/env python3
"""Reach a Dahua (or rebranded) device by serial number through Easy4IPCloud
and forward local TCP ports to it over a PTCP tunnel (PROTOCOLS 2).

The cloud knows a device only under the identity of the app it was bound with
(SmartPSS or DMSS, PROTOCOLS 2.7 (c)); ``--app auto`` tries both, each in its own
dialect (the rows of ``helpers.APP_PROFILES``).
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
import array
import collections
import functools
import ipaddress
import logging
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import quote

import helpers
import ptcp
from helpers import EPILOG, ExitCode, P2PProtocolError

log = logging.getLogger("dh_p2p")

NAT_INFO = b"Server Nat Info!"

# socket names used by Handshake outputs
MAIN = "S"  # main server, then the device (PROTOCOLS 2.2: same local port for both)
P2PSRV = "P"  # the P2P server (step 3: a socket of its own)
RELAY = "R"  # relay server and relay agent; the tunnel in relay mode

EXIT_OK = ExitCode.OK
EXIT_ERROR = ExitCode.ERROR
EXIT_USAGE = ExitCode.USAGE
EXIT_OFFLINE = ExitCode.UNREACHABLE  # device offline or serial unknown to the cloud
EXIT_AUTH = ExitCode.LOGIN_REFUSED
EXIT_CLOUD_UNREACHABLE = ExitCode.CLOUD_UNREACHABLE
EXIT_WRONG_APP = ExitCode.WRONG_APP  # the device is bound to another app's cloud than --app

SIGN_MODES = ("auto", "always", "never")
SIGN_MISSES = 5  # PROTOCOLS 2.7 (c): agent replies to 0x17 without a sign before giving it up


class HandshakeError(Exception):
    """The handshake failed; ``kind`` is offline, wrong_app, auth, unreachable,
    timeout, punch or no_sign (the agent answers the sign request without a sign:
    try again without the sign exchange)."""

    def __init__(self, message: str, kind: str = "timeout") -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------
# Handshake state (sans-IO): PROTOCOLS 2.2 - 2.4
# ---------------------------------------------------------------------------


class Stage(StrEnum):
    """Where the signalling of a handshake is (PROTOCOLS 2.2)."""

    IDLE = "idle"
    SIGNALLING = "signalling"  # cloud requests up to p2p-channel
    RELAY_CHANNEL = "relay_channel"  # waiting for the agent's "Server Nat Info!"
    SIGN = "sign"  # waiting for the agent's sign (its answer to 0x17)
    PATHS = "paths"  # the direct and/or the relayed path being opened
    OPEN = "open"
    FAILED = "failed"


class PathStep(StrEnum):
    """Progress of one path to the device."""

    IDLE = "idle"
    PUNCH = "punch"  # direct only: hole punching
    SYN = "syn"  # without the sign exchange: open once the SYN is acknowledged
    SIGN = "19"  # 0x19 with the sign sent, waiting for 0x1a
    CONFIRM = "1b"  # 0x1b sent, open once acknowledged
    OPEN = "open"
    FAILED = "failed"


class Step(StrEnum):
    """A cloud request of the handshake; its reply goes to the handler of the same name."""

    WARMUP = "warmup"
    PROBE = "probe"
    ONLINE = "online"
    INFO = "info"
    PROBE_DEVICE = "probe_device"
    ONLINE_RELAY = "online_relay"
    RELAY_AGENT = "relay_agent"
    RELAY_START = "relay_start"
    P2P_CHANNEL = "p2p_channel"
    RELAY_CHANNEL = "relay_channel"
    OTHER_APP = "other_app"  # only to explain a 404: is the device bound to the other app?
    LOCAL_CHANNEL = "local_channel"  # best effort, once set up; not waited for


#: Requests that only serve the relayed path: once the paths are being opened, their
#: failure fails that path, not the handshake.
RELAY_STEPS = frozenset({Step.ONLINE_RELAY, Step.RELAY_AGENT, Step.RELAY_START, Step.RELAY_CHANNEL})


@dataclass(frozen=True)
class CloudIdentity:
    """An app profile with the main server and WSSE pair used for it."""

    profile: helpers.AppProfile
    cloud: tuple[str, int]
    cloud_user: str
    cloud_key: str

    @classmethod
    def of(
        cls,
        profile: helpers.AppProfile,
        cloud: tuple[str, int] | None = None,
        cloud_user: str | None = None,
        cloud_key: str | None = None,
    ) -> CloudIdentity:
        """The profile's own server and pair unless given."""
        return cls(
            profile,
            cloud or (profile.host, profile.port),
            cloud_user or profile.cloud_user,
            cloud_key or profile.cloud_key,
        )


def sign_exchange_wanted(sign: str, device_version: str) -> bool:
    """Whether to do the 0x17/0x19/0x1b exchange (PROTOCOLS 2.7 (c), (f) 7): "always",
    "never", or "auto": not with firmware from 2024 on (``version`` 6.x or 7.x)."""
    if sign == "auto":
        return not device_version.strip().startswith(("6", "7"))
    return sign == "always"


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
    request_id: str | None = None
    provisional: bool = False
    rebuild: Callable[[], bytes] | None = None  # a resend made afresh (else ``data`` again)


@dataclass
class _Path:
    """Progress of one way to the device: "direct" (punched) or "relay" (the agent)."""

    step: PathStep = PathStep.IDLE
    deadline: float | None = None
    opened_at: float = 0.0


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
    identity: CloudIdentity | None = None  # the cloud identity that answered
    sign_exchange: bool = True


@dataclass
class Handshake:
    """Client side of the Easy4IPCloud handshake (sans-IO).

    Call :meth:`start`, then feed every datagram to :meth:`receive` and call
    :meth:`handle_timers` at :meth:`next_deadline`; after each call send
    :meth:`datagrams_to_send` (``(socket name, address, bytes)``).  Finished when
    :attr:`result` (an :class:`Established`) or :attr:`error` is set.  Times are
    monotonic seconds; the wall clock (for WSSE Created and CreateDate) is the one
    given to :meth:`start`, carried forward.
    ``local_addr`` is the address of socket ``S`` as the host's egress
    interface has it, ``lan_addrs`` the host's other interface addresses; both go
    into LocalAddr (PROTOCOLS 2.8).  In auto mode the direct and the relayed path
    are opened together; the relay is taken if the direct path is not open
    ``relay_grace`` seconds after it.  ``punch_check`` is "identify" (a punch must
    carry our Identify and transaction) or "address" (source IP only).
    ``identities`` are the cloud identities tried in turn while the device's serial
    gets a 404 (default: SmartPSS at ``cloud`` with ``cloud_user``/``cloud_key``);
    ``diagnose`` are asked only to explain the last 404.  ``sign_mode`` is one of
    :data:`SIGN_MODES` (see :func:`sign_exchange_wanted`).
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
    relay_grace: float = 1.5
    lan_addrs: tuple[str, ...] = ()
    punch_check: str = "identify"
    session_options: dict = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.SystemRandom)
    identities: tuple[CloudIdentity, ...] = ()
    diagnose: tuple[CloudIdentity, ...] = ()
    sign_mode: str = "auto"

    result: Established | None = None
    error: HandshakeError | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "direct", "relay"):
            raise ValueError(f"mode must be auto, direct or relay, not {self.mode!r}")
        if self.sign_mode not in SIGN_MODES:
            raise ValueError(f"sign_mode must be one of {SIGN_MODES}, not {self.sign_mode!r}")
        if not self.identities:
            smartpss = CloudIdentity(helpers.SMARTPSS, self.cloud, self.cloud_user, self.cloud_key)
            self.identities = (smartpss,)
        self.tried: list[CloudIdentity] = []  # identities that answered 404 so far
        self.identify = bytes(self.rng.getrandbits(8) for _ in range(8))
        self.punch_cookie = bytes(self.rng.getrandbits(8) for _ in range(4))
        self.punch_tid = bytes(self.rng.getrandbits(8) for _ in range(12))
        self._out: list[tuple[str, tuple[str, int], bytes]] = []
        self._wall_offset = 0.0
        self.ignored: collections.Counter[str] = collections.Counter()
        self._reset(self.identities[0])

    def _reset(self, identity: CloudIdentity) -> None:
        """Forget everything learned from a cloud identity; start over with ``identity``."""
        self.identity = identity
        self.stage = Stage.IDLE
        self._pending: dict[Step, _Pending] = {}
        self._cseq: dict[str, int] = {}
        self.client_id = f"{self.rng.getrandbits(128):032x}"
        self.randsalt: str | None = None
        self.key: bytes | None = None
        self.nonce: int | None = None
        self.p2p_addr: tuple[str, int] | None = None
        self.relay_addr: tuple[str, int] | None = None
        self.agent_addr: tuple[str, int] | None = None
        self.token: str | None = None
        self.relay_asked = False
        self.relay_started = False
        self.relay_channel_sent = False
        self.channel_sent = False
        self.channel_reply: helpers.Reply | None = None
        self.device_pub: tuple[str, int] | None = None
        self.device_local: tuple[str, int] | None = None
        self.device_nonce: int | None = None
        self.device_version = ""
        self.sign_exchange: bool | None = None  # decided by the p2p-channel reply
        self.nat_info = False
        self.sign: bytes | None = None
        self.sign_misses = 0  # agent packets in Stage.SIGN that carried no sign
        self.agent_session: ptcp.Session | None = None
        self.device_session: ptcp.Session | None = None
        self.device_peer: tuple[str, int] | None = None
        self._early_punches: list[tuple[tuple[str, int], helpers.StunMessage]] = []
        self._punch_next = 0.0
        self._punch_interval = self.retry.initial
        self._step_deadline: float | None = None
        self.direct_path = _Path()
        self.relay_path = _Path()

    @property
    def state(self) -> Stage:
        """The signalling stage (an alias of :attr:`stage`)."""
        return self.stage

    @property
    def has_credentials(self) -> bool:
        return self.username is not None and self.password is not None

    @property
    def profile(self) -> helpers.AppProfile:
        return self.identity.profile

    # -- output ---------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[str, tuple[str, int], bytes]]:
        """Datagrams produced since the last call: (socket name, address, bytes)."""
        out, self._out = self._out, []
        return out

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    # -- requests ---------------------------------------------------------------

    def _wall(self, now: float) -> float:
        return now + self._wall_offset

    def _request(
        self,
        step: Step,
        sock: str,
        addr: tuple[str, int],
        path: str,
        now: float,
        body: str | None = None,
        *,
        identity: CloudIdentity | None = None,
        auth: bool = True,
        body_factory: Callable[[], str] | None = None,
        method: str | None = None,
        keep: bool = True,
    ) -> None:
        """Send a request and, unless ``keep`` is false, keep it for resends and its
        reply.  With ``body_factory`` the body is made by it, and again for each
        resend if the profile wants resends afresh.  ``method``: see build_request."""
        identity = identity or self.identity
        profile = identity.profile
        # counted per socket (and dialect: the diagnosis of a 404 speaks another one)
        count_key = sock if profile is self.profile else f"{sock}/{profile.name}"
        counter = self._cseq[count_key] = self._cseq.get(count_key, 0) + 1
        cseq = profile.new_cseq(counter, self.rng.randbytes)
        request_id = None
        if profile.sends_request_id(path):
            request_id = helpers.new_request_id(self.rng.randbytes)
        created = helpers.wsse_created(self._wall(now), profile.created_style)

        def build(body: str | None) -> bytes:
            return helpers.build_request(
                path,
                cseq,
                body=body,
                cloud_user=identity.cloud_user,
                cloud_key=identity.cloud_key,
                nonce=profile.new_nonce(self.rng.randbytes),
                created=created,
                profile=profile,
                request_id=request_id,
                auth=auth,
                method=method,
            )

        data = build(body if body_factory is None else body_factory())
        rebuild = None
        if body_factory is not None and profile.fresh_resend:
            make_body = body_factory

            def rebuild() -> bytes:
                return build(make_body())

        log.debug("-> %s", step)  # not the path: relay paths carry the token
        self._out.append((sock, addr, data))
        if not keep:
            return
        what = path.replace(self.token, "{token}") if self.token else path  # keep it out of logs
        self._pending[step] = _Pending(
            sock, addr, data, cseq, now, now + self.retry.initial, self.retry.initial, what,
            request_id, rebuild=rebuild,
        )  # fmt: skip

    def _match(self, sock: str, addr: tuple[str, int], reply: helpers.Reply) -> Step | None:
        """The request ``reply`` answers: by x-pcs-request-id where we sent one
        (PROTOCOLS 2.7 (c): such replies may carry CSeq 0; a final error carries an
        id of the server's making), else by CSeq."""
        candidates = [
            k for k, p in self._pending.items() if p.sock == sock and _same_endpoint(p.addr, addr)
        ]
        with_id = [k for k in candidates if self._pending[k].request_id is not None]
        for key in with_id:
            if self._pending[key].request_id == reply.request_id:
                return key
        plain = [k for k in candidates if self._pending[k].request_id is None]
        if reply.cseq is None and plain:
            return plain[0]
        for key in plain:
            if self._pending[key].cseq == reply.cseq:
                return key
        if reply.code >= 400 and len(with_id) == 1:
            return with_id[0]
        return None

    def _fail(self, message: str, kind: str) -> None:
        if self.error is None and self.result is None:
            self.error = HandshakeError(message, kind)
            self.stage = Stage.FAILED
            self._pending.clear()
            log.debug("handshake failed: %s", message)

    # -- flow -----------------------------------------------------------------

    def start(self, now: float, wall: float) -> None:
        """Begin (warm-up, then ``/probe/p2psrv``) at monotonic ``now``, unix time ``wall``."""
        self._wall_offset = wall - now
        self._begin(now)

    def _begin(self, now: float) -> None:
        self.stage = Stage.SIGNALLING
        profile, cloud = self.profile, self.identity.cloud
        if profile.warmup_path is not None:
            self._request(Step.WARMUP, MAIN, cloud, profile.warmup_path, now, auth=False)
        self._request(Step.PROBE, MAIN, cloud, "/probe/p2psrv", now)

    def receive(self, sock: str, addr: tuple[str, int], data: bytes, now: float) -> None:
        """Feed one datagram received on socket ``sock`` from ``addr``."""
        if self.done:
            return
        if data[:4] == ptcp.MAGIC:
            self._on_ptcp(sock, addr, data, now)
            return
        from_agent = sock == RELAY and addr == self.agent_addr
        waiting_nat_info = self.relay_channel_sent and not self.nat_info
        if from_agent and data == NAT_INFO and waiting_nat_info:
            self.nat_info = True  # the bare form some agents send
            self._advance(now)
            return
        if data[:5] == b"HTTP/":
            try:
                reply = helpers.parse_reply(data)
            except P2PProtocolError as exc:
                log.info("ignoring malformed reply on %s from %s: %s", sock, addr, exc)
                return
            if from_agent and waiting_nat_info:
                # PROTOCOLS 2.2 step 8: the agent, not the main server, answers
                # relay-channel ("100 Trying", then "200 Server Nat Info!"), with a
                # CSeq that need not be ours: matched by sender and status.
                self._on_agent_reply(reply, now)
                return
            key = self._match(sock, addr, reply)
            if key is None:
                self._ignore(addr, f"reply {reply.code} that answers no request of ours")
                return
            if reply.provisional:
                self._pending[key].provisional = True
                return
            del self._pending[key]  # any final reply, a status >= 400 included
            self._on_reply(key, reply, now)
            return
        if sock == MAIN and self.direct_path.step in (PathStep.IDLE, PathStep.PUNCH):
            try:
                msg = helpers.parse_punch(data)
            except P2PProtocolError:
                log.debug("ignoring stray datagram on %s from %s", sock, addr)
                return
            self._on_punch(addr, msg, now)
            return
        log.debug("ignoring stray datagram on %s from %s", sock, addr)

    def _on_reply(self, step: Step, reply: helpers.Reply, now: float) -> None:
        try:
            _REPLY_HANDLERS[step](self, reply, now)
        except P2PProtocolError as exc:
            self._step_failed(step, f"bad reply to {step}: {exc}", "cloud", now)
            return
        self._advance(now)

    def _step_failed(self, step: Step, message: str, kind: str, now: float) -> None:
        """A request failed: the handshake, or only the relayed path once the direct
        one is under way (PROTOCOLS 2.7 (c): without the sign exchange it needs no relay)."""
        if step in RELAY_STEPS and self.direct_path.step != PathStep.IDLE:
            log.info("relay unavailable (%s); going on with the direct path", message)
            for key in RELAY_STEPS:
                self._pending.pop(key, None)
            self.relay_path.step = PathStep.FAILED
            self._choose_path(now)
            return
        self._fail(message, kind)

    # -- reply handlers: one per Step (see _REPLY_HANDLERS) ---------------------

    def _after_warmup(self, reply: helpers.Reply, now: float) -> None:
        """The warm-up's answer is not documented (PROTOCOLS 2.7 (f) 13): drained."""

    def _after_probe(self, reply: helpers.Reply, now: float) -> None:
        if not reply.ok:
            return self._fail(f"cloud refused /probe/p2psrv ({reply.code})", "unreachable")
        self._request(Step.ONLINE, MAIN, self.identity.cloud, f"/online/p2psrv/{self.serial}", now)

    def _after_online(self, reply: helpers.Reply, now: float) -> None:
        if reply.code == 404:
            return self._not_here(now)
        if not reply.ok:
            return self._fail(f"cloud error {reply.code} {reply.reason}", "cloud")
        self.p2p_addr = helpers.parse_host_port(reply.fields.get("US", ""))
        if self.has_credentials:
            self._request(Step.INFO, MAIN, self.identity.cloud, f"/info/device/{self.serial}", now)
        else:
            self._probe_device(now)

    def _after_info(self, reply: helpers.Reply, now: float) -> None:
        if reply.ok:
            try:
                info = helpers.decrypt_info(reply.fields.get("Info", ""))
                self.randsalt = str(info["randsalt"]) if info.get("randsalt") else None
            except P2PProtocolError as exc:
                log.info("device info unreadable (%s); using the default salt", exc)
        self._probe_device(now)

    def _probe_device(self, now: float) -> None:
        if self.p2p_addr is None:
            raise P2PProtocolError("no P2P server address")
        self._request(Step.PROBE_DEVICE, P2PSRV, self.p2p_addr, f"/probe/device/{self.serial}", now)

    def _after_probe_device(self, reply: helpers.Reply, now: float) -> None:
        if reply.code == 404:
            return self._fail(f"device {self.serial} is unknown or offline", "offline")
        if self.profile.uses_relay or self.mode == "relay":
            self._ask_relay(now)  # p2p-channel goes out with the relay's answer, as the app does
        else:
            self._send_p2p_channel(now)

    def _ask_relay(self, now: float) -> None:
        self.relay_asked = True
        self._request(Step.ONLINE_RELAY, MAIN, self.identity.cloud, "/online/relay", now)

    def _after_online_relay(self, reply: helpers.Reply, now: float) -> None:
        if not reply.ok:
            return self._step_failed(
                Step.ONLINE_RELAY, f"no relay server ({reply.code})", "cloud", now
            )
        self.relay_addr = helpers.parse_host_port(reply.fields.get("Address", ""))
        if not self.channel_sent:
            self._send_p2p_channel(now)
        self._request(Step.RELAY_AGENT, RELAY, self.relay_addr, "/relay/agent", now)

    def _after_relay_agent(self, reply: helpers.Reply, now: float) -> None:
        if not reply.ok:
            return self._step_failed(
                Step.RELAY_AGENT, f"relay server refused ({reply.code})", "cloud", now
            )
        self.token = reply.fields.get("Token", "")
        self.agent_addr = helpers.parse_host_port(reply.fields.get("Agent", ""))
        if not self.token:
            raise P2PProtocolError("relay reply without a Token")
        body = "<body><Client>:0</Client></body>"
        path = f"/relay/start/{self.token}"
        self._request(Step.RELAY_START, RELAY, self.agent_addr, path, now, body)

    def _after_relay_start(self, reply: helpers.Reply, now: float) -> None:
        if not reply.ok:
            return self._step_failed(
                Step.RELAY_START, f"relay agent refused ({reply.code})", "cloud", now
            )
        self.relay_started = True

    def _after_p2p_channel(self, reply: helpers.Reply, now: float) -> None:
        if reply.code == 403:
            return self._auth_failed(reply)
        if reply.code == 404:
            return self._not_here(now)
        if not reply.ok:
            return self._fail(f"p2p-channel refused ({reply.code} {reply.reason})", "cloud")
        fields = reply.fields
        local = fields.get("LocalAddr", "")
        if self.key is not None and "Nonce" in fields:
            self.device_nonce = helpers.ascii_number(fields["Nonce"])
            if self.device_nonce is None:
                raise P2PProtocolError("non-numeric device Nonce")
            local = helpers.decrypt_local_addr(self.key, self.device_nonce, local)
        # PubAddr is occasionally missing (PROTOCOLS 2.7 (c)): then the LAN address only
        pub = fields.get("PubAddr", "")
        self.device_local = device_address(local) if local else None
        self.device_pub = device_address(pub) if pub else self.device_local
        if self.device_pub is None:
            raise P2PProtocolError("the p2p-channel reply names no device address")
        self.device_local = self.device_local or self.device_pub
        self.channel_reply = reply
        self.device_version = fields.get("version", "")
        self.sign_exchange = sign_exchange_wanted(self.sign_mode, self.device_version)
        log.info(
            "device firmware %s: %s the sign exchange (--sign %s)",
            self.device_version or "of unknown version",
            "with" if self.sign_exchange else "without",
            self.sign_mode,
        )
        if not self.relay_asked and (self.sign_exchange or self.mode == "relay"):
            self._ask_relay(now)  # the sign comes from a relay agent (PROTOCOLS 2.2 step 9)

    def _after_relay_channel(self, reply: helpers.Reply, now: float) -> None:
        if reply.code == 403:
            return self._auth_failed(reply)
        if not reply.ok:
            return self._step_failed(
                Step.RELAY_CHANNEL, f"relay-channel refused ({reply.code})", "cloud", now
            )

    def _after_other_app(self, reply: helpers.Reply, now: float) -> None:
        other = self.diagnose[0]
        if reply.ok:
            return self._fail(
                f"device {self.serial} is bound to the {other.profile.label} app's cloud, not to "
                f"{self.identity.profile.label}'s: use --app {other.profile.name} (or --app auto)",
                "wrong_app",
            )
        self.tried.append(other)
        self._fail(self._unknown_message(), "offline")

    def _not_here(self, now: float) -> None:
        """The cloud identity in use does not know the serial: try the next one, or
        ask the others why (PROTOCOLS 2.7 (c), "pair-gating")."""
        self.tried.append(self.identity)
        self._release_relay()  # allocated in parallel under this identity, if it was
        index = self.identities.index(self.identity)
        if index + 1 < len(self.identities):
            nxt = self.identities[index + 1]
            log.info(
                "the %s cloud does not know %s; trying %s",
                self.profile.label,
                self.serial,
                nxt.profile.label,
            )
            self._reset(nxt)
            self._begin(now)
            return
        if self.diagnose:
            other = self.diagnose[0]
            path = f"/online/p2psrv/{self.serial}"
            self._pending.clear()
            self._request(Step.OTHER_APP, MAIN, other.cloud, path, now, identity=other)
            return
        self._fail(self._unknown_message(), "offline")

    def _unknown_message(self) -> str:
        if len(self.tried) < 2:
            return f"device {self.serial} is unknown or offline"
        labels = " and the ".join(i.profile.label for i in self.tried)
        return (
            f"device {self.serial} is unknown to the {labels} cloud: "
            "unknown serial, or bound to another cloud (or offline)"
        )

    def _on_agent_reply(self, reply: helpers.Reply, now: float) -> None:
        if reply.provisional:
            if Step.RELAY_CHANNEL in self._pending:
                self._pending[Step.RELAY_CHANNEL].provisional = True
            return
        if not reply.ok:
            self._pending.pop(Step.RELAY_CHANNEL, None)
            self._on_reply(Step.RELAY_CHANNEL, reply, now)
            return
        self.nat_info = True
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
        profile = self.profile
        if self.has_credentials and profile.require_randsalt and not self.randsalt:
            return self._fail(
                f"the {profile.label} cloud gave no salt for the device (/info/device), "
                "so its credentials cannot be signed",
                "auth",
            )
        if self.username is not None and self.password is not None:
            self.key = helpers.device_key(self.username, self.password, self.randsalt)
        created = int(self._wall(now))  # kept on a resend (PROTOCOLS 2.7 (c), (e))

        def body() -> str:
            local = format_local_addr(self.lan_addrs, self.local_addr)
            auth = ""
            if self.key is not None and self.username is not None:
                self.nonce = self.rng.randrange(2**31)
                local = helpers.encrypt_local_addr(self.key, self.nonce, local)
                auth = helpers.dev_auth_xml(
                    self.key, self.username, self.nonce, created, local, self.randsalt
                )
            return helpers.p2p_channel_body(
                profile,
                identify=self.identify,
                local_addr=local,
                encrypted=bool(auth),
                auth_xml=auth,
                client_id=f"{self.client_id}:{self.local_addr[1]}",
            )

        path = f"/device/{self.serial}/p2p-channel"
        self.channel_sent = True
        self._request(Step.P2P_CHANNEL, MAIN, self.identity.cloud, path, now, body_factory=body)

    def _send_relay_channel(self, now: float) -> None:
        self.relay_channel_sent = True
        if self.stage == Stage.SIGNALLING:
            self.stage = Stage.RELAY_CHANNEL
        auth = ""
        if self.key is not None and self.username is not None:
            # PROTOCOLS 2.4: relay-channel signs an empty payload with the reply's nonce
            nonce = self.device_nonce if self.device_nonce is not None else self.nonce
            created = int(self._wall(now))
            auth = helpers.dev_auth_xml(
                self.key, self.username, int(nonce or 0), created, "", self.randsalt
            )
        assert self.agent_addr is not None
        agent = f"{self.agent_addr[0]}:{self.agent_addr[1]}"
        body = f"<body>{auth}<agentAddr>{agent}</agentAddr></body>"
        path = f"/device/{self.serial}/relay-channel"
        self._request(Step.RELAY_CHANNEL, RELAY, self.identity.cloud, path, now, body)
        if self.stage != Stage.PATHS:
            self._step_deadline = now + self.retry.give_up

    def _advance(self, now: float) -> None:
        """Start whatever the facts gathered so far allow."""
        if self.done:
            return
        if self.channel_reply is not None and self.relay_started and not self.relay_channel_sent:
            self._send_relay_channel(now)
        if self.nat_info and self.agent_session is None:
            self._pending.pop(Step.RELAY_CHANNEL, None)
            self.agent_session = self._new_session(now)
            self.agent_session.send_syn(now)
            if self.sign_exchange:
                # PROTOCOLS 2.2 step 9: SYN and 17 00*11 to the agent; its answer holds the sign.
                self.stage = Stage.SIGN
                self.agent_session.send_command(ptcp.T_SIGN_REQUEST, b"", now)
            self._flush_session(RELAY, self.agent_addr, self.agent_session)
        sign_ready = self.sign_exchange is False or self.sign is not None
        if self.channel_reply is None or not sign_ready:
            return
        # Both paths at once in auto mode (PROTOCOLS 2.2, 2.8: the app overlaps them);
        # the direct one wins if it opens within relay_grace of the relay.
        started = False
        if self.mode != "direct" and self.agent_session and self.relay_path.step == PathStep.IDLE:
            self._start_relay_path(now)
            started = True
        if self.mode != "relay" and self.direct_path.step == PathStep.IDLE:
            self._start_punch(now)
            started = True
        if started and self.stage not in (Stage.PATHS, Stage.OPEN, Stage.FAILED):
            self.stage = Stage.PATHS
            self._step_deadline = None  # each path has its own deadline now
        if self.stage == Stage.PATHS:
            self._choose_path(now)

    def _new_session(self, now: float) -> ptcp.Session:
        options = {"initial_rto": self.retry.initial, "max_rto": self.retry.cap}
        options.update(self.session_options)
        return ptcp.Session(now=now, **options)

    def _flush_session(self, sock: str, addr, session: ptcp.Session | None) -> None:
        if session is None or addr is None:
            return
        for data in session.datagrams_to_send():
            self._out.append((sock, addr, data))

    # -- the two paths: relay (via the agent) and direct (punched) -------------

    def _start_relay_path(self, now: float) -> None:
        assert self.agent_session is not None
        self.relay_path.deadline = now + self.retry.give_up
        if not self.sign_exchange:
            self.relay_path.step = PathStep.SYN  # the SYN went out with nat info
            return
        assert self.sign is not None
        self.relay_path.step = PathStep.SIGN
        self.agent_session.send_command(ptcp.T_SIGN_PRESENT, self.sign, now)
        self._flush_session(RELAY, self.agent_addr, self.agent_session)

    def _path_of(self, session: ptcp.Session) -> _Path:
        return self.relay_path if session is self.agent_session else self.direct_path

    def _on_ptcp(self, sock: str, addr, data: bytes, now: float) -> None:
        if sock == RELAY and self.agent_session is not None and addr == self.agent_addr:
            session, peer = self.agent_session, self.agent_addr
        elif sock == MAIN and self.device_session is not None and addr == self.device_peer:
            session, peer = self.device_session, self.device_peer
        else:
            self._ignore(addr, "PTCP from an address that is not our peer")
            return
        try:
            session.receive_datagram(data, now)
        except ptcp.PTCPError as exc:
            log.info("ignoring bad PTCP datagram: %s", exc)
            return
        for event in session.events():
            if isinstance(event, ptcp.CommandReceived):
                self._on_command(session, event, now)
            elif isinstance(event, ptcp.HeartbeatReceived) and session is self.agent_session:
                self._sign_missed()
        self._flush_session(sock, peer, session)
        path = self._path_of(session)
        if path.step in (PathStep.SYN, PathStep.CONFIRM) and session.unacked_bytes == 0:
            path.step = PathStep.OPEN
            path.opened_at = now
        self._advance(now)

    def _on_command(self, session: ptcp.Session, event: ptcp.CommandReceived, now: float) -> None:
        if session is self.agent_session and self.stage == Stage.SIGN:
            if event.payload:
                self.sign = event.payload
            else:
                self._sign_missed()
            return
        path = self._path_of(session)
        if event.body_type == ptcp.T_SIGN_ACCEPT and path.step == PathStep.SIGN:
            # PROTOCOLS 2.2 step 10: 1a from the peer, we answer 1b and wait for its ack.
            path.step = PathStep.CONFIRM
            session.send_command(ptcp.T_SIGN_CONFIRM, b"", now)

    def _sign_missed(self) -> None:
        """The agent answered while we wait for the sign, but with a short packet or a
        heartbeat (PROTOCOLS 2.7 (c)): after SIGN_MISSES of them, --sign auto gives
        the exchange up; the driver then starts over without it."""
        if self.stage != Stage.SIGN or self.sign_mode != "auto":
            return
        self.sign_misses += 1
        if self.sign_misses >= SIGN_MISSES:
            self._fail(
                f"the relay agent answered the sign request {self.sign_misses} times "
                "without a sign (2024+ firmware?)",
                "no_sign",
            )

    def _relay_pending(self) -> bool:
        """Whether the relayed path may still start (its signalling is under way)."""
        if self.mode == "direct" or self.relay_path.step != PathStep.IDLE:
            return False
        return any(key in self._pending for key in RELAY_STEPS)

    def _choose_path(self, now: float) -> None:
        direct, relay = self.direct_path, self.relay_path
        finished = (PathStep.IDLE, PathStep.FAILED)
        if direct.step == PathStep.OPEN:
            return self._establish("direct", now)
        if relay.step == PathStep.OPEN:
            waiting = direct.step not in finished
            if not waiting or now >= relay.opened_at + self.relay_grace:
                if waiting:
                    log.info(
                        "direct path not open %.1f s after the relay; using the relay",
                        self.relay_grace,
                    )
                return self._establish("relay", now)
            return
        if direct.step in finished and relay.step in finished and not self._relay_pending():
            if self.mode == "direct":
                return self._fail(
                    "hole punching failed (no answer from the device); try --relay", "punch"
                )
            return self._fail("neither a direct nor a relayed tunnel could be opened", "timeout")

    def _establish(self, path: str, now: float) -> None:
        if path == "direct":
            session, sock, peer = self.device_session, MAIN, self.device_peer
        else:
            session, sock, peer = self.agent_session, RELAY, self.agent_addr
        assert session is not None and peer is not None
        token = self.token
        if path == "direct" and self.relay_path.step != PathStep.IDLE and self._release_relay():
            token = None  # the relay we opened as a fallback is not needed
        self.stage = Stage.OPEN
        self._pending.clear()
        self._send_local_channel(now)
        self.result = Established(
            path, sock, peer, session, token, self.relay_addr, self._cseq.get(RELAY, 0) + 1,
            self.identity, bool(self.sign_exchange),
        )  # fmt: skip

    def _send_local_channel(self, now: float) -> None:
        """PROTOCOLS 2.7 (c): once set up, the DMSS app sends local-channel from a
        socket of its own, a GET with ``<body>[auth]</body>`` (fresh nonce, empty
        payload); best effort, so its reply is not waited for.  Only with device
        credentials: the auth block is all it carries."""
        if not self.profile.local_channel or self.key is None or self.username is None:
            return
        nonce = self.rng.randrange(2**31)
        auth = helpers.dev_auth_xml(
            self.key, self.username, nonce, int(self._wall(now)), "", self.randsalt
        )
        path = f"/device/{self.serial}/local-channel"
        self._request(
            Step.LOCAL_CHANNEL, P2PSRV, self.identity.cloud, path, now, f"<body>{auth}</body>",
            method=self.profile.get_method, keep=False,
        )  # fmt: skip

    def _release_relay(self) -> bool:
        """Send ``/relay/unbind`` for our relay token, if we hold one (PROTOCOLS 2.7 (e))."""
        if not self.token or self.relay_addr is None:
            return False
        cseq = self._cseq[RELAY] = self._cseq.get(RELAY, 0) + 1
        self._out.append((RELAY, self.relay_addr, unbind_request(self.token, cseq, self.identity)))
        return True

    # -- hole punch (PROTOCOLS 2.3) ------------------------------------------

    def _punch_targets(self) -> list[tuple[str, int]]:
        targets = []
        for addr in (self.device_pub, self.device_local):
            if addr is not None and addr not in targets:
                targets.append(addr)
        return targets

    def _start_punch(self, now: float) -> None:
        self.direct_path.step = PathStep.PUNCH
        self.direct_path.deadline = now + self.punch_timeout
        self._punch_interval = self.retry.initial
        self._send_punches(now)
        early, self._early_punches = self._early_punches, []
        for addr, msg in early:  # the device punched before we knew where it is
            self._on_punch(addr, msg, now)

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

    def punch_is_genuine(self, addr: tuple[str, int], msg: helpers.StunMessage) -> bool:
        """Whether a punch comes from the device the cloud named (PROTOCOLS 2.3).

        Its source IP must be the device's public or local IP (any port: a NAT may
        map the device's socket to another port towards us than towards the
        cloud), and unless ``punch_check`` is "address" it must carry our Identify,
        and a Binding Success must answer our own transaction.
        """
        ips = {a[0] for a in (self.device_pub, self.device_local) if a is not None}
        if addr[0] not in ips:
            return False
        if self.punch_check == "address":
            return True
        attrs = msg.attributes
        identify = attrs.get(helpers.ATTR_ICE_CONTROLLED, attrs.get(helpers.ATTR_ICE_CONTROLLING))
        if identify != self.identify:
            return False
        if msg.msg_type == helpers.STUN_BINDING_SUCCESS:
            return msg.transaction_id == self.punch_tid
        return msg.msg_type == helpers.STUN_BINDING_REQUEST

    def _on_punch(self, addr, msg: helpers.StunMessage, now: float) -> None:
        if self.device_pub is None:
            # early: judged once the p2p-channel reply says where the device is
            if len(self._early_punches) < 16:
                self._early_punches.append((addr, msg))
            return
        if not self.punch_is_genuine(addr, msg):
            self._ignore(addr, "punch that is not from the device")
            return
        if self.direct_path.step == PathStep.PUNCH:
            self._answer_punch(addr, msg, now)
        elif self.direct_path.step == PathStep.IDLE and len(self._early_punches) < 16:
            self._early_punches.append((addr, msg))
        # later punch datagrams are skipped (PROTOCOLS 2.3)

    def _answer_punch(self, addr, msg: helpers.StunMessage, now: float) -> None:
        assert self.device_local is not None
        # PROTOCOLS 2.3: whatever came first (its request or its response to ours),
        # answer with a Binding Success carrying that message's transaction id
        answer = helpers.build_punch_response(
            self.identify, self.device_local, self.punch_cookie, msg.transaction_id
        )
        self._out.append((MAIN, addr, answer.to_wire()))
        self.device_peer = addr
        self.direct_path.deadline = now + self.retry.give_up
        self.device_session = self._new_session(now)
        self.device_session.send_syn(now)
        if self.sign_exchange:
            assert self.sign is not None
            self.direct_path.step = PathStep.SIGN
            self.device_session.send_command(ptcp.T_SIGN_PRESENT, self.sign, now)
        else:
            self.direct_path.step = PathStep.SYN  # 2024+ firmware: straight to BIND
        self._flush_session(MAIN, addr, self.device_session)

    def _ignore(self, addr, what: str) -> None:
        self.ignored[what] += 1
        if self.ignored[what] == 1 or log.isEnabledFor(logging.DEBUG):
            log.info("ignoring %s (%s:%s); further ones are counted", what, addr[0], addr[1])

    # -- timers -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Earliest time :meth:`handle_timers` has work to do."""
        if self.done:
            return None
        times = [p.next_at for p in self._pending.values() if not p.provisional]
        times += [p.started + self.retry.give_up for p in self._pending.values()]
        if self._step_deadline is not None:
            times.append(self._step_deadline)
        running = (PathStep.IDLE, PathStep.OPEN, PathStep.FAILED)
        for path in (self.direct_path, self.relay_path):
            if path.deadline is not None and path.step not in running:
                times.append(path.deadline)
        if self.direct_path.step == PathStep.PUNCH:
            times.append(self._punch_next)
        finished = (PathStep.IDLE, PathStep.FAILED)
        if self.relay_path.step == PathStep.OPEN and self.direct_path.step not in finished:
            times.append(self.relay_path.opened_at + self.relay_grace)
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
                if key == Step.WARMUP:  # best effort
                    del self._pending[key]
                    continue
                if key == Step.PROBE:
                    host, port = self.identity.cloud
                    return self._fail(f"no answer from the cloud at {host}:{port}", "unreachable")
                if key == Step.OTHER_APP:
                    return self._fail(self._unknown_message(), "offline")
                self._step_failed(key, f"no answer to {p.what}", "timeout", now)
                if self.done:
                    return
                continue
            if not p.provisional and now >= p.next_at:
                self._out.append((p.sock, p.addr, p.data if p.rebuild is None else p.rebuild()))
                p.interval = min(p.interval * 2, self.retry.cap)
                p.next_at = now + p.interval
        if self._step_deadline is not None and now >= self._step_deadline:
            return self._fail(f"handshake stalled in step {self.stage}", "timeout")
        running = (PathStep.IDLE, PathStep.OPEN, PathStep.FAILED)
        for name, path in (("direct", self.direct_path), ("relay", self.relay_path)):
            if path.step in running or path.deadline is None:
                continue
            if now >= path.deadline:
                log.info("%s path failed (in step %s)", name, path.step)
                path.step = PathStep.FAILED
        if self.direct_path.step == PathStep.PUNCH and now >= self._punch_next:
            self._send_punches(now)
        for sock, addr, session in (
            (RELAY, self.agent_addr, self.agent_session),
            (MAIN, self.device_peer, self.device_session),
        ):
            if session is not None:
                session.handle_timers(now)
                session.events()
                self._flush_session(sock, addr, session)
        if self.stage == Stage.PATHS:
            self._choose_path(now)


#: Step -> the Handshake method that takes its final reply.
_REPLY_HANDLERS: dict[Step, Callable[[Handshake, helpers.Reply, float], None]] = {
    Step.WARMUP: Handshake._after_warmup,
    Step.PROBE: Handshake._after_probe,
    Step.ONLINE: Handshake._after_online,
    Step.INFO: Handshake._after_info,
    Step.PROBE_DEVICE: Handshake._after_probe_device,
    Step.ONLINE_RELAY: Handshake._after_online_relay,
    Step.RELAY_AGENT: Handshake._after_relay_agent,
    Step.RELAY_START: Handshake._after_relay_start,
    Step.P2P_CHANNEL: Handshake._after_p2p_channel,
    Step.RELAY_CHANNEL: Handshake._after_relay_channel,
    Step.OTHER_APP: Handshake._after_other_app,
}


def device_address(text: str) -> tuple[str, int]:
    """A device's ``IPv4:port`` from a p2p-channel reply (punches carry IPv4 only,
    PROTOCOLS 2.3); raises P2PProtocolError."""
    host, port = helpers.parse_host_port(text)
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise P2PProtocolError(f"device address {text!r} is not IPv4:port") from None
    return host, port


def _same_endpoint(expected: tuple[str, int], actual: tuple[str, int]) -> bool:
    """Whether a datagram from ``actual`` can be the answer of ``expected``: the same
    IP and port, or the same port when we only know ``expected`` by a host name."""
    try:
        ipaddress.ip_address(expected[0])
    except ValueError:
        return expected[1] == actual[1]
    return expected == actual


def format_local_addr(lan_addrs: tuple[str, ...] | list[str], egress: tuple[str, int]) -> str:
    """LocalAddr as the DMSS app sends it (PROTOCOLS 2.7 (c), 2.8): the host's other
    interface addresses, comma-separated, then ``egress-ip:port`` of socket S."""
    others = [a for a in lan_addrs if a != egress[0]]
    return ",".join([*others, f"{egress[0]}:{egress[1]}"])


def unbind_request(token: str, cseq: int, identity: CloudIdentity) -> bytes:
    """``/relay/unbind/{token}`` for the relay server (relay-mode teardown), in the
    dialect of ``identity``; ``cseq`` counts the relay socket's requests."""
    return helpers.build_request(
        f"/relay/unbind/{token}",
        identity.profile.new_cseq(cseq),
        cloud_user=identity.cloud_user,
        cloud_key=identity.cloud_key,
        profile=identity.profile,
    )


@dataclass
class SilentRealmWatch:
    """The sign exchange's fallback (PROTOCOLS 2.7 (c)): 2024+ firmware reportedly
    answers BINDs after a sign exchange but routes no data.  It says so when, after
    the device accepted a realm (CONN), our clients sent data that the device
    acknowledged, yet ``after`` seconds brought no data byte back.  A device that
    acknowledges nothing (gone, or behind a remapped NAT) or a client that sends
    nothing is no such sign.  Fed the tunnel's data byte counts."""

    after: float = 12.0
    _connected: dict[int, tuple[float, int, int]] = field(default_factory=dict)

    def connected(self, realm: int, now: float, data_in: int, data_out: int) -> None:
        """The device accepted ``realm`` at ``now``; the byte counts so far."""
        self._connected[realm] = (now, data_in, data_out)

    def silent(self, now: float, data_in: int, data_out: int, all_acked: bool) -> bool:
        """Whether a realm waited ``after`` seconds for an answer to acknowledged data."""
        for realm, (since, before_in, before_out) in list(self._connected.items()):
            if data_in != before_in:
                del self._connected[realm]  # data came: this device routes it
            elif now >= since + self.after and data_out != before_out and all_acked:
                return True
        return False


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
        return Forward(bind, helpers.split_port(local, lowest=0), helpers.split_port(remote))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{exc} in {text!r}") from None


def parse_cloud(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (default port 8800); raises ValueError."""
    return helpers.split_host_port(text, default_port=helpers.DEFAULT_CLOUD_PORT)


def parse_cloud_option(text: str) -> tuple[str | None, tuple[str, int]]:
    """``[APP=]HOST[:PORT]`` -> (app name or None, (host, port)); raises ValueError."""
    app, eq, rest = text.partition("=")
    if not eq:
        return None, parse_cloud(text)
    if app not in helpers.APP_PROFILES:
        known = ", ".join(helpers.APP_PROFILES)
        raise ValueError(f"unknown app {app!r} in --cloud {text!r} (known: {known})")
    return app, parse_cloud(rest)


def plan_identities(args: argparse.Namespace) -> tuple[list[CloudIdentity], list[CloudIdentity]]:
    """The cloud identities to try, in order, and those asked only to explain a 404.

    ``--app auto`` tries every profile of :data:`helpers.APP_PROFILES` in turn; an
    explicit app is tried alone and the others only diagnose.  ``--cloud`` without
    ``APP=`` and ``--cloud-user``/``--cloud-key`` apply to the app in use (with
    auto: SmartPSS, the app dh_p2p spoke alone before).  Raises ValueError.
    """
    in_use = "smartpss" if args.app == "auto" else args.app
    clouds: dict[str, tuple[str, int]] = {}
    unnamed: tuple[str, int] | None = None
    for text in args.cloud:
        app, addr = parse_cloud_option(text)
        if app is None:
            unnamed = addr
        else:
            clouds[app] = addr
    if unnamed is not None:
        clouds.setdefault(in_use, unnamed)

    def identity(name: str) -> CloudIdentity:
        own = name == in_use
        return CloudIdentity.of(
            helpers.APP_PROFILES[name],
            clouds.get(name),
            args.cloud_user if own else None,
            args.cloud_key if own else None,
        )

    if args.app == "auto":
        return [identity(name) for name in helpers.APP_PROFILES], []
    others = [identity(name) for name in helpers.APP_PROFILES if name != args.app]
    return [identity(args.app)], others


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
        number = helpers.ascii_number(index, 4)
        if number is not None:
            titles[number + 1] = value
    return titles


# ---------------------------------------------------------------------------
# Driver: sockets, threads, signals, reconnects
# ---------------------------------------------------------------------------


def udp_bind_address(cloud_ip: str, requested: str | None = None) -> str:
    """Where the handshake's UDP sockets bind (PROTOCOLS 2.8): ``requested`` if
    given, loopback when the cloud itself is on loopback, else every interface (a
    socket bound to 127.0.0.1 cannot send anywhere else)."""
    if requested:
        return requested
    return "127.0.0.1" if ipaddress.ip_address(cloud_ip).is_loopback else "0.0.0.0"


def egress_address(destination: tuple[str, int]) -> str:
    """The local IP the kernel would send from towards ``destination`` (no packet
    is sent: connecting a UDP socket only picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(destination)
            return probe.getsockname()[0]
        except OSError:
            return "0.0.0.0"


_SIOCGIFCONF = 0x8912
_IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux: 16-byte name, 24-byte union


def interface_addresses() -> list[str]:
    """The host's IPv4 interface addresses, without loopback and link-local ones
    (Linux; elsewhere an empty list, and LocalAddr carries the egress address only)."""
    try:
        import fcntl  # Linux/BSD only

        buf = array.array("B", bytes(_IFREQ_SIZE * 64))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            request = struct.pack("iL", len(buf), buf.buffer_info()[0])
            length = struct.unpack("iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF, request))[0]
    except (ImportError, OSError, struct.error):
        return []
    raw = buf.tobytes()[:length]
    found = []
    for i in range(0, len(raw) - _IFREQ_SIZE + 1, _IFREQ_SIZE):
        ip = ipaddress.ip_address(raw[i + 20 : i + 24])  # sockaddr_in.sin_addr
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified) and str(ip) not in found:
            found.append(str(ip))
    return found


@dataclass
class _Slot:
    """One tunnel to the device, with the sockets its handshake used."""

    tunnel: ptcp.PTCPTunnel
    est: Established
    socks: dict[str, socket.socket]
    extra: bool = False  # opened for more clients; closes after its last realm


class Client:
    """Runs handshakes and tunnels; listeners stay open across reconnects.

    The main tunnel is kept up (rebuilt when it dies).  A tunnel takes at most
    ``--max-realms`` realms and one bind at a time; a bind unanswered for
    ``--bind-timeout`` retires it (PROTOCOLS 2.7 (b)).  A client that finds every
    tunnel full or retired waits while another tunnel to the device is opened
    (a handshake of its own); such extra tunnels close after their last realm.
    """

    fallback_port = 1554  # for the default 554 forward when binding 554 is not permitted

    def __init__(self, args: argparse.Namespace, cloud: tuple[str, int]) -> None:
        self.args = args
        self.cloud = cloud
        self.stop = threading.Event()
        self.main: _Slot | None = None
        self.extras: list[_Slot] = []
        self.opening_extra = False
        self.cond = threading.Condition()
        self.listeners: list[tuple[socket.socket, Forward]] = []
        self.ready_printed = False
        self.relay_sock: socket.socket | None = None
        self.answered: str | None = None  # the app whose cloud identity answered
        self.sign_mode: str = args.sign  # becomes "never" after the fallback
        self.watch: SilentRealmWatch | None = None

    def in_thread(self, work: Callable[[], object]) -> object:
        """Runs the work of every thread this client and its tunnels start."""
        return work()

    def _spawn(self, target: Callable[..., object], *args: object, name: str | None = None) -> None:
        """Start a daemon thread that runs ``target(*args)`` through :meth:`in_thread`."""
        work = functools.partial(target, *args)
        threading.Thread(target=self.in_thread, args=(work,), name=name, daemon=True).start()

    # -- handshake driver -----------------------------------------------------

    def _resolve(self, addr: tuple[str, int]) -> tuple[str, int]:
        host, port = addr
        try:
            return socket.gethostbyname(host), port
        except OSError as exc:
            raise HandshakeError(f"cannot resolve {host}: {exc}", "unreachable") from exc

    def handshake(self) -> tuple[Established, dict[str, socket.socket]]:
        """Run one handshake to completion; raises HandshakeError."""
        identities, diagnose = plan_identities(self.args)
        # the identity that answered last time first; the others keep host names
        # (resolved when used), so an unused cloud costs no DNS lookup
        identities.sort(key=lambda i: i.profile.name != self.answered)
        first = identities[0]
        cloud = self._resolve(first.cloud)
        identities[0] = CloudIdentity(first.profile, cloud, first.cloud_user, first.cloud_key)
        bind_ip = udp_bind_address(cloud[0], self.args.udp_bind)
        socks = {}
        try:
            for name in (MAIN, P2PSRV, RELAY):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks[name] = s
                s.bind((bind_ip, 0))
        except OSError as exc:
            for s in socks.values():
                s.close()
            raise HandshakeError(f"cannot bind UDP to {bind_ip}: {exc}", "local") from exc
        try:
            port = socks[MAIN].getsockname()[1]
            lan: list[str] = []
            if bind_ip == "0.0.0.0":
                local = (egress_address(cloud), port)
                if self.args.local_addr == "all":
                    lan = interface_addresses()
            else:
                local = (bind_ip, port)
            log.debug("UDP sockets on %s; LocalAddr %s", bind_ip, format_local_addr(lan, local))
            hs = Handshake(
                self.args.serial,
                cloud,
                local,
                mode=self.args.mode,
                username=self.args.user,
                password=self.args.password,
                retry=Retry(give_up=self.args.timeout),
                punch_timeout=self.args.punch_timeout,
                relay_grace=self.args.relay_grace,
                lan_addrs=tuple(lan),
                punch_check=self.args.punch_check,
                session_options={
                    "dead_after": self.args.peer_timeout,
                    # the tunnel pool's policy, kept by each Session (PROTOCOLS 2.7 (b))
                    "max_realms": self.args.max_realms,
                    "bind_timeout": self.args.bind_timeout,
                    **ptcp.wire_options(self.args),
                },
                identities=tuple(identities),
                diagnose=tuple(diagnose),
                sign_mode=self.sign_mode,
            )
            hs.start(time.monotonic(), time.time())
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
            assert hs.result is not None and hs.result.identity is not None
            answered = hs.result.identity.profile
            if answered.name != self.answered:
                host, port = hs.result.identity.cloud
                print(
                    f"cloud: the device answered the {answered.label} identity ({host}:{port})",
                    file=sys.stderr,
                    flush=True,
                )
                self.answered = answered.name
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
            self._spawn(self._accept_loop, lst, fwd.remote)

    def _accept_loop(self, lst: socket.socket, remote: int) -> None:
        while not self.stop.is_set():
            try:
                client, _ = lst.accept()
            except OSError:
                return
            self._spawn(self._serve, client, remote)

    def _serve(self, client: socket.socket, remote: int) -> None:
        try:
            host, port = client.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "a local client"
        deadline = time.monotonic() + 60.0
        while True:
            slot = self._slot_with_room(deadline)
            if slot is None:
                client.close()
                return
            try:
                realm = slot.tunnel.forward(client, remote, keep_client=True)
            except ptcp.TunnelUnavailable:
                continue  # full, retired or closed meanwhile: the client waits for another
            except ptcp.PTCPError as exc:
                log.warning("connection to device port %d failed: %s", remote, exc)
                return
            where = "an extra tunnel" if slot.extra else "the tunnel"
            log.info("%s -> device port %d on realm %08x (%s)", peer, remote, realm, where)
            return

    def _slot_with_room(self, deadline: float) -> _Slot | None:
        """A tunnel that takes a new realm now; opens another one when all are full or
        retired.  None when stopping or after ``deadline``."""
        with self.cond:
            while not self.stop.is_set():
                slots = ([self.main] if self.main else []) + self.extras
                for slot in slots:
                    if slot.tunnel.has_room():
                        return slot
                if self.main is not None and not self.opening_extra:
                    self.opening_extra = True
                    self._spawn(self._open_extra)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("no tunnel could take a new client within 60 s")
                    return None
                self.cond.wait(remaining)
        return None

    def _open_extra(self) -> None:
        """Another tunnel to the same device, for clients the others cannot take."""
        log.info("every tunnel is full or retired: opening another one")
        try:
            est, socks = self.handshake()
        except HandshakeError as exc:
            log.warning("could not open another tunnel: %s", exc)
            with self.cond:
                self.opening_extra = False
                self.cond.notify_all()
            return
        slot = self._start_tunnel(est, socks, extra=True)
        with self.cond:
            self.opening_extra = False
            if self.stop.is_set():
                self._spawn(self._close_slot, slot)
            else:
                self.extras.append(slot)
            self.cond.notify_all()
        log.info("extra tunnel open (%s) to %s", est.path, est.peer)

    def _start_tunnel(
        self, est: Established, socks: dict[str, socket.socket], extra: bool = False
    ) -> _Slot:
        box: list[_Slot] = []

        def on_event(event: ptcp.Event) -> None:
            # who ended a connection: "peer" is the device (its service closed), "local" is us
            if isinstance(event, ptcp.RealmClosed):
                log.info("realm %08x closed (%s)", event.realm, event.reason)
                if extra and box and box[0].tunnel.realm_count == 0:
                    self._retire_extra(box[0])
            watch = self.watch
            if isinstance(event, ptcp.RealmConnected) and watch is not None and not extra and box:
                stats = box[0].tunnel.stats
                watch.connected(event.realm, time.monotonic(), stats.data_in, stats.data_out)

        def on_dead() -> None:
            if extra and box:
                self._retire_extra(box[0])
            with self.cond:
                self.cond.notify_all()

        tunnel = ptcp.PTCPTunnel(
            socks[est.sock],
            est.peer,
            est.session,
            on_dead=on_dead,
            on_event=on_event,
            own_socket=False,
            gso=not self.args.no_gso,
            run_thread=self.in_thread,
        )
        slot = _Slot(tunnel, est, socks, extra)
        box.append(slot)
        tunnel.start()
        return slot

    def _retire_extra(self, slot: _Slot) -> None:
        with self.cond:
            if slot not in self.extras:
                return
            self.extras.remove(slot)
            self.cond.notify_all()
        log.info("extra tunnel to %s closes (no realm left)", slot.est.peer)
        self._spawn(self._close_slot, slot)

    def _close_slot(self, slot: _Slot) -> None:
        """DISC what is open, release a relay, close the sockets."""
        slot.tunnel.close()
        log.info("tunnel to %s closed: %s", slot.est.peer, slot.tunnel.health().line())
        est = slot.est
        if est.path == "relay" and est.token and est.relay_addr:
            try:
                slot.socks[RELAY].sendto(
                    unbind_request(est.token, est.relay_cseq, est.identity), est.relay_addr
                )
            except OSError:
                pass
        for s in slot.socks.values():
            s.close()

    def _report(self) -> None:
        """One line per tunnel every --stats-interval seconds, at -v."""
        while not self.stop.wait(self.args.stats_interval):
            with self.cond:
                slots = ([self.main] if self.main else []) + list(self.extras)
            for slot in slots:
                kind = "extra" if slot.extra else "main"
                log.info("%s tunnel %s: %s", kind, slot.est.path, slot.tunnel.health().line())

    def run(self) -> int:
        backoff = 1.0
        attempts = 0
        if self.args.stats_interval > 0:
            self._spawn(self._report, name="report")
        while not self.stop.is_set():
            try:
                est, socks = self.handshake()
            except HandshakeError as exc:
                if exc.kind == "stopped":
                    break
                if exc.kind == "no_sign" and self.sign_mode == "auto":
                    log.warning("%s: trying again without the sign exchange", exc)
                    self.sign_mode = "never"  # for this device from now on
                    continue
                attempts += 1
                fatal = exc.kind in ("auth", "local", "wrong_app") or (
                    not self.ready_printed and attempts > self.args.retries
                )
                if fatal:
                    print(f"dh_p2p: {exc}", file=sys.stderr, flush=True)
                    return {
                        "auth": EXIT_AUTH,
                        "offline": EXIT_OFFLINE,
                        "unreachable": EXIT_CLOUD_UNREACHABLE,
                        "wrong_app": EXIT_WRONG_APP,
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
        # armed before any realm can open: only when --sign auto chose the exchange,
        # and once (PROTOCOLS 2.7 (c))
        self.watch = SilentRealmWatch() if est.sign_exchange and self.sign_mode == "auto" else None
        slot = self._start_tunnel(est, socks)
        tunnel = slot.tunnel
        log.info("tunnel open (%s) to %s", est.path, est.peer)
        with self.cond:
            self.main = slot
            self.cond.notify_all()
        if not self.ready_printed:
            self.ready_printed = True
            self._print_ready(est)
        else:
            print(f"reconnected ({est.path})", flush=True)
        with self.cond:
            while not (self.stop.is_set() or tunnel.dead.is_set()):
                self.cond.wait(1.0 if self.watch is not None else None)
                stats = tunnel.stats
                all_acked = tunnel.session.unacked_bytes == 0
                if self.watch is not None and self.watch.silent(
                    time.monotonic(), stats.data_in, stats.data_out, all_acked
                ):
                    log.warning(
                        "the device accepted a connection but sent nothing for %.0f s: "
                        "reconnecting without the sign exchange (2024+ firmware?)",
                        self.watch.after,
                    )
                    self.sign_mode = "never"  # for this device from now on
                    break
            self.watch = None
            self.main = None
            extras, self.extras = self.extras, []
        if tunnel.dead.is_set() and not self.stop.is_set():
            log.warning("session with the device died; reconnecting")
        for extra in extras:  # on stop; or the device rebooted: they are dead as well
            if self.stop.is_set() or extra.tunnel.dead.is_set():
                self._close_slot(extra)
            else:
                with self.cond:
                    self.extras.append(extra)
        self._close_slot(slot)

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
            self._spawn(self._print_channels)

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
            extras, self.extras = self.extras, []
        for slot in extras:
            self._close_slot(slot)
        for lst, _ in self.listeners:
            try:
                lst.close()
            except OSError:
                pass


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = helpers.Parser(
        prog="dh_p2p.py",
        description="Forward local TCP ports to a Dahua device reached by serial number "
        "through the Easy4IPCloud P2P service.",
        epilog="Secrets may come from DH_P2P_USERNAME, DH_P2P_PASSWORD, DH_P2P_CLOUD_USER and "
        "DH_P2P_CLOUD_KEY. " + EPILOG,
    )
    p.add_argument("serial", nargs="?", help="the device's serial number (none with --config)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="run every [[device]] of this TOML file; SIGHUP re-reads it (see README)",
    )
    p.add_argument(
        "--health",
        metavar="[HOST:]PORT",
        help="serve /livez /readyz /metrics /status here (host 127.0.0.1 unless given; "
        "with --config default: the file's health, else off)",
    )
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
        "--password",
        help="device password (visible in ps: prefer --password-file or DH_P2P_PASSWORD)",
    )
    p.add_argument(
        "--password-file", metavar="PATH", help="read the device password from its first line"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--direct", dest="mode", action="store_const", const="direct")
    mode.add_argument("--relay", dest="mode", action="store_const", const="relay")
    p.set_defaults(mode="auto")
    p.add_argument(
        "--app",
        choices=("auto", *helpers.APP_PROFILES),
        default="auto",
        help="the phone/PC app whose cloud identity the device is bound to: auto (default) "
        "tries smartpss, then dmss when the first does not know the serial",
    )
    clouds = ", ".join(f"{p.name} {p.host}:{p.port}" for p in helpers.APP_PROFILES.values())
    p.add_argument(
        "--cloud",
        action="append",
        default=[],
        metavar="[APP=]HOST[:PORT]",
        help=f"main cloud server of APP (repeatable; without APP=: of the app in use, smartpss "
        f"for auto; defaults: {clouds})",
    )
    p.add_argument(
        "--cloud-user",
        default=env("DH_P2P_CLOUD_USER"),
        help="WSSE user of the app in use (smartpss for auto)",
    )
    p.add_argument(
        "--cloud-key", default=env("DH_P2P_CLOUD_KEY"), help="WSSE key of the app in use"
    )
    p.add_argument(
        "--sign",
        choices=SIGN_MODES,
        default="auto",
        help="the 0x17/0x19/0x1b sign exchange: auto (default) skips it for firmware "
        "version 6.x/7.x (2024 on), always, or never",
    )
    p.add_argument(
        "--channels", action="store_true", help="list channel titles and RTSP URLs (needs :80)"
    )
    seconds = helpers.positive_seconds
    p.add_argument("--timeout", type=seconds, default=15.0, help="give up a step after S seconds")
    p.add_argument(
        "--retries",
        type=helpers.integer_in(0, 1000, "count"),
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
    p.add_argument(
        "--udp-bind",
        metavar="ADDR",
        help="local address of the UDP sockets that talk to the cloud and the device "
        "(default: all interfaces; 127.0.0.1 when the cloud is on loopback)",
    )
    p.add_argument(
        "--local-addr",
        choices=("all", "egress"),
        default="all",
        help="what LocalAddr tells the device: every interface address then the egress "
        "address:port, as the DMSS app does (all, default), or egress address:port only",
    )
    p.add_argument(
        "--relay-grace",
        type=float,
        default=1.5,
        metavar="S",
        help="in auto mode, wait S seconds after the relay opens for the direct path "
        "before settling for the relay (default %(default)s)",
    )
    p.add_argument(
        "--punch-check",
        choices=("identify", "address"),
        default="identify",
        help="which punches are the device's: from its IP and carrying our Identify "
        "(default), or from its IP only",
    )
    ptcp.add_wire_arguments(p)
    p.add_argument(
        "--max-realms",
        type=int,
        default=8,
        metavar="N",
        help="connections per tunnel; more clients get another tunnel to the device "
        "(default %(default)s)",
    )
    p.add_argument(
        "--bind-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="a tunnel whose device leaves a connection request unanswered for S seconds "
        "takes no new connections (default %(default)s)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="with -v, log each tunnel's counters every S seconds (0: never)",
    )
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
    if args.config:
        if args.serial or args.port:
            parser.error("--config takes the serials and forwards from the file")
        return run_service(args)
    if args.serial is None:
        parser.error("the serial number is required (or --config FILE)")
    try:
        identities, _ = plan_identities(args)
        cloud = identities[0].cloud
        health_addr = helpers.parse_listen_address(args.health, "--health") if args.health else None
        forwards = [parse_forward(f) for f in args.port]
        args.password = helpers.password_from(
            args.password, args.password_file, "DH_P2P_PASSWORD"
        )
    except ValueError as exc:  # helpers.UsageError too
        parser.error(str(exc))
    args.user = args.user or None  # an empty environment variable means "not given"
    args.password = args.password or None
    if (args.user is None) != (args.password is None):
        parser.error("give both -u/--user and --password (or neither)")
    if args.channels and not any(f.remote == 80 for f in forwards):
        forwards.append(Forward("127.0.0.1", 0, 80))
    if not any(f.remote == 554 for f in forwards) and not args.port:
        forwards.insert(0, Forward("127.0.0.1", 554, 554, explicit=False))
    client = Client(args, cloud) if health_addr is None else single_device(args, cloud, forwards)
    try:
        client.open_listeners(forwards)
        health = serve_health(health_addr, client) if health_addr is not None else None
    except OSError as exc:
        client.shutdown()
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
        if health is not None:
            health.close()


# ---------------------------------------------------------------------------
# Service mode: many devices from one config file (--config), health endpoints
# ---------------------------------------------------------------------------

DEVICE_KEYS = (
    "name",
    "serial",
    "forward",
    "app",
    "cloud",
    "mode",
    "username",
    "password_env",
    "password_file",
    "on_demand",
    "idle_close",
)
APPS = ("auto", "smartpss", "dmss")
MODES = ("auto", "direct", "relay")
SUPERVISED_RETRIES = 1 << 62  # a supervised device keeps retrying (with backoff)


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[[device]]`` entry, checked.  Equal configs mean "leave it running"."""

    name: str
    serial: str
    forwards: tuple[Forward, ...]
    app: str  # as --app
    clouds: tuple[str, ...]  # as --cloud ([APP=]HOST[:PORT]); empty: the command line's
    mode: str
    username: str | None
    password: str | None = field(default=None, repr=False)
    on_demand: bool = False
    idle_close: float = 60.0


@dataclass(frozen=True)
class ServiceConfig:
    """A whole config file: the devices that are right, and what is wrong with the others."""

    health: str | None
    devices: tuple[DeviceConfig, ...]
    errors: dict[str, str]  # device name (or "device N") -> why its entry was not taken


def check_clouds(entries: list, app: str, where: str) -> tuple[str, ...]:
    """``cloud`` entries ``[APP=]HOST[:PORT]``, as ``--cloud`` takes them; raises
    ConfigError.  With ``app`` not auto, an entry naming another app is an error."""
    checked = []
    for text in entries:
        if not isinstance(text, str):
            raise helpers.ConfigError(f"{where}: cloud entries must be strings")
        try:
            named, _address = parse_cloud_option(text)
        except ValueError as exc:
            raise helpers.ConfigError(f"{where}: cloud {text!r}: {exc}") from None
        if named is not None and app != "auto" and named != app:
            raise helpers.ConfigError(f"{where}: cloud {text!r} is for {named}, app is {app}")
        checked.append(text)
    return tuple(checked)


def _choice(entry: dict, key: str, choices: tuple[str, ...], where: str) -> str:
    value = entry.get(key, choices[0])
    if value not in choices:
        raise helpers.ConfigError(f"{where}: {key} must be one of {', '.join(choices)}")
    return value


def parse_device_entry(
    entry: object, where: str, environ: dict[str, str] | None = None
) -> DeviceConfig:
    """One ``[[device]]`` table -> DeviceConfig; raises ConfigError."""
    if not isinstance(entry, dict):
        raise helpers.ConfigError(f"{where}: must be a table")
    helpers.check_keys(entry, (*DEVICE_KEYS, "password"), where)  # password: a clear error below
    serial = entry.get("serial")
    if not isinstance(serial, str) or not serial.strip() or serial != serial.strip():
        raise helpers.ConfigError(f"{where}: serial must be a non-empty string")
    name = entry.get("name", serial)
    if not isinstance(name, str) or not name.strip():
        raise helpers.ConfigError(f"{where}: name must be a non-empty string")
    forward = entry.get("forward")
    if isinstance(forward, str):
        forward = [forward]
    if not isinstance(forward, list) or not forward:
        raise helpers.ConfigError(f"{where}: forward must list [BIND:]LOCAL:REMOTE entries")
    if not all(isinstance(f, str) for f in forward):
        raise helpers.ConfigError(f"{where}: forward entries must be strings")
    try:
        forwards = tuple(parse_forward(f) for f in forward)
    except ValueError as exc:
        raise helpers.ConfigError(f"{where}: forward: {exc}") from None
    app = _choice(entry, "app", APPS, where)
    clouds = entry.get("cloud", [])
    if isinstance(clouds, str):
        clouds = [clouds]
    if not isinstance(clouds, list):
        raise helpers.ConfigError(f"{where}: cloud must be a list of [APP=]HOST[:PORT]")
    clouds = check_clouds(clouds, app, where)
    username = entry.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise helpers.ConfigError(f"{where}: username must be a non-empty string")
    password = helpers.entry_password(entry, where, environ)
    if (username is None) != (password is None):
        raise helpers.ConfigError(
            f"{where}: give username with password_env or password_file (or none of them)"
        )
    on_demand = entry.get("on_demand", False)
    if not isinstance(on_demand, bool):
        raise helpers.ConfigError(f"{where}: on_demand must be true or false")
    idle_close = entry.get("idle_close", 60)
    if isinstance(idle_close, bool) or not isinstance(idle_close, int | float) or idle_close < 0:
        raise helpers.ConfigError(f"{where}: idle_close must be a number of seconds >= 0")
    return DeviceConfig(
        name=name,
        serial=serial,
        forwards=forwards,
        app=app,
        clouds=tuple(clouds),
        mode=_choice(entry, "mode", MODES, where),
        username=username,
        password=password,
        on_demand=on_demand,
        idle_close=float(idle_close),
    )


def parse_service_config(data: dict, environ: dict[str, str] | None = None) -> ServiceConfig:
    """A loaded TOML document -> ServiceConfig.  A wrong ``[[device]]`` entry (or one
    whose name or local port another entry already has) lands in ``errors`` and the
    rest are kept; a wrong file as a whole raises ConfigError."""
    health, devices, errors = helpers.parse_service_file(
        data,
        "device",
        lambda entry, where: parse_device_entry(entry, where, environ),
        lambda device: [f"{f.bind}:{f.local}" for f in device.forwards if f.local],
    )
    return ServiceConfig(health, tuple(devices), errors)


def device_namespace(base: argparse.Namespace, device: DeviceConfig) -> argparse.Namespace:
    """The command line's options with this device's settings on top."""
    args = argparse.Namespace(**vars(base))
    args.serial = device.serial
    args.app = device.app
    if device.clouds:
        args.cloud = list(device.clouds)
    args.user, args.password = device.username, device.password
    args.mode = device.mode
    args.channels = False
    args.retries = SUPERVISED_RETRIES
    return args


_log_context = threading.local()  # .device: the device a thread works for


class DeviceLogPrefix(logging.Filter):
    """Gives every record ``device``: "[NAME] " in a device's own threads, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(_log_context, "device", None)
        record.device = f"[{name}] " if name else ""
        return True


class DeviceClient(Client):
    """A Client run by a supervisor thread (:meth:`supervise`); keeps what /readyz,
    /metrics and /status show: its state, why it is not up, and counters summed over
    every tunnel it opened (wrap-safe, sampled by :meth:`sample_counters`)."""

    def __init__(self, args: argparse.Namespace, cloud: tuple[str, int], config: DeviceConfig):
        super().__init__(args, cloud)
        self.config = config
        self.state = "idle" if config.on_demand else "starting"
        self.reason = "on demand: no client" if config.on_demand else "not connected yet"
        self.handshake_seconds: float | None = None
        self.reconnects = 0
        self.waiting = 0  # local clients waiting for a tunnel (on demand: the demand)
        self._reporting = False
        self._counts_lock = threading.Lock()
        self._last: dict[ptcp.PTCPTunnel, tuple[int, int, int, int]] = {}
        self.totals = {"sent": 0, "received": 0, "retransmits": 0, "resend_requests": 0}

    # -- what the supervisor and the health endpoints read ----------------------------

    def is_up(self) -> bool:
        main = self.main
        return main is not None and not main.tunnel.dead.is_set()

    @staticmethod
    def _readings(tunnel: ptcp.PTCPTunnel) -> tuple[int, int, int, int]:
        health = tunnel.health()
        return health.sent, tunnel.session.recv, health.retransmits, health.resend_requests

    def _add(self, tunnel: ptcp.PTCPTunnel) -> None:
        before = self._last[tunnel]
        now = self._readings(tunnel)
        self._last[tunnel] = now
        for key, old, new in zip(self.totals, before, now, strict=True):
            self.totals[key] += (new - old) & ptcp.MASK32

    def sample_counters(self) -> None:
        """Add what every open tunnel did since the last sample (call at least once a
        few seconds: the stream offsets are 32 bits)."""
        with self._counts_lock:
            for tunnel in list(self._last):
                self._add(tunnel)

    def snapshot(self) -> dict:
        """State and counters now, as plain values (no credentials)."""
        self.sample_counters()
        with self.cond:
            main = self.main
            slots = ([main] if main else []) + list(self.extras)
        srtt = main.tunnel.session.srtt if main is not None else None
        with self._counts_lock:
            totals = dict(self.totals)
        return {
            "serial": self.config.serial,
            "on_demand": self.config.on_demand,
            "up": self.is_up(),
            "state": self.state,
            "reason": "" if self.is_up() else self.reason,
            "path": main.est.path if main is not None else None,
            "forwards": [f"{f.bind}:{f.local}->{f.remote}" for _, f in self.listeners],
            "handshake_seconds": self.handshake_seconds,
            "reconnects": self.reconnects,
            "tunnels": len(slots),
            "realms": sum(s.tunnel.realm_count for s in slots),
            "bytes_sent": totals["sent"],
            "bytes_received": totals["received"],
            "retransmissions": totals["retransmits"],
            "resend_requests": totals["resend_requests"],
            "round_trip_seconds": srtt,
        }

    # -- hooks into Client --------------------------------------------------------------

    def handshake(self) -> tuple[Established, dict[str, socket.socket]]:
        started = time.monotonic()
        try:
            result = super().handshake()
        except HandshakeError as exc:
            if exc.kind != "stopped":
                self.reason = f"handshake failed ({exc.kind}): {exc}"
                log.info("device %s: %s", self.config.name, self.reason)
            raise
        self.handshake_seconds = time.monotonic() - started
        return result

    def _start_tunnel(
        self, est: Established, socks: dict[str, socket.socket], extra: bool = False
    ) -> _Slot:
        slot = super()._start_tunnel(est, socks, extra)
        with self._counts_lock:
            self._last[slot.tunnel] = self._readings(slot.tunnel)
        return slot

    def _close_slot(self, slot: _Slot) -> None:
        super()._close_slot(slot)
        with self._counts_lock:
            if slot.tunnel in self._last:
                self._add(slot.tunnel)
                del self._last[slot.tunnel]

    def _run_tunnel(self, est: Established, socks: dict[str, socket.socket]) -> None:
        if self.ready_printed:
            self.reconnects += 1
        self.state, self.reason = "up", ""
        super()._run_tunnel(est, socks)
        if not self.stop.is_set():
            self.state, self.reason = "down", "the session with the device died; reconnecting"

    def in_thread(self, work: Callable[[], object]) -> object:
        _log_context.device = self.config.name  # log lines of this thread name the device
        return work()

    def _report(self) -> None:
        if not self._reporting:  # run() starts one per call; the supervisor may call it again
            self._reporting = True
            super()._report()

    def _serve(self, client: socket.socket, remote: int) -> None:
        with self.cond:
            self.waiting += 1
            self.cond.notify_all()
        try:
            super()._serve(client, remote)
        finally:
            with self.cond:
                self.waiting -= 1
                self.cond.notify_all()

    def shutdown(self) -> None:
        # a listener closed while its thread sits in accept() stays bound on Linux until
        # accept returns; shutdown() wakes it, so a restarted device can bind the port again
        for lst, _ in self.listeners:
            try:
                lst.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().shutdown()

    # -- supervision ---------------------------------------------------------------------

    def supervise(self) -> None:
        """Run the device until :meth:`shutdown`; ``run`` gives up only on refused
        credentials or a local error, and then it is tried again after a backoff."""
        _log_context.device = self.config.name
        backoff = 5.0
        while not self.stop.is_set():
            code = self.run_on_demand() if self.config.on_demand else self.run()
            if self.stop.is_set():
                break
            self.state = "down"
            log.warning(
                "device %s: gave up (exit %d: %s); trying again in %.0f s",
                self.config.name,
                code,
                self.reason,
                backoff,
            )
            self.stop.wait(backoff)
            backoff = min(backoff * 2, 300.0)
        self.state, self.reason = "stopped", "stopped"

    def run_on_demand(self) -> int:
        """Open the tunnel when a local client comes (its connection is accepted at
        once and held meanwhile), close it ``idle_close`` s after the last one."""
        backoff = 1.0
        self.state, self.reason = "idle", "on demand: no client"
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stop.is_set() or self.waiting > 0)
            if self.stop.is_set():
                return EXIT_OK
            try:
                est, socks = self.handshake()
            except HandshakeError as exc:
                if exc.kind == "stopped":
                    return EXIT_OK
                self.state = "down"
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            self._run_on_demand_tunnel(est, socks)

    def _run_on_demand_tunnel(self, est: Established, socks: dict[str, socket.socket]) -> None:
        slot = self._start_tunnel(est, socks)
        log.info("device %s: on-demand tunnel open (%s)", self.config.name, est.path)
        with self.cond:
            self.main = slot
            self.cond.notify_all()
        self.state, self.reason = "up", ""
        if not self.ready_printed:
            self.ready_printed = True
            self._print_ready(est)
        idle_since: float | None = None
        with self.cond:
            while not (self.stop.is_set() or slot.tunnel.dead.is_set()):
                busy = self.waiting or any(s.tunnel.realm_count for s in [slot, *self.extras])
                now = time.monotonic()
                if busy:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= self.config.idle_close:
                    break
                self.cond.wait(0.25)
            self.main = None
            extras, self.extras = self.extras, []
        died = slot.tunnel.dead.is_set() and not self.stop.is_set()
        for extra in extras:
            self._close_slot(extra)
        self._close_slot(slot)
        if died:
            self.reconnects += 1
            self.state, self.reason = "down", "the session with the device died"
        else:
            log.info("device %s: on-demand tunnel closed (idle)", self.config.name)
            self.state, self.reason = "idle", "on demand: no client"


DEVICE_METRICS = (
    # (name, kind, help, key of DeviceClient.snapshot())
    ("dh_p2p_device_up", "gauge", "1 when the device's main tunnel is open.", "up"),
    ("dh_p2p_handshake_seconds", "gauge", "Duration of the last handshake.", "handshake_seconds"),
    ("dh_p2p_reconnects_total", "counter", "Tunnels reopened after one died.", "reconnects"),
    ("dh_p2p_realms_open", "gauge", "Connections (realms) open through the device's tunnels.",
     "realms"),
    ("dh_p2p_retransmissions_total", "counter", "PTCP packets sent again.", "retransmissions"),
    ("dh_p2p_resend_requests_total", "counter", "0x0a resend requests from the device.",
     "resend_requests"),
    ("dh_p2p_round_trip_seconds", "gauge", "Smoothed round trip of the main tunnel.",
     "round_trip_seconds"),
)


def device_metrics(snapshots: dict[str, dict]) -> list[helpers.Metric]:
    """Metric families from ``{name: DeviceClient.snapshot()}``; pure."""
    families = helpers.metric_families(DEVICE_METRICS, snapshots, "device")
    byte_samples = [
        ({"device": name, "direction": direction}, float(snap[f"bytes_{direction}"]))
        for name, snap in snapshots.items()
        for direction in ("sent", "received")
    ]
    families.append(
        helpers.Metric(
            "dh_p2p_bytes_total", "counter", "PTCP stream bytes by direction.", byte_samples
        )
    )
    return families


class Service(helpers.HealthSource):
    """The devices of a config file, each a DeviceClient with its supervisor thread."""

    def __init__(self, base_args: argparse.Namespace, path: str, cloud: tuple[str, int]):
        self.base_args = base_args
        self.path = path
        self.cloud = cloud
        self.devices: dict[str, DeviceClient] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.errors: dict[str, str] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.reload_wanted = False
        self.health_in_file: str | None = None  # the file's health at start
        self.stopping = False
        self.last_tick = time.monotonic()

    def load(self) -> ServiceConfig:
        return parse_service_config(helpers.load_toml(self.path))

    def apply(self, config: ServiceConfig) -> None:
        """Stop removed and changed devices, start added and changed ones; leave the rest."""
        wanted = {d.name: d for d in config.devices}
        with self.lock:
            running = dict(self.devices)
        stale = [n for n, c in running.items() if wanted.get(n) != c.config]
        stoppers = [threading.Thread(target=self._stop_device, args=(n,)) for n in stale]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        errors = dict(config.errors)
        for name, device in wanted.items():
            if name not in self.devices:
                why = self._start_device(device)
                if why:
                    errors[name] = why
        for why in errors.values():
            print(f"dh_p2p: {why}", file=sys.stderr, flush=True)
        with self.lock:
            self.errors = errors

    def _start_device(self, device: DeviceConfig) -> str | None:
        args = device_namespace(self.base_args, device)
        client = DeviceClient(args, plan_identities(args)[0][0].cloud, device)
        try:
            client.open_listeners(list(device.forwards))
        except OSError as exc:
            client.shutdown()
            return f"device {device.name!r}: cannot listen: {exc}"
        thread = threading.Thread(
            target=client.supervise, name=f"device {device.name}", daemon=True
        )
        with self.lock:
            self.devices[device.name] = client
            self.threads[device.name] = thread
        thread.start()
        log.info("device %s (%s) started", device.name, device.serial)
        return None

    def _stop_device(self, name: str) -> None:
        with self.lock:
            client = self.devices.pop(name)
            thread = self.threads.pop(name)
        client.shutdown()
        thread.join(15.0)
        log.info("device %s stopped", name)

    def reload(self) -> None:
        """Re-read the file (SIGHUP); a file that cannot be read keeps what runs."""
        try:
            config = self.load()
        except helpers.ConfigError as exc:
            print(f"dh_p2p: {exc}; keeping the running devices", file=sys.stderr, flush=True)
            return
        if not self.base_args.health:  # --health overrides the file
            note = helpers.health_change_note(self.health_in_file, config.health)
            if note:
                print(f"dh_p2p: {note}", file=sys.stderr, flush=True)
        self.apply(config)
        print(f"reloaded {self.path}: {len(self.devices)} devices", flush=True)

    def run(self, config: ServiceConfig) -> int:
        """Apply ``config``, then serve until SIGTERM/SIGINT; SIGHUP reloads."""

        def on_hup(signum, frame) -> None:
            self.reload_wanted = True
            self.wake.set()

        def on_stop(signum, frame) -> None:
            self.stopping = True
            self.wake.set()

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        self.apply(config)
        print(f"service: {len(self.devices)} devices from {self.path}", flush=True)
        while not self.stopping:
            self.wake.wait(1.0)
            self.wake.clear()
            self.tick()
            if self.reload_wanted and not self.stopping:
                self.reload_wanted = False
                self.reload()
        self.apply(ServiceConfig(None, (), {}))
        return EXIT_OK

    def tick(self) -> None:
        """Once a second: the loop is alive, and every device's counters are sampled."""
        self.last_tick = time.monotonic()
        with self.lock:
            clients = list(self.devices.values())
        for client in clients:
            client.sample_counters()

    # -- health endpoints ------------------------------------------------------------------

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < 10.0

    def _snapshots(self) -> dict[str, dict]:
        with self.lock:
            clients = dict(self.devices)
        return {name: client.snapshot() for name, client in clients.items()}

    def not_ready(self) -> dict[str, str]:
        with self.lock:
            missing = dict(self.errors)
            clients = dict(self.devices)
        for name, client in clients.items():
            if not client.config.on_demand and not client.is_up():
                missing[name] = client.reason or client.state
        return missing

    def metrics(self) -> list[helpers.Metric]:
        return device_metrics(self._snapshots())

    def status(self) -> dict:
        with self.lock:
            errors = dict(self.errors)
        return {"config": self.path, "devices": self._snapshots(), "errors": errors}


def single_device(
    args: argparse.Namespace, cloud: tuple[str, int], forwards: list[Forward]
) -> DeviceClient:
    """The command line's one device as a DeviceClient (for --health without --config)."""
    config = DeviceConfig(
        name=args.serial,
        serial=args.serial,
        forwards=tuple(forwards),
        app=args.app,
        clouds=tuple(args.cloud),
        mode=args.mode,
        username=args.user,
        password=args.password,
    )
    return DeviceClient(args, cloud, config)


def serve_health(address: tuple[str, int], client: DeviceClient) -> helpers.HealthServer:
    """Health endpoints for the command line's one device; raises OSError."""
    service = Service(client.args, "", client.cloud)
    service.devices[client.config.name] = client
    server = helpers.HealthServer(address, service).start()

    def tick() -> None:
        while not client.stop.wait(1.0):
            service.tick()

    threading.Thread(target=tick, name="health tick", daemon=True).start()
    host, port = server.address
    print(f"health: http://{host}:{port}/readyz", flush=True)
    return server


def run_service(args: argparse.Namespace) -> int:
    """``--config FILE``: every device of the file in this process."""
    try:
        config = parse_service_config(helpers.load_toml(args.config))
        cloud = plan_identities(args)[0][0].cloud
        health_text = args.health or config.health
        health_addr = helpers.parse_listen_address(health_text, "health") if health_text else None
    except (helpers.ConfigError, ValueError) as exc:
        print(f"dh_p2p: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for handler in logging.getLogger().handlers:  # which device a log line is about
        handler.addFilter(DeviceLogPrefix())
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(device)s%(message)s"))
    service = Service(args, args.config, cloud)
    service.health_in_file = config.health
    health = None
    if health_addr is not None:
        try:
            health = helpers.HealthServer(health_addr, service).start()
        except OSError as exc:
            print(f"dh_p2p: cannot serve health on {health_text}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        host, port = health.address
        print(f"health: http://{host}:{port}/readyz", flush=True)
    try:
        return service.run(config)
    finally:
        if health is not None:
            health.close()


if __name__ == "__main__":
    sys.exit(main())
