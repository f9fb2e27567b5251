#!/usr/bin/env python3
"""Dahua P2P (Easy4IPCloud) signalling and crypto helpers, sans-IO.

Everything here takes and returns bytes or plain values: the app profiles (one
row per cloud dialect, :data:`APP_PROFILES`), building the cloud's HTTP-like
requests (DHGET/DHPOST, NFGET/NFPOST) with their WSSE header, parsing replies and
their XML bodies, the device-credential crypto of newer firmware, the
``/info/device`` blob, and the inverted-STUN hole-punch messages.  No sockets.
See PROTOCOLS.md section 2.

Two later sections are shared by every tool of the project: what ``dh_p2p.py``
and ``rtsp_proxy.py`` share for service mode (``--config``, ``--health``):
config-file checks and the Prometheus text rendering (pure), and
``HealthServer``, the one driver here, a stdlib ``http.server`` thread around
the pure ``health_response``; and the command-line plumbing of all four tools:
the one exit-code table (:class:`ExitCode`, :data:`EPILOG`), option value types
that end a bad value in a one-line usage error, and ``--password-file``.

As a script it offers a few offline utilities (build a request, decode an
Info blob, compute a device key); run ``helpers.py --help``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import struct
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NoReturn
from xml.sax.saxutils import escape as _xml_escape

from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import PBKDF2

log = logging.getLogger("helpers")

__all__ = [
    "DEFAULT_CLOUD_USER",
    "DEFAULT_CLOUD_KEY",
    "DEFAULT_CLOUD_HOST",
    "DEFAULT_CLOUD_PORT",
    "DEFAULT_RANDSALT",
    "P2PProtocolError",
    "Request",
    "Reply",
    "AppProfile",
    "APP_PROFILES",
    "SMARTPSS",
    "DMSS",
    "wsse_digest",
    "wsse_created",
    "new_request_id",
    "build_request",
    "p2p_channel_body",
    "parse_request",
    "build_reply",
    "parse_reply",
    "parse_xml_fields",
    "xml_body",
    "parse_host_port",
    "device_key",
    "derive_addr_key",
    "encrypt_local_addr",
    "decrypt_local_addr",
    "dev_auth",
    "dev_auth_xml",
    "encrypt_info",
    "decrypt_info",
    "new_identify",
    "format_identify",
    "parse_identify",
    "StunMessage",
    "STUN_BINDING_REQUEST",
    "STUN_BINDING_SUCCESS",
    "ATTR_ADDRESS",
    "ATTR_ICE_CONTROLLED",
    "ATTR_ICE_CONTROLLING",
    "build_punch_request",
    "build_punch_response",
    "parse_punch",
    "looks_like_punch",
    "main",
]

# ---------------------------------------------------------------------------
# Constants (PROTOCOLS 2.1, 2.2, 2.4)
# ---------------------------------------------------------------------------

DEFAULT_CLOUD_USER = "cba1b29e32cb17aa46b8ff9e73c7f40b"
DEFAULT_CLOUD_KEY = "996103384cdf19179e19243e959bbf8b"
DEFAULT_CLOUD_HOST = "www.easy4ipcloud.com"
DEFAULT_CLOUD_PORT = 8800
DEFAULT_RANDSALT = "5daf91fc5cfc1be8e081cfb08f792726"

INFO_KEY = b"kRjmsUB&ezmdGLL67H#$ojw@XflcaIaf"
INFO_IV = b"MydvJw*Iw1w&i^kk"
ADDR_IV = b"2z52*lk9o6HRyJrf"
ADDR_KDF_ITERATIONS = 20000

#: Largest signalling datagram we agree to parse (a UDP payload cannot exceed 65507).
MAX_MESSAGE = 65536
#: Largest XML body we hand to the XML parser.
MAX_XML = 16384


def ascii_number(text: str, max_digits: int = 10) -> int | None:
    """The value of 1 to ``max_digits`` ASCII digits (RFC 5234 DIGIT), else None.

    ``str.isdigit`` and ``int`` also take other scripts' digits, superscripts
    ("²", which ``int`` then refuses), signs, spaces and underscores: every
    number that comes from the network or the command line goes through here.
    """
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


class P2PProtocolError(Exception):
    """A cloud, device or punch message could not be parsed or is invalid."""


# ---------------------------------------------------------------------------
# Signalling messages: requests (PROTOCOLS 2.1)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AppProfile:
    """One app's cloud identity ("dialect"), a row of :data:`APP_PROFILES`.

    Everything that differs between the SmartPSS and the DMSS way of talking to
    the cloud (PROTOCOLS 2.1, 2.7 (c)) is data here; :func:`build_request` and
    :func:`p2p_channel_body` read it, so no caller branches on the app.
    """

    name: str  # as on the command line: smartpss, dmss
    label: str  # for messages: SmartPSS, DMSS
    host: str  # main server
    port: int
    cloud_user: str  # WSSE pair
    cloud_key: str
    get_method: str  # request without a body
    post_method: str  # request with a body
    #: Headers before Content-Type, in the order sent. "CSeq", "Authorization",
    #: "X-WSSE" and "x-pcs-request-id" are computed; the others come from ``fixed_headers``.
    header_order: tuple[str, ...]
    fixed_headers: tuple[tuple[str, str], ...]
    cseq_style: str  # "counter" (1, 2, ... per socket) or "random" (signed int32 per request)
    nonce_style: str  # WSSE Nonce: "positive" (below 2**31) or "signed" (int32)
    created_style: str  # WSSE Created: "Z" (UTC) or "offset" (UTC as +00:00)
    request_id_paths: tuple[str, ...]  # path endings whose requests carry x-pcs-request-id
    warmup_path: str | None  # sent first, before /probe/p2psrv (None: no warm-up)
    warmup_headers: tuple[str, ...]  # its headers (without auth unless listed)
    channel_tags: tuple[str, ...]  # p2p-channel body after the [auth] block, in order
    channel_constants: tuple[tuple[str, str], ...]  # values of the constant tags there
    body_version: str  # <version> of p2p-channel
    identify_padded: bool  # Identify bytes as "0a" (True) or "a" (False)
    require_randsalt: bool  # with device credentials, refuse to sign without the device's salt
    #: p2p-channel resends made afresh (Nonce, LocalAddr ciphertext, DevAuth, WSSE nonce;
    #: CSeq, request id, Identify, CreateDate, ClientId kept) rather than repeated
    fresh_resend: bool
    uses_relay: bool  # the app asks for a relay agent up front (False: only when needed)
    local_channel: bool  # once set up, sends local-channel (GET with an auth body)

    def header_value(self, name: str) -> str:
        """The value of a fixed header of this profile."""
        return dict(self.fixed_headers)[name]

    def sends_request_id(self, path: str) -> bool:
        """Whether requests to ``path`` carry an ``x-pcs-request-id``."""
        return any(path.endswith(end) for end in self.request_id_paths)

    def new_cseq(self, counter: int, rng: Callable[[int], bytes] = os.urandom) -> int:
        """The CSeq of a new request: ``counter`` itself, or a random signed int32."""
        if self.cseq_style == "counter":
            return counter
        return int.from_bytes(rng(4), "big", signed=True)

    def new_nonce(self, rng: Callable[[int], bytes] = os.urandom) -> int:
        """A WSSE Nonce in this profile's range."""
        value = int.from_bytes(rng(4), "big", signed=True)
        return value if self.nonce_style == "signed" else value & 0x7FFFFFFF


