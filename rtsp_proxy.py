#!/usr/bin/env python3
"""RTSP proxy that lets any standard RTSP client watch a Samsung SmartViewer DVR.

The DVR's RTSP server is fragile (PROTOCOLS.md section 1.2): it ignores OPTIONS,
deadlocks on unexpected headers, sends its own SDP dialect, delivers video on a
side port in a private fragment format and stamps it with a 1000 Hz clock.  This
proxy talks to the DVR only in the narrow dialect it survives and offers a
well-behaved RTSP/1.0 server (RFC 2326, RTP per RFC 6184) to clients:

    SV_USER=admin SV_PASS=4321 rtsp_proxy.py 127.0.0.1:8554 192.168.1.50:554
    ffplay rtsp://127.0.0.1:8554/live.000

All viewers of one channel share one DVR session (one token, one DVR RTSP
session, one side-port stream).  Tokens come from ``svtool.TokenKeeper``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import re
import secrets
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import helpers
import svtool
from helpers import EPILOG, ExitCode

log = logging.getLogger("rtsp_proxy")

SERVER_NAME = "rtsp_proxy"
PUBLIC_METHODS = "OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN, GET_PARAMETER"
SESSION_TIMEOUT = 60
MAX_HEAD_BYTES = 8192
MAX_HEADERS = 64
MAX_BODY_BYTES = 65536
RTP_MAX_PAYLOAD = 1400  # RFC 6184 payload bytes per packet, FU indicator/header included
H264_CLOCK = 90000

_CHANNEL_RE = re.compile(r"live\.([0-9]{3})$")
_TOKEN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class ProxyError(Exception):
    """Base of every error this module raises about bad input."""


class RTSPError(ProxyError):
    """A client sent something that is not acceptable RTSP; ``status`` is the reply code."""

    def __init__(self, message: str, status: int = 400, cseq: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.cseq = cseq


class DVRError(ProxyError):
    """The DVR's RTSP server answered something we cannot use."""


class SamsungStreamError(ProxyError):
    """The side-port fragment stream is out of step (PROTOCOLS 1.2)."""


# ==========================================================================
# Wire format and protocol state (sans-IO: bytes in, bytes/events out)
# ==========================================================================

# --------------------------------------------------------------------------
# RTSP messages


class _HeaderLookup:
    """``header()`` for a message that keeps its headers as (name, value) pairs."""

    headers: list[tuple[str, str]]

    def header(self, name: str, default: str | None = None) -> str | None:
        """Value of the first header called ``name`` (case-insensitive)."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return default


@dataclasses.dataclass
class RTSPRequest(_HeaderLookup):
    """One parsed client request."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    version: str = "RTSP/1.0"

    @property
    def cseq(self) -> str:
        return self.header("CSeq", "") or ""


@dataclasses.dataclass
class InterleavedData:
    """A ``$``-framed binary block from a client (RTCP receiver reports)."""

    channel: int
    data: bytes


@dataclasses.dataclass
class RTSPResponse(_HeaderLookup):
    """One parsed DVR reply."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""


def _find_head_end(buf: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """Return (end of head, start of body) or (-1, -1); accepts CRLF or bare LF."""
    crlf = buf.find(b"\r\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    return -1, -1


def _split_header_lines(lines: list[str], max_headers: int, err: Callable[[str], Exception]):
    headers: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        if line[0] in " \t":
            raise err("folded header lines are not accepted")
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or not _TOKEN_RE.match(name):
            raise err(f"malformed header line {line[:60]!r}")
        headers.append((name, value.strip()))
        if len(headers) > max_headers:
            raise err("too many header lines")
    return headers


class RTSPRequestParser:
    """Incremental, bounded parser of client requests and interleaved blocks.

    ``feed(data)`` returns complete events in order; raises ``RTSPError`` on bad
    input, after which the connection should get a 400 and be closed.
    """

    def __init__(
        self,
        max_head: int = MAX_HEAD_BYTES,
        max_headers: int = MAX_HEADERS,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self._buf = bytearray()
        self.max_head = max_head
        self.max_headers = max_headers
        self.max_body = max_body

    @property
    def buffered(self) -> int:
        """Bytes of a request or interleaved block that is not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[RTSPRequest | InterleavedData]:
        self._buf += data
        events: list[RTSPRequest | InterleavedData] = []
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)

    def _next(self) -> RTSPRequest | InterleavedData | None:
        buf = self._buf
        # Stray line ends between requests are tolerated (RFC 2326 keepalives).
        skip = 0
        while skip < len(buf) and buf[skip] in (0x0D, 0x0A):
            skip += 1
        if skip:
            del buf[:skip]
        if not buf:
            return None
        if buf[0] == 0x24:  # '$' interleaved binary data
            if len(buf) < 4:
                return None
            channel = buf[1]
            length = int.from_bytes(buf[2:4], "big")
            if len(buf) < 4 + length:
                return None
            data = bytes(buf[4 : 4 + length])
            del buf[: 4 + length]
            return InterleavedData(channel, data)
        head_end, body_start = _find_head_end(buf)
        if head_end < 0:
            if len(buf) > self.max_head:
                raise RTSPError("request head too large")
            return None
        if head_end > self.max_head:
            raise RTSPError("request head too large")
        request = self._parse_head(bytes(buf[:head_end]))
        length = helpers.ascii_number(request.header("Content-Length", "0") or "0")
        if length is None or length > self.max_body:
            raise RTSPError("bad Content-Length", cseq=request.header("CSeq"))
        if len(buf) < body_start + length:
            return None
        request.body = bytes(buf[body_start : body_start + length])
        del buf[: body_start + length]
        return request

    def _parse_head(self, head: bytes) -> RTSPRequest:
        if any(b < 0x20 and b not in (0x09, 0x0A, 0x0D) for b in head) or b"\x7f" in head:
            raise RTSPError("control characters in request head")
        text = head.decode("latin-1")
        lines = text.replace("\r\n", "\n").split("\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise RTSPError(f"malformed request line {lines[0][:80]!r}")
        method, url, version = parts
        if not method.isalpha() and not _TOKEN_RE.match(method):
            raise RTSPError("malformed method")
        headers = _split_header_lines(lines[1:], self.max_headers, RTSPError)
        request = RTSPRequest(method, url, headers, version=version)
        cseq = request.header("CSeq")
        if cseq is None or helpers.ascii_number(cseq) is None:
            raise RTSPError("missing or malformed CSeq")
        if not version.startswith("RTSP/"):
            raise RTSPError("not an RTSP request", cseq=cseq)
        if version != "RTSP/1.0":
            raise RTSPError("only RTSP/1.0 is spoken here", status=505, cseq=cseq)
        if not url or any(c in url for c in " \t"):
            raise RTSPError("malformed URL", cseq=cseq)
        return request


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    454: "Session Not Found",
    455: "Method Not Valid in This State",
    461: "Unsupported Transport",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "RTSP Version Not Supported",
}


