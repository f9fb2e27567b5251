#!/usr/bin/env python3
"""Samsung SmartViewer DVR "DCP" client: log in, describe the box, keep an RTSP token alive.

The DVR's RTSP server only accepts an ``Authorization:`` token obtained over its DCP service
(TCP, RTSP port + 1), and only while that DCP connection stays open and keeps sending
heartbeats (PROTOCOLS.md section 1.1).

Library use::

    with TokenKeeper("127.0.0.1", 555, "admin", "4321") as keeper:
        token = keeper.start()
        ...  # use token in RTSP requests while keeper.alive

Command line::

    svtool.py rtsp://admin:4321@127.0.0.1:554/ describe
    svtool.py --username admin rtsp://127.0.0.1/ authorize --duration 0
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import helpers
from helpers import EPILOG, ExitCode

log = logging.getLogger("svtool")

__all__ = [
    "SVError",
    "SVProtocolError",
    "SVArgumentError",
    "AuthenticationError",
    "Message",
    "MessageDecoder",
    "encode_message",
    "scramble_username",
    "hash_password",
    "build_authenticate",
    "build_describe",
    "build_heartbeat",
    "parse_describe",
    "ClientProtocol",
    "AuthResult",
    "DescribeResult",
    "HeartbeatAck",
    "Notification",
    "DCPClient",
    "TokenKeeper",
    "parse_dvr_url",
    "main",
]

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class SVError(Exception):
    """Base class of every error raised by svtool."""


class SVProtocolError(SVError):
    """The DVR sent bytes that do not follow the DCP protocol."""


class SVArgumentError(SVError, ValueError):
    """A caller-supplied value cannot be used (username too long, bad URL, ...)."""


class AuthenticationError(SVError):
    """The DVR refused the login; ``reason`` is the DVR's own text."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"DVR refused the login: {reason}")


# ---------------------------------------------------------------------------------------------
# Wire format (PROTOCOLS 1.1) -- pure code, no sockets
# ---------------------------------------------------------------------------------------------

MAGIC = b"SV\x00\x00"  # 0x00005653 little-endian
HEADER_SIZE = 44
NAME_OFFSET, NAME_SIZE = 8, 25
TYPE_OFFSET, TYPE_SIZE = 33, 11
PAYLOAD_TYPES = ("TEXT", "BINARY")
MAX_MESSAGE_SIZE = 256 * 1024
USERNAME_KEY = bytes.fromhex("70b3366ac0a375aa1d6b8469d3ae4ab1")

_LENGTH = struct.Struct("<I")


class Message(NamedTuple):
    """One decoded DCP message. ``payload`` is every byte after the 44-byte header."""

    name: str
    payload_type: str
    payload: bytes

    @property
    def text(self) -> str:
        """The payload as the DVR means it: up to the first NUL, latin-1 (PROTOCOLS 1.1)."""
        return self.payload.split(b"\x00", 1)[0].decode("latin-1")


def encode_message(name: str, payload: bytes = b"", payload_type: str = "BINARY") -> bytes:
    """Build one DCP message: 44-byte header (magic, length, name, type) then ``payload``."""
    try:
        raw_name = name.encode("ascii")
    except UnicodeEncodeError:
        raise SVArgumentError(f"message name must be ASCII: {name!r}") from None
    # Keep at least one NUL after the name: readers stop at the first NUL.
    if not raw_name or len(raw_name) >= NAME_SIZE or b"\x00" in raw_name:
        raise SVArgumentError(f"message name must be 1-{NAME_SIZE - 1} bytes: {name!r}")
    if payload_type not in PAYLOAD_TYPES:
        raise SVArgumentError(f"payload type must be one of {PAYLOAD_TYPES}: {payload_type!r}")
    total = HEADER_SIZE + len(payload)
    return b"".join(
        (
            MAGIC,
            _LENGTH.pack(total),
            raw_name.ljust(NAME_SIZE, b"\x00"),
            # PROTOCOLS 1.1: the type field starts with a 0x01 byte before the ASCII name.
            (b"\x01" + payload_type.encode("ascii")).ljust(TYPE_SIZE, b"\x00"),
            payload,
        )
    )