SMARTPSS = AppProfile(
    name="smartpss",
    label="SmartPSS",
    host=DEFAULT_CLOUD_HOST,
    port=DEFAULT_CLOUD_PORT,
    cloud_user=DEFAULT_CLOUD_USER,
    cloud_key=DEFAULT_CLOUD_KEY,
    get_method="DHGET",
    post_method="DHPOST",
    header_order=("CSeq", "Authorization", "X-WSSE"),
    fixed_headers=(),
    cseq_style="counter",
    nonce_style="positive",
    created_style="Z",
    request_id_paths=(),
    warmup_path=None,
    warmup_headers=(),
    channel_tags=("Identify", "IpEncrpt", "LocalAddr", "version"),
    channel_constants=(),
    body_version="5.0.0",
    identify_padded=False,
    require_randsalt=False,
    fresh_resend=False,
    uses_relay=True,
    local_channel=False,
)

DMSS = AppProfile(
    name="dmss",
    label="DMSS",
    host="p2p.dolynkcloud.com",
    port=8800,
    cloud_user="793k5zdi4dd5f037sooag8yo_dolynkc",
    cloud_key="ef8hatgmcuk4qamgg4fxx19x33s9q1xy",
    get_method="NFGET",
    post_method="NFPOST",
    header_order=(
        "X-Version", "X-Sversion", "x-pcs-request-id", "X-ToUType", "CSeq", "Authorization",
        "X-WSSE",
    ),  # fmt: skip
    fixed_headers=(
        ("X-Version", "6.7.15"),
        ("X-Sversion", "1.1.0"),
        ("X-ToUType", "Client/Dmss_Android"),
    ),
    cseq_style="random",
    nonce_style="signed",
    created_style="offset",
    request_id_paths=("/p2p-channel",),
    warmup_path="/online/stun",
    warmup_headers=("X-ToUType", "CSeq"),
    channel_tags=(
        "Identify", "IpEncrpt", "NatValueT", "version", "sVersion", "LocalAddr", "Pid", "ClientId",
    ),  # fmt: skip
    channel_constants=(("NatValueT", "0"), ("sVersion", "1.1.0"), ("Pid", "0")),
    body_version="6.7.15",
    identify_padded=True,
    require_randsalt=True,
    fresh_resend=True,
    uses_relay=False,
    local_channel=True,
)

#: The app profiles, in the order ``--app auto`` tries them (PROTOCOLS 2.7 (c)).
APP_PROFILES: dict[str, AppProfile] = {p.name: p for p in (SMARTPSS, DMSS)}


