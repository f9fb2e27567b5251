"""An emulated Samsung SmartViewer DVR: the DCP service (PROTOCOLS.md section 1.1).

Strict on purpose: anything a real box would choke on (malformed message, unknown name,
DESCRIBE before login, ...) is recorded in ``violations`` and the connection is dropped.
A token is handed out per login and is valid only while that DCP connection stays open;
a connection that sends no HEARTBEAT for ``silence_timeout`` seconds is dropped.

    with EmulatedDCP({"admin": "4321"}, silence_timeout=1.0) as dvr:
        ... connect to dvr.host:dvr.port ...
        assert dvr.is_token_valid(token)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable

from svtool import (
    USERNAME_KEY,
    MessageDecoder,
    SVProtocolError,
    encode_message,
)

log = logging.getLogger("dvr_emulator.dcp")

DEFAULT_INFO = {"model": "SRD-1650DC", "channels": "16"}
REASON_UNKNOWN_USER = "INVALID ID"
REASON_WRONG_PASSWORD = "INVALID PASSWORD"

# PROTOCOLS 1.1: exactly "ID:<base64>\r\nPW:<32 lowercase hex>\r\n".
_AUTH_PAYLOAD = re.compile(rb"ID:([A-Za-z0-9+/]+={0,2})\r\nPW:([0-9a-f]{32})\r\n")


# ---------------------------------------------------------------------------------------------
# DVR side of one DCP connection -- sans-IO: bytes and the time in, reply bytes out
# ---------------------------------------------------------------------------------------------


def reply(name: str, text: str | None = None) -> bytes:
    """A DVR reply; TEXT payloads end with a NUL like the real box's (see vectors.json)."""
    if text is None:
        return encode_message(name)
    return encode_message(name, text.encode("latin-1") + b"\x00", "TEXT")


def unscramble_username(value: bytes) -> str:
    """Inverse of svtool.scramble_username; raises ValueError on anything malformed."""
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"ID is not base64: {exc}") from None
    if not 1 <= len(raw) <= len(USERNAME_KEY):
        raise ValueError(f"ID decodes to {len(raw)} bytes (allowed 1-{len(USERNAME_KEY)})")
    plain = bytes(a ^ b for a, b in zip(raw, USERNAME_KEY, strict=False))
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("ID is not UTF-8 after unscrambling") from None


class DCPSession:
    """Protocol state of one DCP connection as the DVR sees it.

    ``receive_data`` returns the bytes to send back; after a violation ``closed`` is true and
    the driver must drop the connection. The silence clock runs from the connection's start
    and is reset only by HEARTBEAT.
    """

    def __init__(
        self,
        users: dict[str, str],
        info: dict[str, str],
        now: float,
        *,
        silence_timeout: float,
        make_token: Callable[[], str] = lambda: secrets.token_hex(8),
    ) -> None:
        self.users = users
        self.info = info
        self.silence_timeout = silence_timeout
        self.make_token = make_token
        self.decoder = MessageDecoder(strict=True)
        self.last_heartbeat = now
        self.user: str | None = None
        self.token: str | None = None
        self.closed = False
        self.violations: list[str] = []
        self.counts = {"login": 0, "login_refused": 0, "describe": 0, "heartbeat": 0}
        self.mute_heartbeats = False

    @property
    def deadline(self) -> float:
        """Monotonic time at which the DVR drops this silent connection."""
        return self.last_heartbeat + self.silence_timeout

    def expired(self, now: float) -> bool:
        """True once no HEARTBEAT came for ``silence_timeout`` seconds."""
        return now >= self.deadline

    def _violation(self, text: str) -> bytes:
        self.violations.append(text)
        self.closed = True
        return b""

    def receive_data(self, data: bytes, now: float) -> bytes:
        """Handle received bytes; return the reply bytes (possibly empty)."""
        if self.closed:
            return b""
        try:
            messages = self.decoder.feed(data)
        except SVProtocolError as exc:
            return self._violation(f"malformed message: {exc}")
        out = bytearray()
        for msg in messages:
            out += self._handle(msg.name, msg.payload_type, msg.payload, now)
            if self.closed:
                break
        return bytes(out)

    def _handle(self, name: str, payload_type: str, payload: bytes, now: float) -> bytes:
        if name == "AUTHENTICATE":
            if payload_type != "TEXT":
                return self._violation(f"AUTHENTICATE with a {payload_type} payload")
            return self._authenticate(payload)
        if name in ("DESCRIBE", "HEARTBEAT"):
            if payload_type != "BINARY" or payload:
                return self._violation(f"{name} must have an empty BINARY payload")
            if self.token is None:
                return self._violation(f"{name} before a successful login")
            if name == "HEARTBEAT":
                self.counts["heartbeat"] += 1
                self.last_heartbeat = now
                return b"" if self.mute_heartbeats else reply("HEARTBEAT")
            self.counts["describe"] += 1
            lines = {**self.info, "authority": self.token}
            return reply("DESCRIBE_OK", "".join(f"{k}:{v}\r\n" for k, v in lines.items()))
        return self._violation(f"unknown message {name!r}")

    def _authenticate(self, payload: bytes) -> bytes:
        if self.token is not None:
            return self._violation("AUTHENTICATE on an already logged-in connection")
        match = _AUTH_PAYLOAD.fullmatch(payload)
        if match is None:
            return self._violation(f"AUTHENTICATE payload malformed: {payload[:80]!r}")
        try:
            user = unscramble_username(match.group(1))
        except ValueError as exc:
            return self._violation(f"AUTHENTICATE: {exc}")
        expected = self.users.get(user)
        if expected is None:
            self.counts["login_refused"] += 1
            return reply("AUTHENTICATE_OK", REASON_UNKNOWN_USER + "\r\n")
        digest = hashlib.md5(expected.encode("utf-8")).hexdigest().encode()
        if not secrets.compare_digest(digest, match.group(2)):
            self.counts["login_refused"] += 1
            return reply("AUTHENTICATE_OK", REASON_WRONG_PASSWORD + "\r\n")
        self.user = user
        self.token = self.make_token()
        self.counts["login"] += 1
        return reply("AUTHENTICATE_OK", "SUCCESS\r\n")