def _ascii_field(field: bytes, what: str, *, strict: bool) -> str:
    value, sep, padding = field.partition(b"\x00")
    if strict and (not sep or padding.strip(b"\x00")):
        raise SVProtocolError(f"{what} field is not NUL-padded")
    if not value or any(b < 0x20 or b > 0x7E for b in value):
        raise SVProtocolError(f"{what} field is not printable ASCII: {value[:32]!r}")
    return value.decode("ascii")


class MessageDecoder:
    """Incremental decoder: feed it any chunks of a byte stream, get whole messages back.

    Raises :class:`SVProtocolError` on bad magic, a length below the header size or above
    ``max_size``, or an unreadable name/type. After an error the stream is out of step and
    every later ``feed`` raises again. ``strict`` additionally demands what a real DVR would
    (type marker byte, NUL padding, TEXT or BINARY only) -- the test emulator uses it.
    """

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE, strict: bool = False) -> None:
        self.max_size = max_size
        self.strict = strict
        self._buf = bytearray()
        self._error: SVProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return the messages they complete (possibly none)."""
        if self._error is not None:
            raise SVProtocolError(f"stream already broken: {self._error}")
        self._buf += data
        out: list[Message] = []
        try:
            while True:
                msg = self._next()
                if msg is None:
                    return out
                out.append(msg)
        except SVProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Message | None:
        buf = self._buf
        # Check the magic as soon as its bytes arrive, so garbage fails fast.
        head = bytes(buf[:4])
        if head != MAGIC[: len(head)]:
            raise SVProtocolError(f"bad magic {head.hex()} (expected {MAGIC.hex()})")
        if len(buf) < 8:
            return None
        (total,) = _LENGTH.unpack_from(buf, 4)
        if total < HEADER_SIZE:
            raise SVProtocolError(f"impossible message length {total} (< {HEADER_SIZE})")
        if total > self.max_size:
            raise SVProtocolError(f"message length {total} over the {self.max_size} byte limit")
        if len(buf) < total:
            return None
        raw = bytes(buf[:total])
        del buf[:total]
        name = _ascii_field(raw[NAME_OFFSET:TYPE_OFFSET], "name", strict=self.strict)
        type_field = raw[TYPE_OFFSET:HEADER_SIZE]
        if self.strict and type_field[:1] != b"\x01":
            raise SVProtocolError("payload type field does not start with 0x01")
        payload_type = _ascii_field(type_field[1:], "payload type", strict=self.strict)
        if self.strict and payload_type not in PAYLOAD_TYPES:
            raise SVProtocolError(f"unknown payload type {payload_type!r}")
        return Message(name, payload_type, raw[HEADER_SIZE:])


def scramble_username(username: str) -> str:
    """The AUTHENTICATE ``ID:`` value: base64 of the UTF-8 name XORed with a fixed key."""
    raw = username.encode("utf-8")
    if not raw:
        raise SVArgumentError("username is empty")
    if len(raw) > len(USERNAME_KEY):
        raise SVArgumentError(
            f"username is {len(raw)} bytes; the DVR protocol allows at most {len(USERNAME_KEY)}"
        )
    return base64.b64encode(bytes(a ^ b for a, b in zip(raw, USERNAME_KEY, strict=False))).decode()


def hash_password(password: str) -> str:
    """The AUTHENTICATE ``PW:`` value: lowercase hex MD5 of the UTF-8 password."""
    return hashlib.md5(password.encode("utf-8")).hexdigest()


def build_authenticate(username: str, password: str) -> bytes:
    """AUTHENTICATE, TEXT payload ``ID:<scrambled user>\\r\\nPW:<md5>\\r\\n``."""
    text = f"ID:{scramble_username(username)}\r\nPW:{hash_password(password)}\r\n"
    return encode_message("AUTHENTICATE", text.encode("ascii"), "TEXT")


def build_describe() -> bytes:
    """DESCRIBE: empty BINARY payload (a bare 44-byte header)."""
    return encode_message("DESCRIBE")


def build_heartbeat() -> bytes:
    """HEARTBEAT: empty BINARY payload (a bare 44-byte header)."""
    return encode_message("HEARTBEAT")


def parse_describe(text: str) -> dict[str, str]:
    """Parse a DESCRIBE_OK payload: ``key:value`` lines, split at the first colon.

    Values are kept as sent (PROTOCOLS 1.1: not stripped); lines without a colon are skipped.
    """
    info: dict[str, str] = {}
    for line in re.split(r"\r?\n", text):
        key, sep, value = line.partition(":")
        if sep and key:
            info[key] = value
    return info


class AuthResult(NamedTuple):
    """Reply to AUTHENTICATE."""

    ok: bool
    reason: str


class DescribeResult(NamedTuple):
    """Reply to DESCRIBE."""

    info: dict[str, str]


class HeartbeatAck(NamedTuple):
    """Reply to HEARTBEAT."""


class Notification(NamedTuple):
    """A whole message the DVR sent while no request was waiting (ignored by the driver)."""

    message: Message


Event = AuthResult | DescribeResult | HeartbeatAck | Notification
_E = TypeVar("_E", AuthResult, DescribeResult, HeartbeatAck)

# Request name -> reply names that answer it. PROTOCOLS 1.1: the HEARTBEAT reply is named
# HEARTBEAT, not HEARTBEAT_OK; the latter is accepted too in case some firmware uses it.
_REPLIES = {
    "AUTHENTICATE": ("AUTHENTICATE_OK",),
    "DESCRIBE": ("DESCRIBE_OK",),
    "HEARTBEAT": ("HEARTBEAT", "HEARTBEAT_OK"),
}


class ClientProtocol:
    """Sans-IO DCP client state: one request in flight, its reply turned into an event.

    Call a ``send_*`` method, write the returned bytes, then give every received chunk to
    :meth:`receive_data` until it returns the event. A reply with the wrong name raises
    :class:`SVProtocolError`; a message arriving while nothing is pending becomes a
    :class:`Notification` (the protocol has none documented, so they are only logged).
    """

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._decoder = MessageDecoder(max_size=max_size)
        self.pending: str | None = None  # name of the request awaiting its reply
        self.authenticated = False

    def _start(self, name: str, data: bytes) -> bytes:
        if self.pending is not None:
            raise SVError(f"cannot send {name} while {self.pending} awaits its reply")
        self.pending = name
        return data

    def send_authenticate(self, username: str, password: str) -> bytes:
        """Bytes of an AUTHENTICATE request."""
        return self._start("AUTHENTICATE", build_authenticate(username, password))

    def send_describe(self) -> bytes:
        """Bytes of a DESCRIBE request."""
        return self._start("DESCRIBE", build_describe())

    def send_heartbeat(self) -> bytes:
        """Bytes of a HEARTBEAT request."""
        return self._start("HEARTBEAT", build_heartbeat())

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; return the events (replies) they complete."""
        events: list[Event] = []
        for msg in self._decoder.feed(data):
            events.append(self._handle(msg))
        return events

    def _handle(self, msg: Message) -> Event:
        if self.pending is None:
            return Notification(msg)
        if msg.name not in _REPLIES[self.pending]:
            raise SVProtocolError(f"DVR answered {self.pending} with {msg.name!r}")
        request, self.pending = self.pending, None
        if request == "AUTHENTICATE":
            # PROTOCOLS 1.1: SUCCESS after stripping CR, LF and NUL means logged in.
            reason = msg.payload.decode("latin-1").strip("\r\n\x00")
            self.authenticated = reason == "SUCCESS"
            return AuthResult(self.authenticated, reason)
        if request == "DESCRIBE":
            return DescribeResult(parse_describe(msg.text))
        return HeartbeatAck()