def wsse_created(now: float | None = None, style: str = "Z") -> str:
    """The WSSE ``Created`` timestamp (UTC, second precision) for unix time ``now``:
    ``...Z`` or, in the "offset" style, ``...+00:00``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() if now is None else now))
    return stamp + ("Z" if style == "Z" else "+00:00")


def wsse_digest(nonce: int, created: str, cloud_user: str, cloud_key: str) -> str:
    """base64(SHA1(str(nonce) + created + "DHP2P:" + user + ":" + key))."""
    raw = f"{nonce}{created}DHP2P:{cloud_user}:{cloud_key}".encode()
    return base64.b64encode(hashlib.sha1(raw).digest()).decode("ascii")


def new_request_id(rng: Callable[[int], bytes] = os.urandom) -> str:
    """An ``x-pcs-request-id``: 32 lowercase hex characters."""
    return rng(16).hex()


def build_request(
    path: str,
    cseq: int,
    *,
    body: str | None = None,
    cloud_user: str | None = None,
    cloud_key: str | None = None,
    nonce: int | None = None,
    created: str | None = None,
    profile: AppProfile = SMARTPSS,
    request_id: str | None = None,
    auth: bool = True,
    method: str | None = None,
) -> bytes:
    """Build a request datagram in ``profile``'s dialect: its GET method without a
    body, its POST method with one, its headers in its order.

    ``cloud_user``/``cloud_key`` default to the profile's pair, ``nonce`` to a random
    one in the profile's range and ``created`` to now.  ``request_id`` is sent where
    the profile's header order has ``x-pcs-request-id``.  ``auth=False`` builds the
    unauthenticated warm-up with the profile's ``warmup_headers``.  ``method``
    overrides the choice by body (local-channel is a GET with a body).
    """
    user = profile.cloud_user if cloud_user is None else cloud_user
    key = profile.cloud_key if cloud_key is None else cloud_key
    if nonce is None:
        nonce = profile.new_nonce()
    if created is None:
        created = wsse_created(style=profile.created_style)
    digest = wsse_digest(nonce, created, user, key)
    computed = {
        "CSeq": str(cseq),
        "Authorization": 'WSSE profile="UsernameToken"',
        "X-WSSE": f'UsernameToken Username="{user}", PasswordDigest="{digest}", '
        f'Nonce="{nonce}", Created="{created}"',
        "x-pcs-request-id": request_id,
    }
    fixed = dict(profile.fixed_headers)
    if method is None:
        method = profile.get_method if body is None else profile.post_method
    # PROTOCOLS 2.1, 2.7 (c): header order and the CSeq format matter to the server.
    lines = [f"{method} {path} HTTP/1.1"]
    for name in profile.header_order if auth else profile.warmup_headers:
        value = computed[name] if name in computed else fixed[name]
        if value is not None:
            lines.append(f"{name}: {value}")
    payload = b""
    if body is not None:
        payload = body.encode("utf-8")
        # PROTOCOLS 2.1: an empty Content-Type with exactly one space after the colon.
        lines.append("Content-Type: ")
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + payload


def p2p_channel_body(
    profile: AppProfile,
    *,
    identify: bytes,
    local_addr: str,
    encrypted: bool,
    auth_xml: str = "",
    client_id: str = "",
) -> str:
    """The p2p-channel body in ``profile``'s tag order (PROTOCOLS 2.2 step 5, 2.7 (c)).

    ``local_addr`` is the LocalAddr as sent (ciphertext when ``encrypted``), which
    selects ``<IpEncrptV2>`` over ``<IpEncrpt>``; ``auth_xml`` is the [auth] block.
    """
    values = dict(profile.channel_constants)
    values.update(
        Identify=format_identify(identify, padded=profile.identify_padded),
        LocalAddr=local_addr,
        version=profile.body_version,
        ClientId=client_id,
    )
    tags = []
    for tag in profile.channel_tags:
        if tag == "IpEncrpt":  # PROTOCOLS 2.4: V2 when LocalAddr is encrypted
            tag = "IpEncrptV2" if encrypted else "IpEncrpt"
            tags.append(f"<{tag}>true</{tag}>")
        else:
            tags.append(f"<{tag}>{_xml_escape(values[tag])}</{tag}>")
    return f"<body>{auth_xml}{''.join(tags)}</body>"


_CSEQ = re.compile(r"-?[0-9]{1,10}")


class _Headers:
    """Header lookup shared by requests and replies."""

    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return None

    @property
    def cseq(self) -> int | None:
        """The CSeq as an integer (a signed int32 in the DMSS dialect), or None when
        absent or malformed."""
        value = self.header("CSeq")
        if value is None or not _CSEQ.fullmatch(value):
            return None
        number = int(value)
        return number if -(2**31) <= number < 2**31 else None

    @property
    def request_id(self) -> str | None:
        """The ``x-pcs-request-id`` header, or None."""
        return self.header("x-pcs-request-id")


@dataclass
class Request(_Headers):
    """A parsed DHGET/DHPOST request (used by emulators and for logging)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: str = ""

    @property
    def fields(self) -> dict[str, str]:
        """The XML body's elements (see :func:`parse_xml_fields`)."""
        return parse_xml_fields(self.body)

    def wsse(self) -> dict[str, str]:
        """The X-WSSE header's key="value" pairs (empty when absent)."""
        value = self.header("X-WSSE") or ""
        if not value.startswith("UsernameToken "):
            return {}
        return dict(re.findall(r'(\w+)="([^"]*)"', value))

    def wsse_valid(self, cloud_user: str, cloud_key: str) -> bool:
        """True when the WSSE header is present, for this user, and its digest matches."""
        if self.header("Authorization") != 'WSSE profile="UsernameToken"':
            return False
        token = self.wsse()
        try:
            if not re.fullmatch(r"-?[0-9]{1,10}", token["Nonce"]):
                return False  # PROTOCOLS: a signed int32 in ASCII decimal
            nonce = int(token["Nonce"])
            created = token["Created"]
            user = token["Username"]
            digest = token["PasswordDigest"]
        except (KeyError, ValueError):
            return False
        if user != cloud_user:
            return False
        expected = wsse_digest(nonce, created, cloud_user, cloud_key)
        return hmac.compare_digest(expected, digest)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _split_message(data: bytes) -> tuple[str, list[tuple[str, str]], str]:
    """Split an HTTP-like datagram into first line, headers and body text."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise P2PProtocolError("message must be bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE:
        raise P2PProtocolError(f"message too large ({len(data)} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise P2PProtocolError("message is not UTF-8 text") from exc
    head, sep, body = text.partition("\r\n\r\n")
    if not sep:
        # Tolerate a message with headers but no blank line (nothing after them).
        head, body = text.rstrip("\r\n"), ""
    lines = head.split("\r\n")
    first = lines[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise P2PProtocolError(f"malformed header line {line[:60]!r}")
        headers.append((name, value.strip(" \t")))
    for name, value in headers:
        if name.lower() == "content-length":
            length = ascii_number(value)
            if length is None:
                raise P2PProtocolError(f"bad Content-Length {value[:20]!r}")
            raw = body.encode("utf-8")
            if length > len(raw):
                raise P2PProtocolError("body shorter than Content-Length")
            try:
                body = raw[:length].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise P2PProtocolError("Content-Length splits a character") from exc
            break
    return first, headers, body


_REQUEST_LINE = re.compile(r"(DHGET|DHPOST|NFGET|NFPOST) (/\S*) HTTP/1\.1")


def parse_request(data: bytes) -> Request:
    """Parse a DHGET/DHPOST request datagram; raises :class:`P2PProtocolError`."""
    first, headers, body = _split_message(data)
    match = _REQUEST_LINE.fullmatch(first)
    if not match:
        raise P2PProtocolError(f"bad request line {first[:60]!r}")
    return Request(match.group(1), match.group(2), headers, body)


# ---------------------------------------------------------------------------
# Signalling messages: replies
# ---------------------------------------------------------------------------


@dataclass
class Reply(_Headers):
    """A parsed cloud/device reply: status, headers, body and its XML fields."""

    code: int
    reason: str
    headers: list[tuple[str, str]]
    body: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def provisional(self) -> bool:
        """True for 1xx replies (``100 Trying``): the final reply follows."""
        return 100 <= self.code < 200

    @property
    def ok(self) -> bool:
        """True for 2xx replies."""
        return 200 <= self.code < 300


_STATUS_LINE = re.compile(r"HTTP/1\.[01] ([1-5][0-9][0-9])(?: (.*))?")


def parse_reply(data: bytes) -> Reply:
    """Parse a reply datagram (``HTTP/1.1 <code> <reason>``, headers, XML body).

    Raises :class:`P2PProtocolError` on anything malformed, including hostile XML.
    """
    first, headers, body = _split_message(data)
    match = _STATUS_LINE.fullmatch(first)
    if not match:
        raise P2PProtocolError(f"bad status line {first[:60]!r}")
    return Reply(int(match.group(1)), match.group(2) or "", headers, body, parse_xml_fields(body))


def build_reply(
    code: int,
    reason: str,
    *,
    cseq: int | None = None,
    body: str | None = None,
    request_id: str | None = None,
) -> bytes:
    """Build a reply datagram as the cloud servers and devices send them."""
    lines = [f"HTTP/1.1 {code} {reason}"]
    if request_id is not None:
        lines.append(f"x-pcs-request-id: {request_id}")
    if cseq is not None:
        lines.append(f"CSeq: {cseq}")
    payload = b""
    if body:
        payload = body.encode("utf-8")
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + payload


def parse_xml_fields(text: str) -> dict[str, str]:
    """Flatten an XML body into ``{tag: text}`` for every element below the root.

    The first occurrence of a tag wins; text is stripped. An empty body gives an
    empty dict. DOCTYPE/ENTITY declarations, oversized and malformed XML raise
    :class:`P2PProtocolError`.
    """
    stripped = text.strip().strip("\x00")
    if not stripped:
        return {}
    if len(stripped) > MAX_XML:
        raise P2PProtocolError("XML body too large")
    upper = stripped.upper()
    if "<!DOCTYPE" in upper or "<!ENTITY" in upper:
        raise P2PProtocolError("XML body with DOCTYPE/ENTITY refused")
    try:
        root = ET.fromstring(stripped)
    except (ET.ParseError, ValueError, RecursionError) as exc:
        raise P2PProtocolError(f"malformed XML body: {exc}") from exc
    result: dict[str, str] = {}
    for elem in root.iter():
        if elem is root or not isinstance(elem.tag, str):
            continue
        result.setdefault(elem.tag, (elem.text or "").strip())
    return result


def xml_body(items: Iterable[tuple[str, object]] | dict[str, object]) -> str:
    """``<body><k>v</k>...</body>`` with values XML-escaped, in the given order."""
    pairs = items.items() if isinstance(items, dict) else items
    inner = "".join(f"<{k}>{_xml_escape(str(v))}</{k}>" for k, v in pairs)
    return f"<body>{inner}</body>"


def split_host_port(
    text: str,
    *,
    default_host: str | None = None,
    default_port: int | None = None,
    lowest_port: int = 1,
) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (then ``default_port``) or ``PORT`` (then
    ``default_host``) -> (host, port); ``[v6]`` brackets are dropped.  The one
    host:port parser of every tool, its option types, config files and cloud
    replies.  Raises ValueError when a part is missing without a default, or the
    port is not ASCII digits from ``lowest_port`` to 65535."""
    text = text.strip()
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = ("", text) if ascii_number(text, 5) is not None else (text, "")
    host = host.strip("[]") or default_host or ""
    if not host:
        raise ValueError(f"{text[:60]!r} needs a host")
    if not port:
        if colon or default_port is None:  # "host:" promises a port it does not give
            raise ValueError(f"{text[:60]!r} needs a port")
        return host, default_port
    number = ascii_number(port, 5)
    if number is None or not lowest_port <= number <= 65535:
        raise ValueError(f"port must be {lowest_port}-65535 in {text[:60]!r}")
    return host, number


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (as in ``<US>``, ``<Address>``, ``<LocalAddr>``)."""
    try:
        return split_host_port(text)
    except ValueError:
        raise P2PProtocolError(f"bad address {text[:60]!r}") from None


# ---------------------------------------------------------------------------
# Device credentials (PROTOCOLS 2.4) and /info/device (PROTOCOLS 2.2 step 2)
# ---------------------------------------------------------------------------


def device_key(user: str, password: str, randsalt: str | None = None) -> bytes:
    """Uppercase hex MD5 of ``"{user}:Login to {randsalt}:{password}"`` as ASCII bytes."""
    salt = randsalt or DEFAULT_RANDSALT
    text = f"{user}:Login to {salt}:{password}".encode()
    return hashlib.md5(text).hexdigest().upper().encode("ascii")


def derive_addr_key(key: bytes, nonce: int | str) -> bytes:
    """PBKDF2-HMAC-SHA256(key, salt=str(nonce), 20000 iterations, 32 bytes)."""
    return PBKDF2(
        key, str(nonce).encode(), dkLen=32, count=ADDR_KDF_ITERATIONS, hmac_hash_module=SHA256
    )


def encrypt_local_addr(key: bytes, nonce: int | str, addr: str) -> str:
    """Encrypt ``ip:port`` for ``<LocalAddr>`` (AES-256-OFB, base64)."""
    cipher = AES.new(derive_addr_key(key, nonce), AES.MODE_OFB, iv=ADDR_IV)
    return base64.b64encode(cipher.encrypt(addr.encode())).decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise P2PProtocolError("invalid base64") from exc


def decrypt_local_addr(key: bytes, nonce: int | str, b64: str) -> str:
    """Decrypt an encrypted ``<LocalAddr>``; raises :class:`P2PProtocolError` if garbled."""
    cipher = AES.new(derive_addr_key(key, nonce), AES.MODE_OFB, iv=ADDR_IV)
    try:
        return cipher.decrypt(_b64decode(b64)).decode("ascii")
    except UnicodeDecodeError as exc:
        raise P2PProtocolError("LocalAddr does not decrypt (wrong credentials?)") from exc


def dev_auth(key: bytes, nonce: int | str, created: int | str, payload: str = "") -> str:
    """base64(HMAC-SHA256(key, str(nonce) + str(created) + payload))."""
    msg = f"{nonce}{created}{payload}".encode()
    return base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode("ascii")


def dev_auth_xml(
    key: bytes,
    user: str,
    nonce: int,
    created: int,
    payload: str = "",
    randsalt: str | None = DEFAULT_RANDSALT,
) -> str:
    """The ``[auth]`` XML fragment of p2p-channel / relay-channel bodies.

    ``randsalt`` None or empty omits ``<RandSalt>`` (a device without its own salt).
    """
    salt = f"<RandSalt>{_xml_escape(randsalt)}</RandSalt>" if randsalt else ""
    return (
        f"<CreateDate>{created}</CreateDate>"
        f"<DevAuth>{dev_auth(key, nonce, created, payload)}</DevAuth>"
        f"<Nonce>{nonce}</Nonce>{salt}"
        f"<UserName>{_xml_escape(user)}</UserName>"
    )


def encrypt_info(info: dict | str) -> str:
    """Encode a device Info JSON (dict or text) as the cloud's ``<Info>`` blob."""
    text = info if isinstance(info, str) else json.dumps(info)
    cipher = AES.new(INFO_KEY, AES.MODE_OFB, iv=INFO_IV)
    return base64.b64encode(cipher.encrypt(text.encode())).decode("ascii")