def build_response(
    status: int,
    cseq: str | None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """Serialize a reply to a client; CSeq is echoed first when known."""
    lines = [f"RTSP/1.0 {status} {REASONS.get(status, 'Error')}"]
    if cseq is not None:
        lines.append(f"CSeq: {cseq}")
    lines.append(f"Server: {SERVER_NAME}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def channel_from_url(url: str) -> int | None:
    """Channel number of a ``.../live.NNN`` URL, None for any other URL."""
    try:
        path = urlsplit(url).path if "://" in url else url
    except ValueError:
        return None
    match = _CHANNEL_RE.search(path)
    if match is None or not path.endswith(match.group(0)):
        return None
    if "?" in url or "#" in url:
        return None
    return int(match.group(1))


def strip_userinfo(url: str) -> str:
    """The URL without ``user:pass@`` (so it never lands in an SDP or log)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host).geturl()


def parse_basic_auth(value: str | None) -> tuple[str, str] | None:
    """(user, password) of a ``Basic`` Authorization value, None if absent/other scheme."""
    if not value:
        return None
    scheme, _, data = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(data.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


# --------------------------------------------------------------------------
# Client transports (SETUP)


@dataclasses.dataclass(frozen=True)
class ClientTransport:
    """What a client's SETUP asked for and we accept."""

    kind: str  # "tcp" or "udp"
    profile: str  # the client's spelling, echoed back ("RTP/AVP", "RTP/AVP/UDP", ...)
    interleaved: tuple[int, int] = (0, 1)
    client_port: tuple[int, int] = (0, 0)

    def reply(self, ssrc: int, server_port: tuple[int, int] | None = None) -> str:
        """The Transport header of the SETUP reply."""
        if self.kind == "tcp":
            a, b = self.interleaved
            return f"{self.profile};unicast;interleaved={a}-{b};ssrc={ssrc:08X}"
        sp = server_port or (0, 0)
        a, b = self.client_port
        return (
            f"{self.profile};unicast;client_port={a}-{b};server_port={sp[0]}-{sp[1]};ssrc={ssrc:08X}"
        )


def _port_pair(text: str, minimum: int = 1) -> tuple[int, int] | None:
    """``a-b`` or ``a`` (then b = a + 1); None when out of range, RTSPError(400) if not DIGITs."""
    first, _, second = text.partition("-")
    a = helpers.ascii_number(first, 5)
    b = helpers.ascii_number(second, 5) if second else None if a is None else a + 1
    if a is None or b is None:
        raise RTSPError("malformed port range")  # RFC 2326 section 12.39: 1*DIGIT
    if not (minimum <= a < 65536 and minimum <= b < 65536):
        return None
    return a, b


def parse_client_transport(value: str | None) -> ClientTransport:
    """Pick the first acceptable unicast RTP/AVP transport.

    RTSPError(461) if none is acceptable, RTSPError(400) for a port that is not digits.
    """
    if not value:
        raise RTSPError("SETUP without Transport", status=461)
    for spec in value.split(","):
        fields = [f.strip() for f in spec.split(";") if f.strip()]
        if not fields:
            continue
        profile = fields[0]
        upper = profile.upper()
        params: dict[str, str] = {}
        for field in fields[1:]:
            key, _, val = field.partition("=")
            params[key.lower()] = val
        if "multicast" in params:
            continue
        if upper == "RTP/AVP/TCP":
            inter = _port_pair(params["interleaved"], 0) if "interleaved" in params else (0, 1)
            if inter is None or inter[0] > 255 or inter[1] > 255:
                continue
            return ClientTransport("tcp", profile, interleaved=inter)
        if upper in ("RTP/AVP", "RTP/AVP/UDP") and "client_port" in params:
            ports = _port_pair(params["client_port"])
            if ports is None:
                continue
            return ClientTransport("udp", profile, client_port=ports)
    raise RTSPError("no supported transport", status=461)


# --------------------------------------------------------------------------
# DVR dialect (PROTOCOLS 1.2)


@dataclasses.dataclass
class DVRDescription:
    """What the DVR's DESCRIBE told us."""

    mode: str  # "tcp" or "udp": the DVR's side-port transport
    payload_type: int
    title: str
    attributes: list[str]


def parse_dvr_describe(body: bytes) -> DVRDescription:
    """Read the DVR's ``text/parameters`` body (an SDP dialect); DVRError if no video."""
    text = body.replace(b"\x00", b"").decode("latin-1")
    title = ""
    attributes: list[str] = []
    in_video = False
    video_line = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("s=") and not title:
            title = line[2:].strip()
        elif line.startswith("m="):
            in_video = line.startswith("m=video")
            if in_video and video_line is None:
                video_line = line
        elif in_video and line.startswith(("a=framerate:", "a=x-dimensions:")):
            attributes.append(line)
    if video_line is None:
        raise DVRError("DVR DESCRIBE has no m=video line")
    tokens = video_line[2:].split()
    # PROTOCOLS 1.2: "m=video 0 TCP RTP/AVP <pt> H.264" means the TCP side port.
    mode = "tcp" if "TCP" in (t.upper() for t in tokens) else "udp"
    payload_type = 96
    for i, tok in enumerate(tokens):
        number = helpers.ascii_number(tokens[i + 1], 3) if i + 1 < len(tokens) else None
        if tok.upper() == "RTP/AVP" and number is not None:
            payload_type = number & 0x7F
    return DVRDescription(mode, payload_type, title, attributes)


def build_sdp(
    description: DVRDescription,
    control_url: str,
    origin_host: str,
    channel: int,
    sps: bytes | None = None,
    pps: bytes | None = None,
    session_id: int | None = None,
) -> bytes:
    """A complete, standard SDP for one H.264 video stream at 90 kHz."""
    sid = session_id if session_id is not None else random.randrange(1 << 31)
    fmtp = "packetization-mode=1"
    if sps and len(sps) >= 4:
        fmtp += f";profile-level-id={sps[1:4].hex().upper()}"
    if sps and pps:
        sets = ",".join(base64.b64encode(x).decode("ascii") for x in (sps, pps))
        fmtp += f";sprop-parameter-sets={sets}"
    title = description.title or f"Samsung DVR channel {channel}"
    title = "".join(c for c in title if c.isprintable())
    lines = [
        "v=0",
        f"o=- {sid} 1 IN IP4 {origin_host}",
        f"s={title}",
        "c=IN IP4 0.0.0.0",
        "t=0 0",
        "a=range:npt=now-",
        "m=video 0 RTP/AVP 96",
        "a=rtpmap:96 H264/90000",
        f"a=fmtp:96 {fmtp}",
        *description.attributes,
        f"a=control:{control_url}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class DVRConnection:
    """Sans-IO client side of the DVR's RTSP dialect: one request at a time.

    Builds exactly the header sets PROTOCOLS 1.2 allows and parses the DVR's
    replies, dropping NULs, accepting the unterminated SETUP reply and
    ignoring its CSeq mistakes.
    """

    MAX_HEAD = 16384

    def __init__(self, host: str, port: int, channel: int, token: str) -> None:
        self.url = f"rtsp://{host}:{port}/live.{channel:03d}"
        self.token = token
        self.cseq = 0
        self.session: str | None = None  # id only, for PLAY
        self.session_line: str | None = None  # the whole header line, for the TCP side port
        self.pending: str | None = None
        self._buf = bytearray()

    def _request(self, method: str, headers: list[tuple[str, str]]) -> bytes:
        if self.pending is not None:
            raise DVRError(f"{method} while {self.pending} is unanswered")
        if any("\r" in v or "\n" in v for _, v in headers) or "\n" in self.token:
            raise DVRError("line break in a DVR header value")
        self.cseq += 1
        self.pending = method
        lines = [f"{method} {self.url} RTSP/1.0", f"CSeq: {self.cseq}"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def describe(self) -> bytes:
        return self._request("DESCRIBE", [("Authorization", self.token)])

    def setup(self, mode: str, client_port: int | None = None) -> bytes:
        # PROTOCOLS 1.2: exactly request line, CSeq, Transport, Authorization.
        if mode == "tcp":
            transport = "RTP/AVP/TCP;unicast"
        else:
            if not client_port:
                raise DVRError("UDP SETUP needs a client port")
            transport = f"RTP/AVP/UDP;unicast;client_port={client_port}"
        return self._request("SETUP", [("Transport", transport), ("Authorization", self.token)])

    def play(self) -> bytes:
        if self.session is None:
            raise DVRError("PLAY before SETUP")
        # PROTOCOLS 1.2: exactly this header set, in this order.
        return self._request(
            "PLAY",
            [
                ("Session", self.session),
                ("Range", "npt=0.000-"),
                ("Speed", "+1.0"),
                ("Bandwidth", "2048"),
                ("Authorization", self.token),
            ],
        )

    def receive_data(self, data: bytes) -> RTSPResponse | None:
        """Feed bytes from the DVR; return the reply to the pending request once complete."""
        self._buf += data
        buf = self._buf
        # PROTOCOLS 1.2: replies are followed by NULs; a SETUP reply has no blank line.
        skip = 0
        while skip < len(buf) and buf[skip] in (0x00, 0x0D, 0x0A):
            skip += 1
        if skip:
            del buf[:skip]
        if not buf:
            return None
        if self.pending is None:
            raise DVRError("DVR sent data nobody asked for")
        head_end, body_start = _find_head_end(buf)
        if head_end < 0 and self.pending == "SETUP":
            match = re.search(rb"(?im)^transport:[^\r\n]*\r?\n", buf)
            if match:
                head_end = body_start = match.end()
        if head_end < 0:
            if len(buf) > self.MAX_HEAD:
                raise DVRError("DVR reply head too large")
            return None
        head = bytes(buf[:head_end]).replace(b"\x00", b"").decode("latin-1")
        lines = head.replace("\r\n", "\n").split("\n")
        status_parts = lines[0].split(" ", 2)
        if len(status_parts) < 2 or not status_parts[0].startswith("RTSP/"):
            raise DVRError(f"DVR reply has no status line: {lines[0][:60]!r}")
        status = helpers.ascii_number(status_parts[1], 3)
        if status is None:
            raise DVRError("DVR reply status is not a number")
        headers = _split_header_lines(lines[1:], 64, DVRError)
        reply = RTSPResponse(status, status_parts[2] if len(status_parts) > 2 else "", headers)
        length = helpers.ascii_number(reply.header("Content-Length", "0") or "0")
        if length is None or length > MAX_BODY_BYTES:
            raise DVRError("DVR reply has a bad Content-Length")
        if len(buf) < body_start + length:
            return None
        reply.body = bytes(buf[body_start : body_start + length])
        del buf[: body_start + length]
        # PROTOCOLS 1.2: CSeq may be 0 or wrong; one request at a time, so order matches.
        if reply.header("CSeq") != str(self.cseq):
            log.debug("DVR answered %s with CSeq %r", self.pending, reply.header("CSeq"))
        method, self.pending = self.pending, None
        if method == "SETUP" and reply.status == 200:
            value = reply.header("Session")
            if not value:
                raise DVRError("DVR SETUP reply has no Session")
            self.session = value.split(";")[0].strip()
            self.session_line = f"Session: {value}"
        return reply


def side_port_from_transport(value: str | None, rtsp_port: int) -> int:
    """The DVR's side port: ``server_port=`` of the SETUP reply, else RTSP port + 2."""
    if value:
        match = re.search(r"server_port=([0-9]{1,5})(?:-[0-9]{1,5})?\s*(?:;|$)", value)
        if match and 0 < int(match.group(1)) < 65536:
            return int(match.group(1))
    return rtsp_port + 2


# --------------------------------------------------------------------------
# Samsung side-port fragments (PROTOCOLS 1.2, vectors.json "samsung_rtp")


@dataclasses.dataclass
class SamsungFrame:
    """One reassembled frame from the DVR's side port."""

    timestamp: int  # DVR clock (1000 Hz on the firmware we target)
    payload: bytes


class SamsungDefragmenter:
    """Reassembles side-port fragments into frames, from a TCP stream or UDP datagrams.

    Raises ``SamsungStreamError`` when the input is out of step.  After an
    error on UDP the next datagram is a fresh start; a TCP stream cannot be
    trusted any more.
    """

    MAX_FRAGMENT = 1 << 20

    def __init__(self, max_frame: int = 8 << 20) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._size = 0
        self._ts: int | None = None
        self._last_seq: int | None = None
        self._skipping = False
        self.dropped_frames = 0

    @staticmethod
    def _header(data: bytes | bytearray, offset: int = 0) -> tuple[int, int, int] | None:
        """(header length, payload length, needed bytes) or None when more bytes are needed."""
        avail = len(data) - offset
        if avail < 1:
            return None
        b0 = data[offset]
        if b0 >> 6 != 2:
            raise SamsungStreamError(f"fragment with RTP version {b0 >> 6}")
        if not b0 & 0x10:
            raise SamsungStreamError("fragment without the extension bit")
        ext = 12 + 4 * (b0 & 0x0F)
        if avail < ext + 8:
            return None
        words = int.from_bytes(data[offset + ext + 2 : offset + ext + 4], "big")
        if words < 1:
            raise SamsungStreamError("fragment extension holds no length word")
        payload_len = int.from_bytes(data[offset + ext + 4 : offset + ext + 8], "little")
        if payload_len > SamsungDefragmenter.MAX_FRAGMENT:
            raise SamsungStreamError(f"fragment payload length {payload_len} is implausible")
        head = ext + 4 + 4 * words
        return head, payload_len, head + payload_len

    def _fragment(self, data: bytes | bytearray, offset: int, head: int, length: int):
        seq = int.from_bytes(data[offset + 2 : offset + 4], "big")
        ts = int.from_bytes(data[offset + 4 : offset + 8], "big")
        marker = bool(data[offset + 1] & 0x80)
        payload = bytes(data[offset + head : offset + head + length])
        gap = self._last_seq is not None and seq != (self._last_seq + 1) & 0xFFFF
        self._last_seq = seq
        if gap:
            # Lost fragments: whatever arrives up to the next marker is a damaged frame.
            self._drop()
            self._skipping = True
        elif self._parts and ts != self._ts:
            self._drop()  # a frame without its marker fragment
        if self._skipping:
            self._skipping = not marker
            return None
        self._ts = ts
        self._parts.append(payload)
        self._size += len(payload)
        if self._size > self.max_frame:
            self._drop()
            raise SamsungStreamError("frame larger than the limit")
        if not marker:
            return None
        frame = SamsungFrame(ts, b"".join(self._parts))
        self._parts = []
        self._size = 0
        return frame

    def _drop(self) -> None:
        self._parts = []
        self._size = 0
        self.dropped_frames += 1

    def feed_stream(self, data: bytes) -> list[SamsungFrame]:
        """TCP mode: fragments back to back; the payload length is the only framing."""
        self._buf += data
        frames: list[SamsungFrame] = []
        offset = 0
        buf = self._buf
        try:
            while True:
                header = self._header(buf, offset)
                if header is None or len(buf) - offset < header[2]:
                    break
                frame = self._fragment(buf, offset, header[0], header[1])
                offset += header[2]
                if frame is not None:
                    frames.append(frame)
        finally:
            del buf[:offset]
        return frames

    def feed_datagram(self, data: bytes) -> list[SamsungFrame]:
        """UDP mode: one fragment per datagram; lone NUL datagrams are keepalives."""
        if data == b"\x00":
            return []
        try:
            header = self._header(data)
            if header is None or len(data) < header[2]:
                raise SamsungStreamError("truncated fragment datagram")
        except SamsungStreamError:
            if self._parts:
                self._drop()
            self._skipping = True
            raise
        frame = self._fragment(data, 0, header[0], header[1])
        return [frame] if frame is not None else []


# --------------------------------------------------------------------------
# H.264 over RTP (RFC 6184)


def split_annexb(payload: bytes) -> list[bytes]:
    """NAL units of a frame payload: split at Annex-B start codes if it has any."""
    if not (payload.startswith(b"\x00\x00\x01") or payload.startswith(b"\x00\x00\x00\x01")):
        return [payload] if payload else []
    nals: list[bytes] = []
    pos = payload.find(b"\x00\x00\x01")
    while pos >= 0:
        start = pos + 3
        nxt = payload.find(b"\x00\x00\x01", start)
        end = len(payload) if nxt < 0 else nxt
        nal = payload[start:end].rstrip(b"\x00")
        if nal:
            nals.append(nal)
        pos = nxt
    return nals


class TimestampMapper:
    """Maps the DVR clock (1000 Hz) to the 90 kHz RTP clock, tolerating wrap-around."""

    def __init__(self, clock_in: int = 1000, clock_out: int = H264_CLOCK, base: int = 0) -> None:
        self.clock_in = clock_in
        self.clock_out = clock_out
        self.base = base & 0xFFFFFFFF
        self._last: int | None = None
        self._ext = 0

    def map(self, ts_in: int) -> int:
        if self._last is not None:
            delta = ((ts_in - self._last + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
            self._ext += delta
        self._last = ts_in & 0xFFFFFFFF
        return (self.base + self._ext * self.clock_out // self.clock_in) & 0xFFFFFFFF


class H264Packetizer:
    """RFC 6184 packetizer: single NAL unit packets, FU-A for large NAL units."""

    def __init__(
        self,
        ssrc: int,
        payload_type: int = 96,
        max_payload: int = RTP_MAX_PAYLOAD,
        seq: int = 0,
    ) -> None:
        self.ssrc = ssrc & 0xFFFFFFFF
        self.payload_type = payload_type
        self.max_payload = max_payload
        self.seq = seq & 0xFFFF

    def _header(self, marker: bool, ts: int, seq: int) -> bytes:
        return struct.pack(
            "!BBHII", 0x80, (0x80 if marker else 0) | self.payload_type, seq, ts, self.ssrc
        )

    def packetize(self, nals: list[bytes], ts: int) -> list[bytes]:
        """RTP packets for one frame; the marker is set on its last packet."""
        packets: list[bytes] = []
        count = len(nals)
        for index, nal in enumerate(nals):
            last_nal = index == count - 1
            if len(nal) <= self.max_payload:
                packets.append(self._header(last_nal, ts, self.seq) + nal)
                self.seq = (self.seq + 1) & 0xFFFF
                continue
            indicator = (nal[0] & 0xE0) | 28
            nal_type = nal[0] & 0x1F
            step = self.max_payload - 2
            body = memoryview(nal)[1:]
            for start in range(0, len(body), step):
                end = start + step >= len(body)
                fu_header = (0x80 if start == 0 else 0) | (0x40 if end else 0) | nal_type
                packets.append(
                    self._header(last_nal and end, ts, self.seq)
                    + bytes((indicator, fu_header))
                    + body[start : start + step]
                )
                self.seq = (self.seq + 1) & 0xFFFF
        return packets

    def packet_at(self, nal: bytes, ts: int, seq: int) -> bytes:
        """A single-NAL packet with an explicit sequence number (late-joiner SPS/PPS)."""
        return self._header(False, ts, seq & 0xFFFF) + nal


def interleave(packets: list[bytes], channel: int) -> bytes:
    """``$``-framed RTP packets for a TCP client (RFC 2326 10.12)."""
    ch = bytes((0x24, channel))
    return b"".join(ch + len(p).to_bytes(2, "big") + p for p in packets)


@dataclasses.dataclass
class MediaFrame:
    """A frame packetized once and shared by every viewer of a channel."""

    packets: list[bytes]
    first_seq: int
    rtptime: int
    keyframe: bool
    has_parameter_sets: bool
    _interleaved: dict[int, bytes] = dataclasses.field(default_factory=dict)

    def interleaved(self, channel: int) -> bytes:
        data = self._interleaved.get(channel)
        if data is None:
            data = self._interleaved[channel] = interleave(self.packets, channel)
        return data


class ChannelMedia:
    """Per-channel media state: timestamps, packetizer, cached SPS/PPS."""

    def __init__(self, clock_in: int = 1000, ssrc: int | None = None) -> None:
        self.ssrc = ssrc if ssrc is not None else random.getrandbits(32)
        self.packetizer = H264Packetizer(self.ssrc, seq=random.getrandbits(16))
        self.clock = TimestampMapper(clock_in, H264_CLOCK, random.getrandbits(32))
        self.sps: bytes | None = None
        self.pps: bytes | None = None

    def on_frame(self, frame: SamsungFrame) -> MediaFrame | None:
        nals = split_annexb(frame.payload)
        if not nals:
            return None
        types = {nal[0] & 0x1F for nal in nals}
        for nal in nals:
            kind = nal[0] & 0x1F
            if kind == 7:
                self.sps = nal
            elif kind == 8:
                self.pps = nal
        rtptime = self.clock.map(frame.timestamp)
        first_seq = self.packetizer.seq
        packets = self.packetizer.packetize(nals, rtptime)
        return MediaFrame(packets, first_seq, rtptime, 5 in types, {7, 8} <= types)

    def start_packets(self, frame: MediaFrame) -> list[bytes]:
        """Cached SPS/PPS for a viewer starting at ``frame``, numbered just before it."""
        if frame.has_parameter_sets or not (self.sps and self.pps):
            return []
        return [
            self.packetizer.packet_at(self.sps, frame.rtptime, frame.first_seq - 2),
            self.packetizer.packet_at(self.pps, frame.rtptime, frame.first_seq - 1),
        ]


# --------------------------------------------------------------------------
# The client-facing RTSP state machine


@dataclasses.dataclass
class Reply:
    """Send these bytes to the client now."""

    data: bytes
    close: bool = False


@dataclasses.dataclass
class NeedDescribe:
    """The driver must obtain the channel's description, then call ``describe_reply``."""

    request: RTSPRequest
    channel: int
    credentials: tuple[str, str] | None


@dataclasses.dataclass
class NeedSetup:
    """The driver must attach the client to the channel, then call ``setup_reply``."""

    request: RTSPRequest
    channel: int
    credentials: tuple[str, str] | None
    transport: ClientTransport


@dataclasses.dataclass
class NeedPlay:
    """The driver starts delivery and sends ``play_reply`` when the first keyframe is due."""

    request: RTSPRequest


@dataclasses.dataclass
class NeedPause:
    request: RTSPRequest


@dataclasses.dataclass
class NeedTeardown:
    request: RTSPRequest


Action = Reply | NeedDescribe | NeedSetup | NeedPlay | NeedPause | NeedTeardown


class ClientProtocol:
    """RTSP/1.0 server side for one client connection; pure logic, no sockets.

    ``handle(request)`` returns an action; replies that need the DVR are built
    afterwards with the ``*_reply`` methods.
    """

    def __init__(self, *, credentials_required: bool, realm: str = SERVER_NAME) -> None:
        self.credentials_required = credentials_required
        self.realm = realm
        self.session_id: str | None = None
        self.channel: int | None = None
        self.transport: ClientTransport | None = None
        self.credentials: tuple[str, str] | None = None
        self.control_url = ""
        self.playing = False

    # ---- helpers
    def reply(self, request: RTSPRequest, status: int, headers=(), body=b"") -> bytes:
        return build_response(status, request.cseq, headers, body)

    def unauthorized(self, request: RTSPRequest) -> bytes:
        return self.reply(request, 401, [("WWW-Authenticate", f'Basic realm="{self.realm}"')])

    def error(self, exc: RTSPError) -> Reply:
        """Reply for a request the parser rejected; the connection is then closed."""
        return Reply(build_response(exc.status, exc.cseq), close=True)

    def _session_header(self) -> tuple[str, str]:
        return ("Session", f"{self.session_id};timeout={SESSION_TIMEOUT}")

    def _check_session(self, request: RTSPRequest) -> Reply | None:
        value = request.header("Session")
        if self.session_id is None:
            return Reply(self.reply(request, 455 if value is None else 454))
        if value is not None and value.split(";")[0].strip() != self.session_id:
            return Reply(self.reply(request, 454))
        return None

    def _credentials(self, request: RTSPRequest) -> tuple[str, str] | None | bool:
        """Credentials for the DVR, None when the proxy holds them, False when missing."""
        if not self.credentials_required:
            return None
        given = parse_basic_auth(request.header("Authorization"))
        if given is not None:
            return given
        return self.credentials if self.credentials is not None else False

    # ---- entry point
    def handle(self, request: RTSPRequest) -> Action:
        method = request.method
        if method == "OPTIONS":
            return Reply(self.reply(request, 200, [("Public", PUBLIC_METHODS)]))
        if method in ("GET_PARAMETER", "SET_PARAMETER"):
            headers = [self._session_header()] if self.session_id else []
            return Reply(self.reply(request, 200, headers))
        if method not in ("DESCRIBE", "SETUP", "PLAY", "PAUSE", "TEARDOWN"):
            return Reply(self.reply(request, 501 if method.isupper() else 400))
        if method in ("PLAY", "PAUSE", "TEARDOWN"):
            bad = self._check_session(request)
            if bad is not None:
                return bad
            if method == "TEARDOWN":
                return NeedTeardown(request)
            if method == "PAUSE":
                return NeedPause(request)
            return NeedPlay(request)
        channel = channel_from_url(request.url)
        if channel is None:
            return Reply(self.reply(request, 404))  # never forwarded (PROTOCOLS 1.2)
        creds = self._credentials(request)
        if creds is False:
            return Reply(self.unauthorized(request))
        if method == "DESCRIBE":
            return NeedDescribe(request, channel, creds or None)
        if self.session_id is not None:
            bad = self._check_session(request)
            if bad is not None:
                return bad
            if channel != self.channel:
                return Reply(self.reply(request, 455))
        try:
            transport = parse_client_transport(request.header("Transport"))
        except RTSPError as exc:
            return Reply(self.reply(request, exc.status))
        return NeedSetup(request, channel, creds or None, transport)

    # ---- replies after the driver did its part
    def describe_reply(self, request: RTSPRequest, sdp: bytes, base_url: str) -> bytes:
        self.credentials = self._remembered(request)
        return self.reply(
            request,
            200,
            [("Content-Base", base_url), ("Content-Type", "application/sdp")],
            sdp,
        )

    def _remembered(self, request: RTSPRequest) -> tuple[str, str] | None:
        creds = self._credentials(request)
        return creds if isinstance(creds, tuple) else self.credentials

    def setup_reply(
        self,
        request: RTSPRequest,
        channel: int,
        transport: ClientTransport,
        ssrc: int,
        server_port: tuple[int, int] | None = None,
    ) -> bytes:
        self.credentials = self._remembered(request)
        if self.session_id is None:
            self.session_id = secrets.token_hex(8).upper()
        self.channel = channel
        self.transport = transport
        self.control_url = strip_userinfo(request.url)
        return self.reply(
            request,
            200,
            [("Transport", transport.reply(ssrc, server_port)), self._session_header()],
        )

    def play_reply(self, request: RTSPRequest, seq: int, rtptime: int) -> bytes:
        self.playing = True
        url = self.control_url
        return self.reply(
            request,
            200,
            [
                self._session_header(),
                ("Range", "npt=now-"),
                ("RTP-Info", f"url={url};seq={seq & 0xFFFF};rtptime={rtptime & 0xFFFFFFFF}"),
            ],
        )

    def pause_reply(self, request: RTSPRequest) -> bytes:
        self.playing = False
        return self.reply(request, 200, [self._session_header()])

    def teardown_reply(self, request: RTSPRequest) -> bytes:
        self.playing = False
        self.session_id = None
        self.channel = None
        self.transport = None
        return self.reply(request, 200)


# --------------------------------------------------------------------------
# Exposure limits (pure state; the driver asks and reports)


class LoginGuard:
    """Spares the DVR's DCP login from guessing (see README, "Exposure").

    After a refused login the client address waits ``backoff`` seconds before
    the proxy logs in for it again, twice as long after each further refusal
    (at most ``MAX_DOUBLINGS`` times); a success forgets its refusals.  A
    refused credential pair is refused from memory for ``backoff`` *
    ``REFUSAL_FACTOR`` seconds, whoever sends it.  ``backoff`` 0 turns both
    off.  Credentials are kept as a salted digest only.  ``turn(address)`` is
    the lock a client takes around a login, so that one address has at most
    one login in flight (others wait for its outcome).
    """

    MAX_DOUBLINGS = 6
    REFUSAL_FACTOR = 10
    MAX_ENTRIES = 4096  # addresses and credential pairs remembered at most
    TURNS = 64  # addresses that hash alike share a turn

    def __init__(self, backoff: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff = backoff
        self.clock = clock
        self._salt = secrets.token_bytes(16)
        self._addresses: dict[str, tuple[int, float]] = {}  # refusals in a row, wait until
        self._refused: dict[bytes, float] = {}  # credential digest -> remembered until
        self._lock = threading.Lock()
        self._turns = [threading.Lock() for _ in range(self.TURNS)]

    def turn(self, address: str) -> threading.Lock:
        """The lock to hold while logging in for ``address``."""
        return self._turns[hash(address) % self.TURNS]

    def _key(self, creds: tuple[str, str]) -> bytes:
        joined = "\x00".join(creds).encode("utf-8", "surrogatepass")
        return hashlib.blake2b(joined, key=self._salt, digest_size=16).digest()

    def wait_for(self, address: str) -> float:
        """Seconds ``address`` must still wait before the proxy logs in for it (0: go)."""
        with self._lock:
            entry = self._addresses.get(address)
        return max(0.0, entry[1] - self.clock()) if entry else 0.0

    def refused_recently(self, creds: tuple[str, str]) -> bool:
        """True while the DVR's refusal of ``creds`` is remembered."""
        with self._lock:
            until = self._refused.get(self._key(creds))
        return until is not None and until > self.clock()

    def refused(self, address: str) -> float:
        """Note a refused login for ``address``; returns its wait in seconds."""
        if self.backoff <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            self._prune(now)
            count = self._addresses.pop(address, (0, 0.0))[0] + 1  # re-added last: newest
            wait = self.backoff * 2 ** min(count - 1, self.MAX_DOUBLINGS)
            self._addresses[address] = (count, now + wait)
        return wait

    def remember_refusal(self, creds: tuple[str, str]) -> None:
        """The DVR refused ``creds``: refuse them from memory for a while."""
        if self.backoff <= 0:
            return
        now = self.clock()
        with self._lock:
            self._prune(now)
            key = self._key(creds)
            self._refused.pop(key, None)
            self._refused[key] = now + self.backoff * self.REFUSAL_FACTOR

    def succeeded(self, address: str) -> None:
        """A login for ``address`` worked: its refusals are forgotten."""
        with self._lock:
            self._addresses.pop(address, None)

    def _prune(self, now: float) -> None:
        """At MAX_ENTRIES, forget what expired, and at least the oldest eighth."""
        longest = self.backoff * 2**self.MAX_DOUBLINGS
        for table, ends in ((self._addresses, lambda e: e[1] + longest), (self._refused, float)):
            if len(table) >= self.MAX_ENTRIES:
                for key in [k for k, e in table.items() if ends(e) <= now]:
                    del table[key]
                for key in list(table)[: max(0, len(table) - self.MAX_ENTRIES * 7 // 8)]:
                    del table[key]


def dvr_channel_count(info: dict[str, str]) -> int | None:
    """The ``channels`` value of the DVR's DCP description, None when absent or odd."""
    return helpers.ascii_number(info.get("channels", "").strip("\r\n\x00 "), 3) or None


def read_deadline(
    now: float,
    *,
    partial_since: float | None,
    last_request: float,
    streaming: bool,
    header_timeout: float,
    idle_timeout: float,
) -> float | None:
    """Seconds left before a client connection is closed for slowness (None: no limit).

    A request must be complete ``header_timeout`` seconds after its first byte;
    a connection that is not streaming (no session, or one set up or paused, but
    not playing or waiting for its PLAY reply) must send a request every
    ``idle_timeout`` seconds, as an RTSP session must be kept alive within its
    timeout.  A playing session ends by TEARDOWN or by the client.
    """
    if partial_since is not None:
        return partial_since + header_timeout - now
    if not streaming:
        return last_request + idle_timeout - now
    return None


# ==========================================================================
# Driver: sockets and threads only move bytes
# ==========================================================================


class UpstreamError(Exception):
    """The DVR session could not be opened or was lost."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Outbox:
    """Bounded queue of bytes for one client, drained by its own writer thread.

    A client is too slow (its media refused, so the channel drops it) when more
    than ``limit`` bytes wait for it and its socket took nothing for
    ``stall_timeout`` seconds, or when more than ``hard_limit`` bytes wait (four
    times ``limit``, at least HARD_LIMIT_MIN).  The time rule is what tells a
    stuck client from a healthy one that is merely behind after a burst: when the
    DVR or this process pauses, the frames held up meanwhile arrive at once,
    faster than any writer thread can hand them to the socket.
    """

    HARD_LIMIT_MIN = 16 << 20

    WRITE_CHUNK = 64 * 1024  # bytes per send(): progress is seen while a big batch drains

    def __init__(
        self,
        sock: socket.socket,
        limit: int,
        stall_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.limit = limit
        self.hard_limit = max(4 * limit, self.HARD_LIMIT_MIN)
        self.stall_timeout = stall_timeout
        self.clock = clock
        self._items: deque[bytes] = deque()
        self._size = 0
        self._progress = clock()  # when the socket last took bytes (or the queue was empty)
        self._cond = threading.Condition()
        self.closed = False
        self._thread: threading.Thread | None = None  # started by the first bytes to send

    @property
    def queued(self) -> int:
        """Bytes not yet taken by the socket."""
        with self._cond:
            return self._size

    def stalled_for(self) -> float:
        """Seconds since the socket last took bytes (0 with an empty queue)."""
        with self._cond:
            return self.clock() - self._progress if self._size else 0.0

    def put(self, data: bytes, media: bool = False) -> bool:
        """Queue bytes; media is refused (False) once the client is too slow."""
        with self._cond:
            if self.closed:
                return False
            size = self._size + len(data)
            if (
                media
                and self._size
                and size > self.limit
                and (size > self.hard_limit or self.clock() - self._progress > self.stall_timeout)
            ):
                return False
            self._append(data)
        return True

    def _append(self, data: bytes) -> None:
        if not self._size:
            self._progress = self.clock()  # the stall clock starts with a non-empty queue
        self._items.append(data)
        self._size += len(data)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="client-writer", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def put_reply(self, data: bytes) -> bool:
        """Queue a reply once at most ``limit`` bytes wait (the client's requests wait too).

        False, and the outbox is closed, when the client took nothing for
        ``stall_timeout`` seconds meanwhile: it does not read its replies.
        """
        with self._cond:
            while not self.closed and self._size > self.limit:
                left = self._progress + self.stall_timeout - self.clock()
                if left <= 0:
                    self.closed = True
                    self._items.clear()
                    self._cond.notify_all()
                    return False
                self._cond.wait(left)
            if self.closed:
                return False
            self._append(data)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self.closed:
                    self._cond.wait()
                if not self._items:
                    return
                items = list(self._items)
                self._items.clear()
            view = memoryview(b"".join(items) if len(items) > 1 else items[0])
            try:
                while view:
                    sent = self.sock.send(view[: self.WRITE_CHUNK])
                    view = view[sent:]
                    with self._cond:
                        self._size -= sent
                        self._progress = self.clock()
                        self._cond.notify_all()
            except OSError:
                self.close()
                _shutdown(self.sock)
                return

    def close(self, flush: bool = False) -> None:
        """Stop accepting data; the writer sends what is queued when ``flush``."""
        with self._cond:
            self.closed = True
            if not flush:
                self._items.clear()
            self._cond.notify_all()

    def join(self, timeout: float) -> None:
        with self._cond:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


class Viewer:
    """One client connection as seen by the channels."""

    def __init__(
        self, sock: socket.socket, addr: tuple[str, int], outbox: Outbox, proto: ClientProtocol
    ) -> None:
        self.sock = sock
        self.addr = addr
        self.outbox = outbox
        self.proto = proto
        self.transport: ClientTransport | None = None
        self.play_request: RTSPRequest | None = None
        self.play_started = threading.Event()
        self.connected_at = time.monotonic()
        self.last_seen = self.connected_at  # last request, or RTCP from a UDP viewer
        self.requests = 0  # complete requests received
        self.evicted = False  # closed to make room for a new connection
        self.lock = threading.Lock()

    def disconnect(self) -> None:
        self.outbox.close()
        _shutdown(self.sock)


class KeeperPool:
    """One DCP login (svtool.TokenKeeper) per credentials, shared by channels.

    At most one login per credential pair is in flight: the others wait for
    its outcome.  A refusal the ``guard`` remembers is answered without a login.
    """

    LOGIN_LOCKS = 64  # logins of credential pairs that hash alike wait for each other

    def __init__(
        self,
        host: str,
        dcp_port: int,
        timeout: float,
        on_lost: Callable[[svtool.TokenKeeper], None],
        guard: LoginGuard | None = None,
    ) -> None:
        self.host = host
        self.dcp_port = dcp_port
        self.timeout = timeout
        self.on_lost = on_lost
        self.guard = guard if guard is not None else LoginGuard(0)
        self._current: dict[tuple[str, str], svtool.TokenKeeper] = {}
        self._refs: dict[svtool.TokenKeeper, int] = {}
        self._lock = threading.Lock()
        self._login_locks = [threading.Lock() for _ in range(self.LOGIN_LOCKS)]
        self._closed = False

    def has_live(self, creds: tuple[str, str]) -> bool:
        """True when ``creds`` are logged in: using them costs the DVR no login."""
        with self._lock:
            keeper = self._current.get(creds)
            return keeper is not None and keeper.alive

    def _take_live(self, creds: tuple[str, str]) -> svtool.TokenKeeper | None:
        with self._lock:
            keeper = self._current.get(creds)
            if keeper is None or not keeper.alive:
                return None
            self._refs[keeper] = self._refs.get(keeper, 0) + 1
            return keeper

    def acquire(self, creds: tuple[str, str]) -> svtool.TokenKeeper:
        """A live keeper for ``creds``, logging in if needed.

        Raises svtool.AuthenticationError, svtool.SVError or OSError.
        """
        keeper = self._take_live(creds)
        if keeper is not None:
            return keeper
        with self._login_locks[hash(creds) % self.LOGIN_LOCKS]:
            keeper = self._take_live(creds)
            if keeper is not None:
                return keeper
            if self.guard.refused_recently(creds):
                raise svtool.AuthenticationError("refused moments ago (remembered)")
            keeper = svtool.TokenKeeper(
                self.host, self.dcp_port, creds[0], creds[1], timeout=self.timeout
            )
            keeper.on_lost = lambda _exc, k=keeper: self.on_lost(k)
            try:
                keeper.start()
            except svtool.AuthenticationError:
                self.guard.remember_refusal(creds)
                raise
            with self._lock:
                if not self._closed:
                    self._current[creds] = keeper
                    self._refs[keeper] = 1
                    return keeper
        keeper.close()
        raise svtool.SVError("the proxy is shutting down")

    def release(self, keeper: svtool.TokenKeeper, creds: tuple[str, str]) -> None:
        """Drop one user of ``keeper``; the last one logs out."""
        with self._lock:
            count = self._refs.get(keeper, 0) - 1
            if count > 0:
                self._refs[keeper] = count
                return
            self._refs.pop(keeper, None)
            if self._current.get(creds) is keeper:
                del self._current[creds]
        keeper.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            keepers = list(self._refs)
            self._refs.clear()
            self._current.clear()
        for keeper in keepers:
            keeper.close()


class Channel:
    """One DVR channel for one set of credentials: one upstream, many viewers."""

    def __init__(self, server: ProxyServer, channel: int, creds: tuple[str, str]) -> None:
        self.server = server
        self.channel = channel
        self.creds = creds
        self.media = ChannelMedia(server.dvr_clock)
        self.description: DVRDescription | None = None
        self.params_ready = threading.Event()
        self.lock = threading.Lock()
        self.open_lock = threading.Lock()
        self.opened = False
        self.failed: str | None = None
        self.holders: set[Viewer] = set()
        self.active: set[Viewer] = set()
        self.waiting: set[Viewer] = set()
        self.idle_since: float | None = None
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self.keeper: svtool.TokenKeeper | None = None
        self._thread: threading.Thread | None = None

    # ---- opening the DVR session (blocking, in the first client's thread)
    def ensure_open(self) -> None:
        with self.open_lock:
            if self.failed:
                raise UpstreamError(self.failed)
            if self.opened:
                return
            try:
                self._open()
            except BaseException as exc:
                # the clients waiting for this open get the error as their reply
                self.fail(f"cannot open the DVR session: {exc}", disconnect=False)
                raise
            self.opened = True

    def _exchange(self, sock: socket.socket, dvr: DVRConnection, request: bytes) -> RTSPResponse:
        sock.sendall(request)
        while True:
            data = sock.recv(65536)
            if not data:
                raise UpstreamError("the DVR closed its RTSP connection")
            reply = dvr.receive_data(data)
            if reply is not None:
                if reply.status != 200:
                    raise UpstreamError(f"the DVR answered {dvr.cseq} with {reply.status}")
                return reply

    def _open(self) -> None:
        srv = self.server
        try:
            self.keeper = srv.keepers.acquire(self.creds)
        except svtool.AuthenticationError as exc:
            raise UpstreamError("DVR login refused", status=401) from exc
        except (svtool.SVError, OSError) as exc:
            raise UpstreamError(f"DCP login failed: {exc}") from exc
        count = dvr_channel_count(self.keeper.describe_info)
        if count is not None:
            srv.dvr_channels = count
            if self.channel >= count:
                raise UpstreamError(f"the DVR has {count} channels", status=404)
        token = self.keeper.token or ""
        try:
            ctrl = socket.create_connection((srv.remote_host, srv.remote_port), srv.timeout)
            self._socks.append(ctrl)
            dvr = DVRConnection(srv.remote_host, srv.remote_port, self.channel, token)
            reply = self._exchange(ctrl, dvr, dvr.describe())
            self.description = parse_dvr_describe(reply.body)
            mode = self.description.mode
            side: socket.socket
            if mode == "udp":
                side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._socks.append(side)
                for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
                    try:
                        if opt is not None:
                            side.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                            break
                    except OSError:
                        continue
                side.bind((ctrl.getsockname()[0], 0))
                reply = self._exchange(ctrl, dvr, dvr.setup("udp", side.getsockname()[1]))
                port = side_port_from_transport(reply.header("Transport"), srv.remote_port)
                side.connect((srv.remote_host, port))  # only the DVR may feed this socket
                side.send(b"\x00")  # PROTOCOLS 1.2: the DVR streams to this datagram's source
            else:
                reply = self._exchange(ctrl, dvr, dvr.setup("tcp"))
                port = side_port_from_transport(reply.header("Transport"), srv.remote_port)
                side = socket.create_connection((srv.remote_host, port), srv.timeout)
                self._socks.append(side)
                # PROTOCOLS 1.2: the whole Session header line, then one NUL
                side.sendall((dvr.session_line or "").encode("latin-1") + b"\x00")
            self._exchange(ctrl, dvr, dvr.play())
        except (OSError, ProxyError) as exc:
            raise UpstreamError(f"DVR RTSP: {exc}") from exc
        ctrl.settimeout(None)
        side.settimeout(None)
        log.info("channel %d: DVR session open (%s side port)", self.channel, mode)
        self._thread = threading.Thread(
            target=self._pump, args=(ctrl, side, mode), name=f"dvr-ch{self.channel}", daemon=True
        )
        self._thread.start()

    # ---- media pump (one thread per channel)
    def _pump(self, ctrl: socket.socket, side: socket.socket, mode: str) -> None:
        defrag = SamsungDefragmenter()
        sel = selectors.DefaultSelector()
        sel.register(ctrl, selectors.EVENT_READ, "ctrl")
        sel.register(side, selectors.EVENT_READ, "side")
        last_frame = time.monotonic()
        reason = "stopped"
        try:
            while not self._stop.is_set():
                events = sel.select(0.5)
                now = time.monotonic()
                for key, _ in events:
                    if key.data == "ctrl":
                        if not ctrl.recv(4096):
                            raise UpstreamError("the DVR closed its RTSP connection")
                        continue
                    if mode == "tcp":
                        data = side.recv(262144)
                        if not data:
                            raise UpstreamError("the DVR closed the side port")
                        frames = defrag.feed_stream(data)
                    else:
                        frames = []
                        for _ in range(256):
                            try:
                                data = side.recv(65536, socket.MSG_DONTWAIT)
                            except BlockingIOError:
                                break
                            try:
                                frames += defrag.feed_datagram(data)
                            except SamsungStreamError as exc:
                                log.debug("channel %d: bad datagram: %s", self.channel, exc)
                    for frame in frames:
                        last_frame = now
                        self._fan_out(frame)
                if now - last_frame > self.server.timeout:
                    raise UpstreamError("no video from the DVR")
        except (OSError, UpstreamError, SamsungStreamError) as exc:
            reason = str(exc)
        finally:
            sel.close()
        self.fail(reason)
        for sock in self._socks:
            sock.close()

    def _fan_out(self, frame: SamsungFrame) -> None:
        media = self.media.on_frame(frame)
        if media is None:
            return
        if self.media.sps and self.media.pps:
            self.params_ready.set()
        dropped: list[Viewer] = []
        with self.lock:
            starting = list(self.waiting) if media.keyframe else []
            prefix = self.media.start_packets(media) if starting else []
            for viewer in starting:
                self.waiting.discard(viewer)
                with viewer.lock:
                    request, viewer.play_request = viewer.play_request, None
                    if request is None:
                        continue
                    first = (media.first_seq - len(prefix)) & 0xFFFF
                    viewer.outbox.put(viewer.proto.play_reply(request, first, media.rtptime))
                    viewer.play_started.set()
                self.active.add(viewer)
                if prefix and not self._deliver(viewer, prefix, None):
                    dropped.append(viewer)
            for viewer in self.active:
                if not self._deliver(viewer, media.packets, media):
                    dropped.append(viewer)
            for viewer in dropped:
                self.active.discard(viewer)
            self.server.counters.add(len(self.active), len(dropped))
        for viewer in dropped:
            log.warning(
                "channel %d: dropping slow client %s:%d (%d bytes queued, none taken for %.1f s)",
                self.channel,
                *viewer.addr,
                viewer.outbox.queued,
                viewer.outbox.stalled_for(),
            )
            viewer.disconnect()

    def _deliver(self, viewer: Viewer, packets: list[bytes], media: MediaFrame | None) -> bool:
        transport = viewer.transport
        if transport is None:
            return True
        if transport.kind == "tcp":
            ch = transport.interleaved[0]
            data = media.interleaved(ch) if media is not None else interleave(packets, ch)
            return viewer.outbox.put(data, media=True)
        dest = (viewer.addr[0], transport.client_port[0])
        sock = self.server.rtp_socket
        for packet in packets:
            try:
                sock.sendto(packet, dest)
            except BlockingIOError:
                pass  # UDP: a full buffer is a lost packet
            except OSError:
                return False
        return True

    # ---- viewers
    def hold(self, viewer: Viewer) -> None:
        with self.lock:
            self.holders.add(viewer)
            self.idle_since = None

    def release(self, viewer: Viewer) -> None:
        with self.lock:
            self.holders.discard(viewer)
            self.active.discard(viewer)
            self.waiting.discard(viewer)
            if not self.holders:
                self.idle_since = time.monotonic()

    def start_play(self, viewer: Viewer, request: RTSPRequest) -> None:
        with self.lock:
            if self.failed:
                raise UpstreamError(self.failed)
            with viewer.lock:
                viewer.play_request = request
                viewer.play_started.clear()
            self.active.discard(viewer)
            self.waiting.add(viewer)

    def cancel_play(self, viewer: Viewer) -> bool:
        """Stop waiting for a keyframe; False when the PLAY reply already went out."""
        with self.lock:
            with viewer.lock:
                if viewer.play_started.is_set():
                    return False
                viewer.play_request = None
            self.waiting.discard(viewer)
            return True

    def pause(self, viewer: Viewer) -> None:
        with self.lock:
            self.active.discard(viewer)
            self.waiting.discard(viewer)

    # ---- ending
    def fail(self, reason: str, disconnect: bool = True) -> None:
        """End the DVR session; every client of this channel is disconnected."""
        with self.lock:
            if self._stop.is_set():
                return
            self._stop.set()
            if self.failed is None:
                self.failed = reason
            viewers = list(self.holders | self.active | self.waiting)
            for viewer in self.waiting:
                viewer.play_started.set()  # its connection is closed below, nothing to reply
            self.holders.clear()
            self.active.clear()
            self.waiting.clear()
        self.server.forget(self)
        pump = self._thread
        for sock in self._socks:
            _shutdown(sock)  # wakes the pump, which closes them itself
            if pump is None or pump is threading.current_thread():
                sock.close()
        keeper, self.keeper = self.keeper, None
        if keeper is not None:
            self.server.keepers.release(keeper, self.creds)
        if self.opened:
            log.info("channel %d: DVR session closed (%s)", self.channel, reason)
        for viewer in viewers if disconnect else ():
            viewer.disconnect()


class ProxyServer:
    """The proxy: a threaded RTSP server in front of one DVR.

    Exposure limits: at most ``max_clients`` connections (when full, the
    oldest one that never sent a complete request makes room, else the new one
    gets 503); a request complete within ``header_timeout`` seconds of its
    first byte; a connection that is not streaming closed after ``idle_timeout``
    seconds without a request (DVR sessions it set up are released); replies
    queued up to ``client_buffer`` bytes (a client that then takes nothing for
    ``client_stall`` seconds is closed);
    at most ``max_client_sessions`` DVR channels per connection; channels the
    DVR does not have are 404 without a DVR request; ``login_backoff`` for
    :class:`LoginGuard`.
    """

    def __init__(
        self,
        local: tuple[str, int],
        remote: tuple[str, int],
        *,
        dcp_port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        linger: float = 5.0,
        client_buffer: int = 2 << 20,
        client_stall: float = 5.0,
        dvr_clock: int = 1000,
        session_timeout: float = SESSION_TIMEOUT,
        max_clients: int = 64,
        header_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_client_sessions: int = 2,
        login_backoff: float = 1.0,
    ) -> None:
        self.remote_host, self.remote_port = remote
        self.max_clients = max_clients
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_client_sessions = max_client_sessions
        self.login_guard = LoginGuard(login_backoff)
        self.dvr_channels: int | None = None  # from the DCP description, once logged in
        self._refused_clients = 0  # connections refused at --max-clients
        self._refusal_logged = float("-inf")
        self.session_timeout = session_timeout  # UDP viewers silent 1.5 times this are dropped
        self.dcp_port = dcp_port if dcp_port is not None else remote[1] + 1
        self._creds = (username, password or "") if username is not None else None
        self.timeout = timeout
        self.linger = linger
        self.client_buffer = client_buffer
        self.client_stall = client_stall  # seconds a client over client_buffer may take nothing
        self.dvr_clock = dvr_clock
        self.keepers = KeeperPool(
            self.remote_host, self.dcp_port, timeout, self._keeper_lost, self.login_guard
        )
        self.counters = ProxyCounters()
        self._channels: dict[tuple[tuple[str, str], int], Channel] = {}
        self._viewers: set[Viewer] = set()
        self._udp_peers: dict[tuple[str, int], Viewer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.listener = socket.create_server(local, backlog=1024)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.rtp_socket, self.rtcp_socket = self._bind_rtp_pair(self.address[0])
        self.server_ports = (self.rtp_socket.getsockname()[1], self.rtcp_socket.getsockname()[1])

    @staticmethod
    def _bind_rtp_pair(host: str) -> tuple[socket.socket, socket.socket]:
        for _ in range(100):
            rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rtp.bind((host, 0))
            port = rtp.getsockname()[1]
            if port % 2 == 0 and port < 65535:
                rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    rtcp.bind((host, port + 1))
                except OSError:
                    rtcp.close()
                else:
                    rtp.setblocking(False)
                    rtp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                    return rtp, rtcp
            rtp.close()
        raise OSError("no free even/odd UDP port pair")

    # ---- lifecycle
    def start(self) -> None:
        """Serve in background threads."""
        for target, name in (
            (self._accept_loop, "rtsp-accept"),
            (self._drain_udp, "rtp-drain"),
            (self._housekeeping, "housekeeping"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop serving, end every DVR session, close every connection."""
        self._stop.set()
        _shutdown(self.listener)
        self.listener.close()
        with self._lock:
            channels = list(self._channels.values())
            viewers = list(self._viewers)
        for channel in channels:
            channel.fail("proxy shutting down")
        for viewer in viewers:
            viewer.disconnect()
        self.keepers.close()
        for thread in self._threads:
            thread.join(5)
        self.rtp_socket.close()
        self.rtcp_socket.close()

    def __enter__(self) -> ProxyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel_count(self) -> int:
        with self._lock:
            return len(self._channels)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self.listener.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("accept failed: %s", exc)
                self._stop.wait(0.2)  # e.g. out of file descriptors: do not spin
                continue
            viewer = self._admit(sock, addr[:2])
            if viewer is not None:
                thread = threading.Thread(
                    target=self._serve_client, args=(viewer,), name="rtsp-client", daemon=True
                )
                thread.start()

    @property
    def client_count(self) -> int:
        """Client connections open now (those being closed not counted)."""
        with self._lock:
            return sum(1 for v in self._viewers if not v.evicted)

    def _admit(self, sock: socket.socket, addr: tuple[str, int]) -> Viewer | None:
        """Register a new connection; when full, close the oldest silent one or refuse."""
        victim = None
        with self._lock:
            live = [v for v in self._viewers if not v.evicted]
            if len(live) >= self.max_clients:
                silent = [v for v in live if not v.requests]
                if silent:
                    victim = min(silent, key=lambda v: v.connected_at)
                    victim.evicted = True
            if len(live) < self.max_clients or victim is not None:
                outbox = Outbox(sock, self.client_buffer, self.client_stall)
                proto = ClientProtocol(credentials_required=self._creds is None)
                viewer: Viewer | None = Viewer(sock, addr, outbox, proto)
                self._viewers.add(viewer)
            else:
                viewer = None
        if victim is not None:
            log.info("client %s:%d: closed to make room (no request yet)", *victim.addr)
            victim.disconnect()
        if viewer is None:
            self._refused_clients += 1
            now = time.monotonic()
            if now >= self._refusal_logged + 1.0:  # a flood must not flood the log too
                log.warning(
                    "client %s:%d: refused, %d clients connected (%d refused so far)",
                    *addr,
                    self.max_clients,
                    self._refused_clients,
                )
                self._refusal_logged = now
            try:
                sock.setblocking(False)
                sock.send(build_response(503, None))
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.close()
        return viewer

    def _drain_udp(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in (self.rtp_socket, self.rtcp_socket):
            sel.register(sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.5):
                    try:
                        # RTCP receiver reports and NAT punches: signs of life of a UDP viewer
                        _, addr = key.fileobj.recvfrom(65536, socket.MSG_DONTWAIT)
                    except OSError:
                        continue
                    viewer = self._udp_peers.get(addr[:2])
                    if viewer is not None:
                        viewer.last_seen = time.monotonic()
        finally:
            sel.close()

    def _housekeeping(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                channels = list(self._channels.values())
                viewers = list(self._viewers)
            for channel in channels:
                idle = channel.idle_since
                if idle is not None and now - idle >= self.linger:
                    channel.fail("no viewers left")
            for viewer in viewers:
                transport = viewer.transport
                if transport is not None and transport.kind == "udp":
                    if now - viewer.last_seen > self.session_timeout * 1.5:
                        log.info("client %s:%d: session timed out", *viewer.addr)
                        viewer.disconnect()

    # ---- channels
    def _channel(self, number: int, creds: tuple[str, str]) -> Channel:
        key = (creds, number)
        with self._lock:
            channel = self._channels.get(key)
            if channel is None or channel.failed:
                channel = Channel(self, number, creds)
                self._channels[key] = channel
        return channel

    def forget(self, channel: Channel) -> None:
        with self._lock:
            key = (channel.creds, channel.channel)
            if self._channels.get(key) is channel:
                del self._channels[key]

    def _keeper_lost(self, keeper: svtool.TokenKeeper) -> None:
        with self._lock:
            channels = [c for c in self._channels.values() if c.keeper is keeper]
        for channel in channels:
            channel.fail("the DVR dropped the DCP connection")

    # ---- one client connection
    def _serve_client(self, viewer: Viewer) -> None:
        sock, addr, outbox = viewer.sock, viewer.addr, viewer.outbox
        held: dict[int, Channel] = {}
        parser = RTSPRequestParser()
        poller = select.poll()
        partial_since: float | None = None  # when the first byte of an incomplete request came
        log.debug("client %s:%d connected", *addr)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
            poller.register(sock, select.POLLIN)
            while not self._stop.is_set():
                left = read_deadline(
                    time.monotonic(),
                    partial_since=partial_since,
                    last_request=viewer.last_seen,
                    streaming=viewer.proto.playing or viewer.play_request is not None,
                    header_timeout=self.header_timeout,
                    idle_timeout=self.idle_timeout,
                )
                if left is not None and left <= 0:
                    why = "incomplete request" if partial_since is not None else "idle"
                    log.info("client %s:%d: closed (%s)", *addr, why)
                    break
                if left is not None and not poller.poll(int(left * 1000) + 1):
                    continue
                data = sock.recv(65536)
                if not data:
                    break
                try:
                    events = parser.feed(data)
                except RTSPError as exc:
                    log.info("client %s:%d: bad request: %s", *addr, exc)
                    outbox.put(viewer.proto.error(exc).data)
                    outbox.close(flush=True)
                    break
                now = time.monotonic()
                if not parser.buffered:
                    partial_since = None
                elif events or partial_since is None:
                    partial_since = now
                if not self._handle_all(viewer, events, held, now):
                    break  # the last reply closes the connection
        except OSError:
            pass
        finally:
            self._udp_peers_of(viewer, None)
            with self._lock:
                self._viewers.discard(viewer)
            for channel in held.values():
                channel.release(viewer)
            outbox.close(flush=True)
            outbox.join(2.0)
            _shutdown(sock)
            sock.close()
            log.debug("client %s:%d gone", *addr)

    def _handle_all(
        self,
        viewer: Viewer,
        events: list[RTSPRequest | InterleavedData],
        held: dict[int, Channel],
        now: float,
    ) -> bool:
        """Handle the requests of one read in order; False once the connection must close."""
        for event in events:
            if isinstance(event, RTSPRequest):
                viewer.requests += 1
                viewer.last_seen = now
                if not self._handle(viewer, event, held):
                    return False
        return True

    def _reply(self, viewer: Viewer, data: bytes) -> None:
        """Send a reply; a client that does not read its replies is disconnected."""
        if not viewer.outbox.put_reply(data):
            log.warning(
                "client %s:%d: closed, it does not read its replies (%d bytes queued)",
                *viewer.addr,
                viewer.outbox.queued,
            )
            _shutdown(viewer.sock)

    def _open(
        self,
        viewer: Viewer,
        action: NeedDescribe | NeedSetup,
        creds: tuple[str, str],
        held: dict[int, Channel],
    ) -> Channel | None:
        """The channel opened for this client, None after sending the error reply."""
        request = action.request
        channel = self._channel(action.channel, creds)
        channel.hold(viewer)
        held[action.channel] = channel
        try:
            channel.ensure_open()
        except UpstreamError as exc:
            log.warning("channel %d: %s", action.channel, exc)
            held.pop(action.channel, None)
            if exc.status == 401 and action.credentials is not None:
                wait = self.login_guard.refused(viewer.addr[0])
                if wait:
                    log.info("client %s:%d: next DVR login in %.0f s", *viewer.addr, wait)
            if exc.status == 401 and self._creds is None:
                self._reply(viewer, viewer.proto.unauthorized(request))
            else:
                status = 404 if exc.status == 404 else 503
                self._reply(viewer, viewer.proto.reply(request, status))
            return None
        if action.credentials is not None:
            self.login_guard.succeeded(viewer.addr[0])
        return channel

    def _refusal(
        self,
        viewer: Viewer,
        request: RTSPRequest,
        channel: int,
        creds: tuple[str, str],
        held: dict[int, Channel],
    ) -> bytes | None:
        """The reply when this client may not open ``channel`` now, else None."""
        proto = viewer.proto
        if self.dvr_channels is not None and channel >= self.dvr_channels:
            return proto.reply(request, 404)
        if sum(1 for c in held.values() if not c.failed) >= self.max_client_sessions:
            log.warning(
                "client %s:%d: refused a DVR session beyond its %d",
                *viewer.addr,
                self.max_client_sessions,
            )
            return proto.reply(request, 503)
        wait = self.login_guard.wait_for(viewer.addr[0])
        if wait > 0 and not self.keepers.has_live(creds):
            return proto.reply(request, 503, [("Retry-After", str(int(wait) + 1))])
        return None

    def _udp_peers_of(self, viewer: Viewer, transport: ClientTransport | None) -> None:
        """Set the viewer's transport and which UDP sources count as its signs of life."""
        with self._lock:
            old = viewer.transport
            if old is not None and old.kind == "udp":
                for port in old.client_port:
                    if self._udp_peers.get((viewer.addr[0], port)) is viewer:
                        del self._udp_peers[(viewer.addr[0], port)]
            viewer.transport = transport
            if transport is not None and transport.kind == "udp":
                for port in transport.client_port:
                    self._udp_peers[(viewer.addr[0], port)] = viewer

    def _handle(self, viewer: Viewer, request: RTSPRequest, held: dict[int, Channel]) -> bool:
        proto = viewer.proto
        log.debug("client %s:%d: %s %s", *viewer.addr, request.method, strip_userinfo(request.url))
        action = proto.handle(request)
        if isinstance(action, Reply):
            self._reply(viewer, action.data)
            return not action.close
        if isinstance(action, NeedDescribe | NeedSetup):
            creds = action.credentials or self._creds
            if creds is None:  # cannot happen: ClientProtocol asked for them
                self._reply(viewer, proto.unauthorized(request))
                return True
            channel = held.get(action.channel)
            if channel is None or channel.failed:
                turn = self.login_guard.turn(viewer.addr[0])
                with turn if action.credentials is not None else contextlib.nullcontext():
                    refusal = self._refusal(viewer, request, action.channel, creds, held)
                    channel = None if refusal else self._open(viewer, action, creds, held)
                if channel is None:
                    if refusal:
                        self._reply(viewer, refusal)
                    return True
            else:
                try:
                    channel.ensure_open()  # waits for the open of the channel in progress
                except UpstreamError:
                    held.pop(action.channel, None)
                    self._reply(viewer, proto.reply(request, 503))
                    return True
            if isinstance(action, NeedDescribe):
                channel.params_ready.wait(min(self.timeout, 3.0))
                url = strip_userinfo(request.url)
                sdp = build_sdp(
                    channel.description,
                    url,
                    self.address[0],
                    action.channel,
                    channel.media.sps,
                    channel.media.pps,
                )
                self._reply(viewer, proto.describe_reply(request, sdp, url))
                return True
            self._udp_peers_of(viewer, action.transport)
            reply = proto.setup_reply(
                request, action.channel, action.transport, channel.media.ssrc, self.server_ports
            )
            self._reply(viewer, reply)
            return True
        channel = held.get(proto.channel) if proto.channel is not None else None
        if isinstance(action, NeedTeardown):
            if channel is not None:
                channel.release(viewer)
                held.pop(channel.channel, None)
            self._udp_peers_of(viewer, None)
            self._reply(viewer, proto.teardown_reply(request))
            return True
        if channel is None or channel.failed:
            self._reply(viewer, proto.reply(request, 503))
            return False
        if isinstance(action, NeedPause):
            channel.pause(viewer)
            self._reply(viewer, proto.pause_reply(request))
            return True
        # PLAY: the reply goes out with the first keyframe, so media follows it in order.
        try:
            channel.start_play(viewer, request)
        except UpstreamError:
            self._reply(viewer, proto.reply(request, 503))
            return False
        if not viewer.play_started.wait(self.timeout) and channel.cancel_play(viewer):
            self._reply(viewer, proto.reply(request, 503))
        return True


# --------------------------------------------------------------------------
# Command line


EXIT_OK, EXIT_USAGE, EXIT_CANNOT_LISTEN = ExitCode.OK, ExitCode.USAGE, ExitCode.ERROR


def _listen_address(text: str) -> tuple[str, int]:
    """argparse type of LOCAL: port 0 means any free port."""
    try:
        return helpers.split_host_port(
            text, default_host="127.0.0.1", default_port=8554, lowest_port=0
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dvr_address(text: str) -> tuple[str, int]:
    """argparse type of REMOTE."""
    try:
        return helpers.split_host_port(text, default_port=554)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = helpers.Parser(
        prog="rtsp_proxy.py",
        description=(
            "Serve a Samsung SmartViewer DVR to standard RTSP clients. Clients open "
            "rtsp://[user:pass@]LOCAL/live.000 for channel 0, live.001 for channel 1, ..."
        ),
        epilog=(
            "Without --username the clients must send Basic credentials, which are used for "
            "the DVR login. Example: rtsp_proxy.py 127.0.0.1:8554 192.168.1.50:554. " + EPILOG
        ),
    )
    seconds, positive = helpers.non_negative_seconds, helpers.positive_seconds
    parser.add_argument(
        "local", metavar="LOCAL", type=_listen_address, nargs="?",
        help="listen address host:port (127.0.0.1:8554); port 0: any free port",
    )
    parser.add_argument(
        "remote", metavar="REMOTE", type=_dvr_address, nargs="?",
        help="the DVR's RTSP address host[:port] (554)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="serve every [[dvr]] of this TOML file, each on its own listen address",
    )
    parser.add_argument(
        "--health",
        metavar="[HOST:]PORT",
        help="serve /livez /readyz /metrics /status here (host 127.0.0.1 unless given)",
    )
    parser.add_argument(
        "--username", default=os.environ.get("SV_USER"), help="DVR user held by the proxy (SV_USER)"
    )
    parser.add_argument(
        "--password", default=None, help="DVR password (visible in ps: prefer --password-file)"
    )
    parser.add_argument(
        "--password-file", metavar="PATH", help="read the DVR password from this file's first line"
    )
    parser.add_argument(
        "--dcp-port", type=helpers.port_number, default=None, help="DCP port (RTSP port + 1)"
    )
    parser.add_argument("--timeout", type=positive, default=10.0, help="DVR I/O timeout, s (10)")
    parser.add_argument(
        "--linger", type=seconds, default=5.0,
        help="seconds a DVR session outlives its last viewer (5)",
    )
    parser.add_argument(
        "--client-buffer",
        type=helpers.integer_in(65536, 1 << 30, "byte count"),
        default=2 << 20,
        help="bytes queued per TCP client beyond which it is dropped once it has taken "
        "nothing for --client-stall seconds, or at once past 4 times this, at least 16 MiB "
        "(2 MiB); its replies wait while this much is queued",
    )
    parser.add_argument(
        "--client-stall", type=positive, default=5.0,
        help="seconds a TCP client with a full --client-buffer may take nothing (5)",
    )
    parser.add_argument(
        "--dvr-clock", type=helpers.integer_in(1, 10_000_000, "clock rate"), default=1000,
        help="the DVR's RTP clock rate, Hz (1000)",
    )
    limits = parser.add_argument_group("exposure limits (see README, Exposure)")
    limits.add_argument(
        "--max-clients", type=helpers.integer_in(1, 10000, "count"), default=64,
        help="client connections at once; when full, the oldest that sent no request yet "
        "is closed, else the new one gets 503 (64)",
    )
    limits.add_argument(
        "--header-timeout", type=positive, default=10.0,
        help="seconds from a request's first byte to its end (10)",
    )
    limits.add_argument(
        "--idle-timeout", type=positive, default=60.0,
        help="seconds a connection that is not playing (no session yet, or one set up or "
        "paused) may send nothing; the proxy advertises a 60 s session timeout (60)",
    )
    limits.add_argument(
        "--max-client-sessions", type=helpers.integer_in(1, 1000, "count"), default=2,
        help="DVR channels one client connection may open (2)",
    )
    limits.add_argument(
        "--login-backoff", type=seconds, default=1.0,
        help="after a refused DVR login the client address waits this long, doubling with "
        "each further refusal, and the refused credentials are refused from memory for 10 "
        "times this; 0: off (1)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv)")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")
    return parser


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    """The options and the DVR password; SystemExit(2) after a one-line usage error."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        password = helpers.password_from(args.password, args.password_file, "SV_PASS")
    except helpers.UsageError as exc:
        parser.error(str(exc))
    if args.username is not None and password is None:
        parser.error("--username needs --password, --password-file or SV_PASS")
    return args, password


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    try:
        args, password = _parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error, or the help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    level = logging.ERROR if args.quiet else (
        logging.WARNING, logging.INFO, logging.DEBUG
    )[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.config:
        if args.local or args.remote:
            print("rtsp_proxy.py: error: --config takes LOCAL and REMOTE from the file",
                  file=sys.stderr)
            return EXIT_USAGE
        return run_proxy_service(args)
    if args.local is None or args.remote is None:
        print("rtsp_proxy.py: error: LOCAL and REMOTE are required (or --config FILE)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        health_addr = helpers.parse_listen_address(args.health, "--health") if args.health else None
    except helpers.ConfigError as exc:
        print(f"rtsp_proxy.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        server = ProxyServer(
            args.local,
            args.remote,
            username=args.username,
            password=password,
            **_server_options(args),
        )
    except OSError as exc:
        where = "{}:{}".format(*args.local)
        print(f"rtsp_proxy.py: cannot listen on {where}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    stop = _stop_on_signals()
    server.start()
    host, port = server.address
    if not args.quiet:
        dvr = "{}:{}".format(*args.remote)
        print(f"listening rtsp://{host}:{port}/live.000 (DVR {dvr})", flush=True)
    return _serve_until_stopped(stop, ProxyService({"dvr": server}), health_addr)


# ---------------------------------------------------------------------------
# Service mode: several DVRs from one config file (--config), health endpoints
# ---------------------------------------------------------------------------

DVR_KEYS = ("name", "listen", "remote", "username", "password_env", "password_file")


class ProxyCounters:
    """Counters of one ProxyServer for /metrics, updated by the channels' pumps."""

    def __init__(self) -> None:
        self.frames_forwarded = 0  # frames handed to viewers, one per viewer
        self.clients_dropped = 0  # viewers dropped for not reading
        self._lock = threading.Lock()

    def add(self, frames: int, dropped: int) -> None:
        with self._lock:
            self.frames_forwarded += frames
            self.clients_dropped += dropped


@dataclasses.dataclass(frozen=True)
class DVRConfig:
    """One ``[[dvr]]`` entry, checked."""

    name: str
    listen: tuple[str, int]
    remote: tuple[str, int]
    username: str | None
    password: str | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """A config file as rtsp_proxy.py reads it: its DVRs and what is wrong with others."""

    health: str | None
    dvrs: tuple[DVRConfig, ...]
    errors: dict[str, str]  # dvr name (or "dvr N") -> why its entry was not taken


def parse_dvr_entry(
    entry: object, where: str, environ: dict[str, str] | None = None
) -> DVRConfig:
    """One ``[[dvr]]`` table -> DVRConfig; raises helpers.ConfigError."""
    if not isinstance(entry, dict):
        raise helpers.ConfigError(f"{where}: must be a table")
    helpers.check_keys(entry, (*DVR_KEYS, "password"), where)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise helpers.ConfigError(f"{where}: name must be a non-empty string")
    if "listen" not in entry:
        raise helpers.ConfigError(f"{where}: listen HOST:PORT is required")
    listen = helpers.parse_listen_address(entry["listen"], f"{where}: listen")
    remote_text = entry.get("remote")
    if not isinstance(remote_text, str):
        raise helpers.ConfigError(f"{where}: remote must be the DVR's HOST[:PORT]")
    try:
        remote = helpers.split_host_port(remote_text, default_port=554)
    except ValueError as exc:
        raise helpers.ConfigError(f"{where}: remote: {exc}") from None
    username = entry.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise helpers.ConfigError(f"{where}: username must be a non-empty string")
    password = helpers.entry_password(entry, where, environ)
    if username is not None and password is None:
        raise helpers.ConfigError(f"{where}: username needs password_env or password_file")
    return DVRConfig(name, listen, remote, username, password)


def parse_proxy_config(data: dict, environ: dict[str, str] | None = None) -> ProxyConfig:
    """A loaded TOML document -> ProxyConfig; a wrong ``[[dvr]]`` entry (or a name or
    listen address another has) lands in ``errors``; a wrong file raises ConfigError."""
    health, dvrs, errors = helpers.parse_service_file(
        data,
        "dvr",
        lambda entry, where: parse_dvr_entry(entry, where, environ),
        lambda dvr: [f"{dvr.listen[0]}:{dvr.listen[1]}"],
    )
    return ProxyConfig(health, tuple(dvrs), errors)


PROXY_METRICS = (
    # (name, kind, help, key of proxy_snapshot())
    ("rtsp_proxy_viewers", "gauge", "Clients receiving (or waiting for) video.", "viewers"),
    ("rtsp_proxy_clients", "gauge", "Client connections open.", "clients"),
    ("rtsp_proxy_dvr_sessions", "gauge", "DVR channel sessions open.", "dvr_sessions"),
    ("rtsp_proxy_frames_forwarded_total", "counter", "Frames handed to viewers (one per viewer).",
     "frames_forwarded"),
    ("rtsp_proxy_clients_dropped_total", "counter", "Viewers dropped for not reading.",
     "clients_dropped"),
)


def proxy_snapshot(server: ProxyServer) -> dict:
    """One proxy's numbers now, as plain values (no credentials)."""
    with server._lock:
        channels = list(server._channels.values())
        clients = len(server._viewers)
    viewers = 0
    for channel in channels:
        with channel.lock:
            viewers += len(channel.active | channel.waiting)
    return {
        "listen": f"{server.address[0]}:{server.address[1]}",
        "remote": f"{server.remote_host}:{server.remote_port}",
        "viewers": viewers,
        "clients": clients,
        "dvr_sessions": sum(1 for c in channels if c.opened and not c.failed),
        "frames_forwarded": server.counters.frames_forwarded,
        "clients_dropped": server.counters.clients_dropped,
    }


def proxy_metrics(snapshots: dict[str, dict]) -> list[helpers.Metric]:
    """Metric families from ``{name: proxy_snapshot()}``; pure."""
    return helpers.metric_families(PROXY_METRICS, snapshots, "dvr")


class ProxyService(helpers.HealthSource):
    """Several ProxyServers, one per ``[[dvr]]``, behind one set of health endpoints."""

    def __init__(self, servers: dict[str, ProxyServer], options: dict | None = None) -> None:
        self.servers = dict(servers)
        self.configs: dict[str, DVRConfig] = {}
        self.errors: dict[str, str] = {}
        self.options = options or {}  # ProxyServer keyword arguments shared by every DVR
        self.lock = threading.Lock()

    def apply(self, config: ProxyConfig) -> None:
        """Close removed and changed DVRs' proxies, open added and changed ones; leave
        the rest (their viewers keep watching)."""
        wanted = {d.name: d for d in config.dvrs}
        with self.lock:
            stale = [n for n, c in self.configs.items() if wanted.get(n) != c]
            closing = [self.servers.pop(n) for n in stale]
            for name in stale:
                del self.configs[name]
        for server in closing:
            server.close()
        errors = dict(config.errors)
        for name, dvr in wanted.items():
            if name in self.configs:
                continue
            try:
                server = ProxyServer(
                    dvr.listen,
                    dvr.remote,
                    username=dvr.username,
                    password=dvr.password,
                    **self.options,
                )
            except OSError as exc:
                errors[name] = f"dvr {name!r}: cannot listen on {dvr.listen}: {exc}"
                continue
            server.start()
            with self.lock:
                self.servers[name], self.configs[name] = server, dvr
            host, port = server.address
            print(f"{name}: listening rtsp://{host}:{port}/live.000 (DVR {dvr.remote[0]})",
                  flush=True)  # fmt: skip
        for why in errors.values():
            print(f"rtsp_proxy.py: {why}", file=sys.stderr, flush=True)
        with self.lock:
            self.errors = errors

    def close(self) -> None:
        with self.lock:
            servers, self.servers, self.configs = list(self.servers.values()), {}, {}
        for server in servers:
            server.close()

    def _snapshots(self) -> dict[str, dict]:
        with self.lock:
            servers = dict(self.servers)
        return {name: proxy_snapshot(server) for name, server in servers.items()}

    def not_ready(self) -> dict[str, str]:
        with self.lock:
            return dict(self.errors)

    def metrics(self) -> list[helpers.Metric]:
        return proxy_metrics(self._snapshots())

    def status(self) -> dict:
        return {"dvrs": self._snapshots(), "errors": self.not_ready()}


def _server_options(args: argparse.Namespace) -> dict:
    """ProxyServer keyword arguments shared by every DVR (from the command line)."""
    return {
        "dcp_port": args.dcp_port,
        "timeout": args.timeout,
        "linger": args.linger,
        "client_buffer": args.client_buffer,
        "client_stall": args.client_stall,
        "dvr_clock": args.dvr_clock,
        "max_clients": args.max_clients,
        "header_timeout": args.header_timeout,
        "idle_timeout": args.idle_timeout,
        "max_client_sessions": args.max_client_sessions,
        "login_backoff": args.login_backoff,
    }


def run_proxy_service(args: argparse.Namespace) -> int:
    """``--config FILE``: one proxy per ``[[dvr]]`` in this process, until SIGTERM;
    SIGHUP re-reads the file."""
    try:
        config = parse_proxy_config(helpers.load_toml(args.config))
        health_text = args.health or config.health
        health_addr = helpers.parse_listen_address(health_text, "health") if health_text else None
    except helpers.ConfigError as exc:
        print(f"rtsp_proxy.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = _stop_on_signals()
    hup = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    service = ProxyService({}, _server_options(args))
    service.apply(config)

    def reload() -> None:
        hup.clear()
        try:
            new = parse_proxy_config(helpers.load_toml(args.config))
        except helpers.ConfigError as exc:
            print(f"rtsp_proxy.py: {exc}; keeping the running DVRs", file=sys.stderr, flush=True)
            return
        if not args.health:  # --health overrides the file
            note = helpers.health_change_note(config.health, new.health)
            if note:
                print(f"rtsp_proxy.py: {note}", file=sys.stderr, flush=True)
        service.apply(new)
        print(f"reloaded {args.config}", flush=True)

    return _serve_until_stopped(stop, service, health_addr, hup, reload)


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set (install before saying "listening")."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _serve_until_stopped(
    stop: threading.Event,
    service: ProxyService,
    health_addr: tuple[str, int] | None,
    hup: threading.Event | None = None,
    reload: Callable[[], None] | None = None,
) -> int:
    """Serve health (if asked) until ``stop``, calling ``reload`` when ``hup`` is set;
    close ``service`` at the end."""
    health = None
    try:
        if health_addr is not None:
            try:
                health = helpers.HealthServer(health_addr, service).start()
            except OSError as exc:
                print(f"rtsp_proxy.py: cannot serve health on {health_addr}: {exc}",
                      file=sys.stderr)
                return EXIT_CANNOT_LISTEN
            print(f"health: http://{health.address[0]}:{health.address[1]}/readyz", flush=True)
        while not stop.wait(0.5):
            if hup is not None and reload is not None and hup.is_set():
                reload()
    finally:
        if health is not None:
            health.close()
        service.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