# ---------------------------------------------------------------------------------------------
# URL handling (pure)
# ---------------------------------------------------------------------------------------------

DEFAULT_RTSP_PORT = 554


def parse_dvr_url(url: str) -> tuple[str, int, str | None, str | None]:
    """Split ``rtsp://[user:pass@]host[:port]/...`` into (host, rtsp_port, user, password).

    User and password are percent-decoded; either is None when absent. Raises
    :class:`SVArgumentError` for anything that is not a usable rtsp URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise SVArgumentError(f"bad URL {_redact_url(url)!r}: {exc}") from None
    if parts.scheme.lower() != "rtsp":
        raise SVArgumentError(f"URL must start with rtsp:// : {_redact_url(url)!r}")
    if not parts.hostname:
        raise SVArgumentError(f"URL has no host: {_redact_url(url)!r}")
    if port == 0:
        raise SVArgumentError("URL port must be 1-65535")
    user = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port or DEFAULT_RTSP_PORT, user or None, password


def _redact_url(url: str) -> str:
    """The URL with any ``user:pass@`` part hidden, for messages."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", url)


# =============================================================================================
# Driver: sockets and threads. Everything below only moves bytes for the code above.
# =============================================================================================


class DCPClient:
    """Blocking DCP connection to one DVR. Every call gives up after ``timeout`` seconds.

    Thread-safe: requests from different threads are serialised.
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._proto = ClientProtocol()
        self._lock = threading.Lock()

    def __enter__(self) -> DCPClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True between a successful connect() and close()."""
        return self._sock is not None

    def connect(self) -> None:
        """Open the TCP connection (raises OSError / socket.timeout)."""
        if self._sock is not None:
            raise SVError("already connected")
        log.debug("connecting to DCP %s:%d", self.host, self.port)
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._proto = ClientProtocol()

    def authenticate(self, user: str, password: str) -> None:
        """Log in; raises :class:`AuthenticationError` with the DVR's reason if refused."""
        build_authenticate(user, password)  # argument errors surface before any I/O
        result = self._request(lambda p: p.send_authenticate(user, password), AuthResult)
        if not result.ok:
            raise AuthenticationError(result.reason or "(empty reason)")
        log.debug("DCP login accepted")

    def describe(self) -> dict[str, str]:
        """Ask the DVR to describe itself; the ``authority`` key holds the RTSP token."""
        return self._request(ClientProtocol.send_describe, DescribeResult).info

    def heartbeat(self) -> None:
        """Send one HEARTBEAT and wait for its echo."""
        self._request(ClientProtocol.send_heartbeat, HeartbeatAck)

    def _request(self, build: Callable[[ClientProtocol], bytes], expect: type[_E]) -> _E:
        with self._lock:
            try:
                sock = self._require_sock()
                data = build(self._proto)
                name = self._proto.pending
                log.debug("sending %s (%d bytes)", name, len(data))
                sock.settimeout(self.timeout)
                sock.sendall(data)
                deadline = time.monotonic() + self.timeout
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no reply to {name} within {self.timeout:g} s")
                    sock.settimeout(remaining)
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError(f"DVR closed the DCP connection during {name}")
                    for event in self._proto.receive_data(chunk):
                        if isinstance(event, expect):
                            log.debug("got the reply to %s", name)
                            return event
                        _log_notification(event)
            except BaseException:
                # A failed request leaves the stream in an unknown state: do not reuse it.
                self._proto.pending = None
                self._drop()
                raise

    def check_alive(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for trouble on an idle connection.

        Returns when the time is up (unrequested messages are logged and ignored); raises
        ConnectionError if the DVR closed the connection, :class:`SVProtocolError` if it sent
        bytes that are not DCP messages.
        """
        sock = self._require_sock()
        readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
        if not readable:
            return
        with self._lock:
            sock = self._require_sock()
            try:
                sock.settimeout(self.timeout)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("DVR closed the DCP connection")
                for event in self._proto.receive_data(chunk):
                    _log_notification(event)
            except BaseException:
                self._drop()
                raise

    def _require_sock(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionError("DCP connection is not open")
        return self._sock

    def shutdown(self) -> None:
        """Wake any thread blocked on this connection (it sees EOF); close() still needed."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Close the connection (idempotent). The DVR then invalidates the token."""
        self.shutdown()
        with self._lock:
            self._drop()


def _log_notification(event: Event) -> None:
    if isinstance(event, Notification):
        msg = event.message
        log.debug("ignoring unrequested %s message (%d byte payload)", msg.name, len(msg.payload))


class TokenKeeper:
    """Holds a DCP login open and heartbeats it on a background thread.

    ``start()`` returns the RTSP ``authority`` token; it stays valid until ``close()`` or until
    the connection is lost, in which case ``on_lost(exc)`` is called once from the heartbeat
    thread (never after close()).
    """

    def __init__(
        self,
        host: str,
        dcp_port: int,
        username: str,
        password: str,
        *,
        timeout: float = 10.0,
        heartbeat_interval: float = 10.0,
        on_lost: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        if heartbeat_interval <= 0:
            raise SVArgumentError("heartbeat interval must be positive")
        self.host = host
        self.dcp_port = dcp_port
        self.username = username
        self._password = password
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.on_lost = on_lost
        self.token: str | None = None
        self.describe_info: dict[str, str] = {}
        self.lost_reason: BaseException | None = None
        self._client: DCPClient | None = None
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._closing = False
        self._lost = False

    def __repr__(self) -> str:  # never shows the password or the token
        return f"TokenKeeper({self.host!r}, {self.dcp_port}, {self.username!r}, alive={self.alive})"

    def __enter__(self) -> TokenKeeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """True while the token is being kept valid."""
        thread = self._thread
        return (
            thread is not None and thread.is_alive() and not self._lost and not self._closing
        )

    def start(self) -> str:
        """Connect, log in, describe; start heartbeats; return the RTSP token."""
        if self._client is not None or self._closing:
            raise SVError("TokenKeeper.start() may be called only once")
        client = DCPClient(self.host, self.dcp_port, self.timeout)
        self._client = client
        try:
            client.connect()
            client.authenticate(self.username, self._password)
            info = client.describe()
            token = info.get("authority", "").strip("\r\n\x00 ")
            if not token:
                raise SVProtocolError("DESCRIBE_OK carries no authority token")
        except BaseException:
            client.close()
            raise
        with self._state_lock:
            if self._closing:  # close() ran while we were logging in
                client.close()
                raise SVError("TokenKeeper was closed during start()")
        self.describe_info = info
        self.token = token
        self._thread = threading.Thread(
            target=self._run,
            args=(client,),
            name=f"sv-heartbeat-{self.host}:{self.dcp_port}",
            daemon=True,
        )
        self._thread.start()
        return token

    def _run(self, client: DCPClient) -> None:
        next_beat = time.monotonic() + self.heartbeat_interval
        error: BaseException | None = None
        try:
            while not self._closing:
                now = time.monotonic()
                if now >= next_beat:
                    client.heartbeat()
                    log.debug("heartbeat answered")
                    next_beat = time.monotonic() + self.heartbeat_interval
                else:
                    client.check_alive(next_beat - now)
        except Exception as exc:  # any failure means the token is gone
            error = exc
        with self._state_lock:
            if self._closing:
                client.close()
                return
            self._lost = True
        self.lost_reason = error
        client.close()
        log.info("DCP connection to %s:%d lost: %s", self.host, self.dcp_port, error)
        if self.on_lost is not None:
            try:
                self.on_lost(error)
            except Exception:
                log.exception("on_lost callback failed")

    def close(self) -> None:
        """Stop heartbeats and close the DCP connection (invalidates the token). Idempotent."""
        with self._state_lock:
            self._closing = True
        client = self._client
        if client is not None:
            client.shutdown()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.timeout + 1.0)
        if client is not None:
            client.close()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

EXIT_OK, EXIT_USAGE, EXIT_AUTH = ExitCode.OK, ExitCode.USAGE, ExitCode.LOGIN_REFUSED
EXIT_NETWORK, EXIT_PROTOCOL = ExitCode.UNREACHABLE, ExitCode.PROTOCOL
EXIT_INTERRUPTED = ExitCode.INTERRUPTED


def _build_parser() -> argparse.ArgumentParser:
    parser = helpers.Parser(
        prog="svtool.py",
        description="Talk to a Samsung SmartViewer DVR's DCP service (RTSP port + 1): "
        "describe it, or obtain an RTSP authority token and keep it valid.",
        epilog="Credentials come from --username/--password(-file), else the URL, else the "
        "environment variables SV_USER / SV_PASS. " + EPILOG,
    )
    parser.add_argument("--username", help="DVR user name (at most 16 bytes)")
    parser.add_argument(
        "--password", help="DVR password (other local users can see it: prefer --password-file)"
    )
    parser.add_argument(
        "--password-file", metavar="PATH", help="read the DVR password from this file's first line"
    )
    parser.add_argument(
        "--dcp-port",
        type=helpers.port_number,
        metavar="N",
        help="DCP port (default: RTSP port + 1)",
    )
    parser.add_argument(
        "--timeout", type=helpers.positive_seconds, default=10.0, metavar="S",
        help="network timeout in seconds (default 10)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only")
    parser.add_argument("url", metavar="URL", help="rtsp://[user:pass@]host[:port]/")
    commands = parser.add_subparsers(dest="command", metavar="{describe,authorize}")
    commands.required = True
    commands.add_parser("describe", help="print the DVR's description as 'key: value' lines")
    auth = commands.add_parser(
        "authorize",
        help="print an RTSP token, then keep it valid",
        description="Print the RTSP authority token as the first stdout line, then keep it "
        "valid until --duration ends or SIGINT/SIGTERM.",
    )
    auth.add_argument(
        "--duration", type=helpers.non_negative_seconds, default=0.0, metavar="S",
        help="seconds to keep the token valid; 0 = until interrupted (default)",
    )
    auth.add_argument(
        "--heartbeat-interval", type=helpers.positive_seconds, default=10.0, metavar="S",
        help="seconds between heartbeats (default 10)",
    )
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="svtool: %(levelname)s: %(message)s")


