"""Support for the dh_p2p tests: device-side services and a dh_p2p.py launcher."""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _ptcp_support import TcpService

REPO = Path(__file__).resolve().parents[1]
DH_P2P = str(REPO / "dh_p2p.py")

CHANNEL_TITLES = ["Front door", "Garage"]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class DigestHTTPServer:
    """A Dahua-like HTTP API on loopback with digest authentication (RFC 2617, qop=auth)."""

    realm = "Login to EMU0123456789"

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.nonces: set[str] = set()
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                outer.paths.append(self.path)
                if not outer.authorized(self.headers.get("Authorization", ""), self.path):
                    nonce = secrets.token_hex(16)
                    outer.nonces.add(nonce)
                    self.send_response(401)
                    self.send_header(
                        "WWW-Authenticate",
                        f'Digest realm="{outer.realm}", qop="auth", nonce="{nonce}", '
                        f'opaque="{secrets.token_hex(8)}"',
                    )
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = outer.answer(self.path)
                if body is None:
                    self.send_response(400)
                    body = b"Error\r\nBad Request!\r\n"
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "text/plain;charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def authorized(self, header: str, uri: str) -> bool:
        if not header.startswith("Digest "):
            return False
        pairs = re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]*))', header[7:])
        fields = {key: quoted or bare for key, quoted, bare in pairs}
        if fields.get("username") != self.user or fields.get("nonce") not in self.nonces:
            return False
        if fields.get("uri") != uri:
            return False
        ha1 = _md5(f"{self.user}:{self.realm}:{self.password}")
        ha2 = _md5(f"GET:{uri}")
        expected = _md5(
            f"{ha1}:{fields['nonce']}:{fields.get('nc', '')}:{fields.get('cnonce', '')}:"
            f"{fields.get('qop', '')}:{ha2}"
        )
        return secrets.compare_digest(expected, fields.get("response", ""))

    @staticmethod
    def answer(path: str) -> bytes | None:
        if path == "/cgi-bin/configManager.cgi?action=getConfig&name=ChannelTitle":
            lines = [f"table.ChannelTitle[{i}].Name={t}" for i, t in enumerate(CHANNEL_TITLES)]
            return ("\r\n".join(lines) + "\r\n").encode()
        if path == "/cgi-bin/magicBox.cgi?action=getDeviceType":
            return b"type=DH-EMU-2CH\r\n"
        if path == "/cgi-bin/magicBox.cgi?action=getSystemInfo":
            return b"deviceType=DH-EMU-2CH\r\nserialNumber=EMU0123456789\r\n"
        return None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class PatternServer(TcpService):
    """Sends ``size`` bytes of a seeded pseudo-random stream to each client, then closes."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self.data = pattern(size, seed)
        super().__init__()

    def serve(self, conn: socket.socket) -> str:
        conn.sendall(self.data)
        return f"sent {len(self.data)}"


def pattern(size: int, seed: int = 7) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


def dh_p2p_argv(cloud_port: int, serial: str, *args: str) -> list[str]:
    """argv for dh_p2p.py against the emulator (never the real cloud): when an
    emulator serves ``cloud_port``, both of its main servers (SmartPSS and DMSS)."""
    from p2p_emulator import RUNNING

    emu = RUNNING.get(cloud_port)
    clouds = ["--cloud", f"127.0.0.1:{cloud_port}"]
    if emu is not None:
        clouds = ["--cloud", f"smartpss=127.0.0.1:{cloud_port}"]
        clouds += ["--cloud", f"dmss=127.0.0.1:{emu.dmss_port}"]
    return [sys.executable, DH_P2P, *clouds, *args, serial]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read ``size`` bytes (or fewer if the peer closes)."""
    chunks = []
    got = 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@contextmanager
def closing_all(*things: object) -> Iterator[None]:
    """Close every object with a close() method on exit."""
    try:
        yield
    finally:
        for thing in things:
            close = getattr(thing, "close", None)
            if close is not None:
                close()