def decrypt_info(b64: str) -> dict:
    """Decode ``<Info>`` into its JSON object; empty input gives ``{}``."""
    if not b64.strip():
        return {}
    cipher = AES.new(INFO_KEY, AES.MODE_OFB, iv=INFO_IV)
    try:
        value = json.loads(cipher.decrypt(_b64decode(b64)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise P2PProtocolError("device Info does not decrypt to JSON") from exc
    if not isinstance(value, dict):
        raise P2PProtocolError("device Info is not a JSON object")
    return value


# ---------------------------------------------------------------------------
# Identify (PROTOCOLS 2.2 step 5)
# ---------------------------------------------------------------------------


def new_identify(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """Eight fresh random Identify bytes."""
    return rng(8)


def format_identify(ident: bytes, padded: bool = False) -> str:
    """Lowercase hex, space separated, without zero padding (``b"\\x00\\x1a"`` ->
    ``"0 1a"``) or, ``padded``, two digits each (``"00 1a"``)."""
    return " ".join(f"{b:02x}" if padded else f"{b:x}" for b in ident)


def parse_identify(text: str) -> bytes:
    """Inverse of :func:`format_identify`; raises :class:`P2PProtocolError`."""
    parts = text.split()
    if len(parts) != 8 or not all(re.fullmatch(r"[0-9a-fA-F]{1,2}", p) for p in parts):
        raise P2PProtocolError(f"bad Identify {text[:60]!r}")
    return bytes(int(p, 16) for p in parts)


# ---------------------------------------------------------------------------
# Hole punch: inverted STUN (PROTOCOLS 2.3)
# ---------------------------------------------------------------------------

STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101
ATTR_ADDRESS = 0x0004
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A

_STUN_HEADER = struct.Struct("!HH4s12s")


def _pack_address(value: tuple[str, int]) -> bytes:
    host, port = value
    parts = host.split(".")
    # int() alone would take " 1", "1_0" or other scripts' digits for an octet
    octets = [ascii_number(p, 3) for p in parts] if len(parts) == 4 else [None]
    if any(o is None or o > 255 for o in octets):
        raise ValueError(f"not an IPv4 address: {host!r}")
    packed = bytes(octets)  # type: ignore[arg-type]
    return struct.pack("!BBH", 0, 1, port) + packed


def _unpack_address(data: bytes) -> tuple[str, int]:
    if len(data) != 8 or data[1] != 1:
        raise P2PProtocolError("bad address attribute")
    port = struct.unpack("!H", data[2:4])[0]
    return ".".join(str(b) for b in data[4:8]), port


def _pack_tie(value: bytes) -> bytes:
    if len(value) != 8:
        raise ValueError("ICE-CONTROLLED/CONTROLLING value must be 8 bytes")
    return bytes(value)


def _unpack_tie(data: bytes) -> bytes:
    if len(data) != 8:
        raise P2PProtocolError("bad ICE-CONTROLLED/CONTROLLING attribute")
    return bytes(data)


#: Attribute table: type -> (name, pack, unpack). Unknown types stay raw bytes.
ATTRIBUTES: dict[int, tuple[str, Callable, Callable]] = {
    ATTR_ADDRESS: ("ADDRESS", _pack_address, _unpack_address),
    ATTR_ICE_CONTROLLED: ("ICE-CONTROLLED", _pack_tie, _unpack_tie),
    ATTR_ICE_CONTROLLING: ("ICE-CONTROLLING", _pack_tie, _unpack_tie),
}


@dataclass
class StunMessage:
    """A plain (not yet inverted) STUN message as used by the hole punch.

    ``cookie`` is 4 random bytes (not RFC 5389's magic cookie); ``attributes``
    maps attribute type to its decoded value, kept in insertion order.
    """

    msg_type: int
    cookie: bytes
    transaction_id: bytes
    attributes: dict[int, object] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Plain STUN bytes."""
        body = b""
        for attr_type, value in self.attributes.items():
            spec = ATTRIBUTES.get(attr_type)
            raw = spec[1](value) if spec else bytes(value)  # type: ignore[arg-type]
            body += struct.pack("!HH", attr_type, len(raw)) + raw
            body += b"\x00" * (-len(raw) % 4)
        return _STUN_HEADER.pack(self.msg_type, len(body), self.cookie, self.transaction_id) + body

    def to_wire(self) -> bytes:
        """Bytes as sent: every byte XOR 0xFF."""
        return _invert(self.to_bytes())

    @classmethod
    def parse(cls, data: bytes) -> StunMessage:
        """Parse plain STUN bytes; raises :class:`P2PProtocolError`."""
        data = bytes(data)
        if len(data) < _STUN_HEADER.size:
            raise P2PProtocolError("STUN message too short")
        msg_type, length, cookie, tid = _STUN_HEADER.unpack_from(data)
        if msg_type & 0xC000:
            raise P2PProtocolError("not a STUN message (top bits set)")
        if length % 4 or _STUN_HEADER.size + length != len(data):
            raise P2PProtocolError("STUN length does not match the datagram")
        attributes: dict[int, object] = {}
        pos = _STUN_HEADER.size
        while pos < len(data):
            if pos + 4 > len(data):
                raise P2PProtocolError("truncated STUN attribute header")
            attr_type, attr_len = struct.unpack_from("!HH", data, pos)
            pos += 4
            if pos + attr_len > len(data):
                raise P2PProtocolError("truncated STUN attribute")
            raw = data[pos : pos + attr_len]
            pos += attr_len + (-attr_len % 4)
            spec = ATTRIBUTES.get(attr_type)
            attributes.setdefault(attr_type, spec[2](raw) if spec else raw)
        return cls(msg_type, cookie, tid, attributes)

    @classmethod
    def from_wire(cls, data: bytes) -> StunMessage:
        """Parse an inverted (on-the-wire) punch datagram."""
        return cls.parse(_invert(data))


def _invert(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


def build_punch_request(
    identify: bytes,
    device_addr: tuple[str, int],
    *,
    cookie: bytes | None = None,
    transaction_id: bytes | None = None,
) -> StunMessage:
    """Client -> device Binding Request (ICE-CONTROLLING = Identify, device public address)."""
    return StunMessage(
        STUN_BINDING_REQUEST,
        cookie if cookie is not None else os.urandom(4),
        transaction_id if transaction_id is not None else os.urandom(12),
        {ATTR_ICE_CONTROLLING: identify, ATTR_ADDRESS: device_addr},
    )


def build_punch_response(
    identify: bytes, device_addr: tuple[str, int], cookie: bytes, transaction_id: bytes
) -> StunMessage:
    """Client -> device Binding Success (ICE-CONTROLLED = Identify, device local address)."""
    return StunMessage(
        STUN_BINDING_SUCCESS,
        cookie,
        transaction_id,
        {ATTR_ICE_CONTROLLED: identify, ATTR_ADDRESS: device_addr},
    )


def parse_punch(data: bytes) -> StunMessage:
    """Parse an on-the-wire (inverted) punch datagram; raises :class:`P2PProtocolError`."""
    return StunMessage.from_wire(data)


def looks_like_punch(data: bytes) -> bool:
    """Cheap check whether a datagram is an inverted STUN punch message."""
    try:
        parse_punch(data)
    except P2PProtocolError:
        return False
    return True


# ---------------------------------------------------------------------------
# CLI (offline utilities only: nothing here touches the network)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Command-line plumbing shared by every tool: svtool.py, rtsp_proxy.py,
# dh_p2p.py and ptcp.py (one exit-code table; value types that end a bad
# option in a one-line usage error and exit code 2; --password-file)
# ---------------------------------------------------------------------------

class ExitCode(IntEnum):
    """What a tool's exit status means."""

    OK = 0
    ERROR = 1  # anything not below, e.g. a local port that cannot be opened
    USAGE = 2  # bad arguments or missing credentials; nothing was tried
    UNREACHABLE = 3  # the DVR or device is unreachable, silent, offline or unknown (serial)
    LOGIN_REFUSED = 4  # the DVR or device refused the credentials, or wants some
    PROTOCOL = 5  # the DVR, device or cloud answered what the protocol does not allow
    CLOUD_UNREACHABLE = 6  # the Dahua cloud did not answer or refused the service
    WRONG_APP = 7  # the device is bound to another app's cloud identity than the one asked for
    INTERRUPTED = 130  # ^C before a one-shot command finished


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.ERROR: "other error",
    ExitCode.USAGE: "usage",
    ExitCode.UNREACHABLE: "DVR/device unreachable, offline or unknown",
    ExitCode.LOGIN_REFUSED: "login refused or credentials needed",
    ExitCode.PROTOCOL: "protocol error",
    ExitCode.CLOUD_UNREACHABLE: "cloud unreachable",
    ExitCode.WRONG_APP: "device bound to another app's cloud (dh_p2p --app)",
    ExitCode.INTERRUPTED: "interrupted",
}

EPILOG = "Exit codes: " + ", ".join(f"{int(code)} {text}" for code, text in MEANINGS.items()) + "."


MAX_SECONDS = 1_000_000.0  # about 11 days; longer is a typo, and overflows socket timeouts


class UsageError(ValueError):
    """A command-line value that cannot be used (the tools exit with code 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, then exit code 2."""

    def error(self, message: str) -> NoReturn:
        first = message.splitlines()[0] if message else "bad arguments"
        self.exit(2, f"{self.prog}: error: {first} (see --help)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SECONDS:.0f} seconds: {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0, at most MAX_SECONDS."""
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds, 0 to MAX_SECONDS."""
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _ascii_int(text: str) -> int | None:
    value = ascii_number(text[1:] if text[:1] == "-" else text, 20)
    return -value if value is not None and text[:1] == "-" else value


def integer_in(low: int, high: int, what: str = "number") -> Callable[[str], int]:
    """A type for an integer of ASCII digits from ``low`` to ``high``."""

    def parse(text: str) -> int:
        value = _ascii_int(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low}-{high}: {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


port_number = integer_in(1, 65535, "port")


def split_port(text: str, lowest: int = 1) -> int:
    """The port of a ``HOST:PORT`` value: ASCII digits, ``lowest``-65535."""
    value = _ascii_int(text)
    if value is None or not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be {lowest}-65535, not {text!r}")
    return value


def host_port(default_host: str, lowest_port: int = 1) -> Callable[[str], tuple[str, int]]:
    """A type for ``HOST:PORT`` or ``PORT`` (then on ``default_host``)."""

    def parse(text: str) -> tuple[str, int]:
        try:
            return split_host_port(text, default_host=default_host, lowest_port=lowest_port)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "HOST:PORT"
    return parse


def read_password_file(path: str) -> str:
    """The first line of ``path`` without its line end (a password kept out of ``ps``)."""
    try:
        with open(path, encoding="utf-8") as file:
            line = file.readline()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"cannot read the password file {path!r}: {reason}") from None
    return line.rstrip("\r\n")


def password_from(option: str | None, path: str | None, env_name: str = "") -> str | None:
    """The password of ``--password``, else of ``--password-file``, else of ``env_name``.

    Raises UsageError when both options are given or the file cannot be read.
    """
    if option is not None and path is not None:
        raise UsageError("give --password or --password-file, not both")
    if path is not None:
        return read_password_file(path)
    if option is not None or not env_name:
        return option
    return os.environ.get(env_name)


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.WARNING - 10 * verbose + 10 * quiet
    logging.basicConfig(level=max(logging.DEBUG, level), format="%(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Offline utilities: build a request, decode an Info blob, encrypt a LocalAddr."""
    parser = argparse.ArgumentParser(
        prog="helpers.py",
        description="Offline Dahua P2P signalling utilities (no network access).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    sub = parser.add_subparsers(dest="cmd", required=True)

    req = sub.add_parser("request", help="print a cloud request (DHGET/DHPOST, NFGET/NFPOST)")
    req.add_argument("path", help="request path, e.g. /probe/p2psrv")
    req.add_argument("--body", help="XML body (makes it a DHPOST)")
    req.add_argument("--cseq", type=int, default=1)
    req.add_argument("--app", choices=sorted(APP_PROFILES), default="smartpss", help="dialect")
    req.add_argument("--cloud-user", default=os.environ.get("DH_P2P_CLOUD_USER"))
    req.add_argument(
        "--cloud-key", help="cloud key (default: env DH_P2P_CLOUD_KEY or the built-in pair)"
    )

    info = sub.add_parser("info", help="decode an <Info> blob from /info/device")
    info.add_argument("blob")

    enc = sub.add_parser(
        "encrypt-addr",
        help="encrypt a LocalAddr as an auth-mode p2p-channel does "
        "(password from DH_P2P_PASSWORD; the key itself is never printed)",
    )
    enc.add_argument("-u", "--user", default=os.environ.get("DH_P2P_USERNAME", "admin"))
    enc.add_argument("--randsalt", default=None, help="the device's salt (default: the built-in)")
    enc.add_argument("--nonce", type=int, default=None, help="default: random below 2**31")
    enc.add_argument("local_addr", help="ip:port to encrypt")

    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)

    if args.cmd == "request":
        profile = APP_PROFILES[args.app]
        user = args.cloud_user or profile.cloud_user
        key_ = args.cloud_key or os.environ.get("DH_P2P_CLOUD_KEY") or profile.cloud_key
        request_id = new_request_id() if profile.sends_request_id(args.path) else None
        data = build_request(
            args.path,
            args.cseq,
            body=args.body,
            cloud_user=user,
            cloud_key=key_,
            profile=profile,
            request_id=request_id,
        )
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    if args.cmd == "info":
        try:
            print(json.dumps(decrypt_info(args.blob), sort_keys=True))
        except P2PProtocolError as exc:
            print(f"helpers.py: {exc}", file=sys.stderr)
            return 1
        return 0
    # encrypt-addr: the password comes from the environment, never the command line.
    password = os.environ.get("DH_P2P_PASSWORD")
    if not password:
        print("helpers.py: set DH_P2P_PASSWORD to the device password", file=sys.stderr)
        return 2
    nonce = args.nonce if args.nonce is not None else secrets.randbelow(2**31)
    dkey = device_key(args.user, password, args.randsalt)
    print(f"nonce={nonce} LocalAddr={encrypt_local_addr(dkey, nonce, args.local_addr)}")
    return 0


# ---------------------------------------------------------------------------
# Service mode: config files and the health endpoints (dh_p2p.py, rtsp_proxy.py)
# ---------------------------------------------------------------------------


class ConfigError(ValueError):
    """A service config file, or one entry of it, is wrong (the message says where)."""


def load_toml(path: str) -> dict:
    """Read a TOML file; raises ConfigError (unreadable, not TOML)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def health_change_note(started: str | None, in_file: str | None) -> str | None:
    """What a SIGHUP reload says when the file names another health address than
    the one serving (the endpoints stay where they are until a restart)."""
    if in_file == started:
        return None
    return (
        f"health {in_file or '(none)'} takes effect at the next start; "
        f"serving {started or 'no health endpoint'} until then"
    )


def parse_listen_address(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (then 127.0.0.1) -> (host, port); raises ConfigError."""
    if not isinstance(text, str | int) or isinstance(text, bool):
        raise ConfigError(f"{what} must be a string HOST:PORT or a port")
    try:
        return split_host_port(str(text), default_host="127.0.0.1")
    except ValueError:
        raise ConfigError(
            f"{what} must be HOST:PORT or PORT (1-65535), not {str(text)[:60]!r}"
        ) from None


def entry_password(entry: dict, where: str, environ: dict[str, str] | None = None) -> str | None:
    """The password of a config entry, from ``password_env`` (an environment variable's
    name) or ``password_file`` (a file whose first line it is); None when neither is
    given.  Raises ConfigError; the message never contains the password."""
    env = os.environ if environ is None else environ
    if "password" in entry:
        raise ConfigError(f"{where}: no inline password; use password_env or password_file")
    name, path = entry.get("password_env"), entry.get("password_file")
    if name is not None and path is not None:
        raise ConfigError(f"{where}: give password_env or password_file, not both")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: password_env must name an environment variable")
        if not env.get(name):
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return env[name]
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}: password_file must be a path")
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read password_file {path}: {exc}") from exc
        if not first:
            raise ConfigError(f"{where}: password_file {path} is empty")
        return first
    return None


def check_keys(entry: dict, allowed: Iterable[str], where: str) -> None:
    """Raise ConfigError naming the first key of ``entry`` not in ``allowed``."""
    known = set(allowed)
    for key in entry:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}")


def parse_service_file(
    data: dict,
    table: str,
    parse_entry: Callable[[object, str], object],
    claims: Callable[[object], Iterable[str]],
) -> tuple[str | None, list, dict[str, str]]:
    """The part of a service config both tools share: the top-level keys, ``health``,
    and the ``[[table]]`` entries, each turned into an object with a ``name`` by
    ``parse_entry(entry, where)``.  An entry that is wrong, or whose name or one of
    whose ``claims`` (local addresses) an earlier entry has, lands in the errors
    (name -> why) and the others are kept.  A wrong file raises ConfigError.
    Returns (health, objects, errors)."""
    check_keys(data, ("health", "device", "dvr"), "the file")
    health = data.get("health")
    if health is not None:
        parse_listen_address(health, "health")
        health = str(health)
    entries = data.get(table, [])
    if not isinstance(entries, list):
        raise ConfigError(f"{table} must be an array of tables ([[{table}]])")
    items: list = []
    errors: dict[str, str] = {}
    taken: dict[str, str] = {}
    for number, entry in enumerate(entries, 1):
        label = entry.get("name", entry.get("serial")) if isinstance(entry, dict) else None
        label = label if isinstance(label, str) and label else f"{table} {number}"
        where = f"{table} {label!r}"
        try:
            item = parse_entry(entry, where)
            if any(other.name == item.name for other in items):
                raise ConfigError(f"{where}: another {table} has this name")
            for claim in claims(item):
                if claim in taken:
                    raise ConfigError(f"{where}: {claim} is {taken[claim]!r}'s already")
        except ConfigError as exc:
            errors[label if label not in errors else f"{label} ({number})"] = str(exc)
            continue
        items.append(item)
        taken.update({claim: item.name for claim in claims(item)})
    return health, items, errors


@dataclass(frozen=True)
class Metric:
    """One Prometheus metric family: ``samples`` are (labels, value) pairs."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def metric_families(
    table: Iterable[tuple[str, str, str, str]], snapshots: dict[str, dict], label: str
) -> list[Metric]:
    """One Metric per ``(name, kind, help, key)`` row of ``table``, with a sample
    ``{label: unit}`` per unit of ``snapshots`` ({unit: {key: value}}) whose value
    is not None."""
    return [
        Metric(
            name,
            kind,
            text,
            [({label: unit}, float(snap[key])) for unit, snap in snapshots.items()
             if snap.get(key) is not None],
        )  # fmt: skip
        for name, kind, text, key in table
    ]


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value: float) -> str:
    if value != value:
        return "NaN"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render_metrics(metrics: Iterable[Metric]) -> str:
    """The Prometheus text exposition format (0.0.4), with # HELP and # TYPE lines."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            pairs = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            label_text = "{" + pairs + "}" if pairs else ""
            lines.append(f"{metric.name}{label_text} {_sample_value(value)}")
    return "\n".join(lines) + "\n"


class HealthSource:
    """What a service shows on its health endpoints; subclasses override these."""

    def alive(self) -> bool:
        """The process loop is alive (GET /livez)."""
        return True

    def not_ready(self) -> dict[str, str]:
        """Name -> why, for each always-up unit that is not up (GET /readyz)."""
        return {}

    def metrics(self) -> list[Metric]:
        """The metric families (GET /metrics)."""
        return []

    def status(self) -> dict:
        """Everything as JSON-ready values, no secrets (GET /status)."""
        return {}


def health_response(source: HealthSource, path: str) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) for a GET of ``path``; pure, no sockets."""
    route = path.split("?", 1)[0]
    as_json = "application/json"
    if route == "/livez":
        ok = source.alive()
        return (200, "text/plain", b"ok\n") if ok else (503, "text/plain", b"stalled\n")
    if route == "/readyz":
        missing = source.not_ready()
        body = json.dumps({"ready": not missing, "not_ready": missing}, sort_keys=True)
        return (503 if missing else 200), as_json, body.encode() + b"\n"
    if route == "/metrics":
        text = render_metrics(source.metrics())
        return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()
    if route == "/status":
        return 200, as_json, json.dumps(source.status(), sort_keys=True, indent=1).encode()
    return 404, "text/plain", b"not found: try /livez /readyz /metrics /status\n"


class HealthServer:
    """GET /livez, /readyz, /metrics and /status over HTTP, served by a thread."""

    def __init__(self, address: tuple[str, int], source: HealthSource) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                log.debug("health: %s", args[0] % args[1:] if len(args) > 1 else args)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                try:
                    status, ctype, body = health_response(source, self.path)
                except Exception:  # a bug in a source must not kill the server
                    log.exception("health endpoint %s failed", self.path)
                    status, ctype, body = 500, "text/plain", b"internal error\n"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(address, Handler)
        self._httpd.daemon_threads = True
        self.address: tuple[str, int] = self._httpd.server_address[:2]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="health", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


if __name__ == "__main__":
    sys.exit(main())