def _fail(code: int, text: str) -> int:
    print(f"svtool: error: {text}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage / help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(args.verbose, args.quiet)

    try:
        host, rtsp_port, url_user, url_pass = parse_dvr_url(args.url)
    except SVArgumentError as exc:
        return _fail(EXIT_USAGE, str(exc))
    user = args.username or url_user or os.environ.get("SV_USER")
    try:
        given = helpers.password_from(args.password, args.password_file)
    except helpers.UsageError as exc:
        return _fail(EXIT_USAGE, str(exc))
    password = next(
        (p for p in (given, url_pass, os.environ.get("SV_PASS")) if p is not None), None
    )
    if not user:
        return _fail(EXIT_USAGE, "no username: use --username, the URL, or SV_USER")
    if password is None:
        return _fail(EXIT_USAGE, "no password: use --password-file, the URL, or SV_PASS")
    dcp_port = args.dcp_port or rtsp_port + 1
    if dcp_port > 65535:
        return _fail(EXIT_USAGE, f"RTSP port {rtsp_port} + 1 is no port: give --dcp-port")
    try:
        scramble_username(user)
    except SVArgumentError as exc:
        return _fail(EXIT_USAGE, str(exc))

    where = f"{host}:{dcp_port}"
    try:
        if args.command == "describe":
            return _describe(host, dcp_port, user, password, args.timeout)
        return _authorize(host, dcp_port, user, password, args)
    except AuthenticationError as exc:
        return _fail(EXIT_AUTH, f"DVR at {where} refused the login: {exc.reason}")
    except SVProtocolError as exc:
        return _fail(EXIT_PROTOCOL, f"DVR at {where} broke the DCP protocol: {exc}")
    except TimeoutError:
        return _fail(EXIT_NETWORK, f"DVR at {where} timed out after {args.timeout:g} s")
    except OSError as exc:
        return _fail(EXIT_NETWORK, f"cannot talk to DVR at {where}: {exc.strerror or exc}")
    except SVError as exc:
        return _fail(EXIT_PROTOCOL, str(exc))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")


def _describe(host: str, port: int, user: str, password: str, timeout: float) -> int:
    with DCPClient(host, port, timeout) as client:
        client.authenticate(user, password)
        info = client.describe()
    for key, value in info.items():
        print(f"{key}: {value}")
    sys.stdout.flush()
    return EXIT_OK


def _authorize(host: str, port: int, user: str, password: str, args: argparse.Namespace) -> int:
    lost = threading.Event()
    stop = _StopFlag()
    keeper = TokenKeeper(
        host,
        port,
        user,
        password,
        timeout=args.timeout,
        heartbeat_interval=args.heartbeat_interval,
        on_lost=lambda _exc: lost.set(),
    )
    end = time.monotonic() + args.duration if args.duration else None
    with stop, keeper:
        token = keeper.start()
        if stop.requested:  # SIGINT/SIGTERM while logging in: nobody wants the token now
            return _fail(EXIT_INTERRUPTED, "interrupted")
        print(token, flush=True)
        # Poll: a signal handler must not touch locks (an Event) the main thread may hold.
        while not stop.requested:
            remaining = 0.2 if end is None else min(0.2, end - time.monotonic())
            if remaining <= 0 or lost.wait(remaining):
                break
        if lost.is_set():
            raise keeper.lost_reason or ConnectionError("DCP connection lost")
    return EXIT_OK


class _StopFlag:
    """While entered, SIGINT and SIGTERM set ``requested`` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def _handler(self, _signum: int, _frame: object) -> None:
        self.requested = True

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old.clear()


if __name__ == "__main__":
    sys.exit(main())