# =============================================================================================
# Driver: one selector thread serving every DCP connection
# =============================================================================================


class EmulatedDCP:
    """The DVR's DCP TCP service on loopback, run by one background thread."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        silence_timeout: float = 30.0,
        info: dict[str, str] | None = None,
    ) -> None:
        self.users = dict(users) if users is not None else {"admin": "4321"}
        self.host = host
        self.port = port
        self.silence_timeout = silence_timeout
        self.info = dict(info) if info is not None else dict(DEFAULT_INFO)
        self.violations: list[str] = []
        self.logins = 0
        self.refused_logins = 0
        self.heartbeats = 0
        self.describes = 0
        self.silence_drops = 0
        self.mute_heartbeats = False  # set to stop answering HEARTBEAT (a hung box)
        self._lock = threading.Lock()
        self._sessions: dict[socket.socket, DCPSession] = {}
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._drop_all = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EmulatedDCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- public queries -------------------------------------------------------------------

    def is_token_valid(self, token: str) -> bool:
        """True only while the connection whose login produced ``token`` is open."""
        with self._lock:
            return any(s.token == token and not s.closed for s in self._sessions.values())

    @property
    def open_connections(self) -> int:
        """How many DCP connections are open now."""
        with self._lock:
            return len(self._sessions)

    def drop_connections(self) -> None:
        """Close every DCP connection (like a reboot); their tokens become invalid."""
        with self._lock:
            self._drop_all = True
            for session in self._sessions.values():
                session.closed = True  # tokens die now, sockets close in the loop
        self._wake()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Listen and serve; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(16)
            listener.setblocking(False)
        except OSError:
            listener.close()  # e.g. port taken: leave nothing open, the caller may retry
            raise
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="emulated-dcp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already stopped, or the wake-up is pending anyway

    # --- the loop -------------------------------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        listener, wake_r = self._listener, self._wake_r
        if listener is None or wake_r is None:
            return
        sel.register(listener, selectors.EVENT_READ, "listen")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                now = time.monotonic()
                with self._lock:
                    deadlines = [s.deadline for s in self._sessions.values()]
                timeout = max(0.0, min([*deadlines, now + 1.0]) - now)
                for key, _ in sel.select(timeout):
                    if key.data == "listen":
                        self._accept(sel, listener)
                    elif key.data == "wake":
                        wake_r.recv(4096)
                    else:
                        self._read(sel, key.fileobj)  # type: ignore[arg-type]
                self._reap(sel, time.monotonic())
        finally:
            for sock in list(self._sessions):
                self._close(sel, sock)
            sel.close()
            listener.close()

    def _accept(self, sel: selectors.BaseSelector, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except BlockingIOError:
            return
        sock.settimeout(5.0)  # only for sendall; reads happen when the selector says so
        session = DCPSession(
            self.users, self.info, time.monotonic(), silence_timeout=self.silence_timeout
        )
        with self._lock:
            self._sessions[sock] = session
        sel.register(sock, selectors.EVENT_READ, "conn")
        log.debug("DCP connection from %s:%d", *peer)

    def _read(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        session = self._sessions.get(sock)
        if session is None:
            return
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._close(sel, sock)
            return
        with self._lock:
            session.mute_heartbeats = self.mute_heartbeats
            counts, seen = dict(session.counts), len(session.violations)
            out = session.receive_data(data, time.monotonic())
            self.logins += session.counts["login"] - counts["login"]
            self.refused_logins += session.counts["login_refused"] - counts["login_refused"]
            self.heartbeats += session.counts["heartbeat"] - counts["heartbeat"]
            self.describes += session.counts["describe"] - counts["describe"]
            for text in session.violations[seen:]:
                log.info("DCP violation: %s", text)
                self.violations.append(text)
        if out:
            try:
                sock.sendall(out)
            except OSError:
                session.closed = True

    def _reap(self, sel: selectors.BaseSelector, now: float) -> None:
        with self._lock:
            drop_all, self._drop_all = self._drop_all, False
            doomed = []
            for sock, session in self._sessions.items():
                if drop_all or session.closed:
                    doomed.append(sock)
                elif session.expired(now):
                    self.silence_drops += 1
                    log.info("DCP connection silent for %.1f s: dropped", self.silence_timeout)
                    doomed.append(sock)
        for sock in doomed:
            self._close(sel, sock)

    def _close(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        with self._lock:
            session = self._sessions.pop(sock, None)
            if session is not None:
                session.closed = True
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
