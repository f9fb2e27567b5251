"""An emulated Samsung SmartViewer DVR: DCP service plus its faulty RTSP server.

``EmulatedDVR`` reproduces every fault listed in PROTOCOLS.md section 1.2
(silence on OPTIONS, NULs after replies, CSeq 0 / wrong CSeq, the unterminated
SETUP reply, ``text/parameters`` bodies, side-port fragments over TCP or UDP,
1000 Hz timestamps) and the box's strictness: a non-``live.NNN`` URL, a SETUP
or PLAY with other headers or another order, an unknown method or a pipelined
request is recorded in ``violations`` and the box stops answering, as the real
one deadlocks.  Ports: P (RTSP), P+1 (DCP, ``EmulatedDCP``), P+2 (side port).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Run as a script (``python tests/dvr_rtsp_emulator.py``) the repository root is not on
# sys.path, and dvr_emulator needs svtool from there.
_REPO_DIR = str(Path(__file__).resolve().parents[1])
if _REPO_DIR not in sys.path:
    sys.path.insert(0, _REPO_DIR)

from dvr_emulator import EmulatedDCP  # noqa: E402

log = logging.getLogger("dvr_rtsp_emulator")

SETUP_HEADERS = ["CSeq", "Transport", "Authorization"]
PLAY_HEADERS = ["CSeq", "Session", "Range", "Speed", "Bandwidth", "Authorization"]
DESCRIBE_ALLOWED = {"cseq", "accept", "authorization"}
_URL_RE = re.compile(r"^rtsp://[^/\s]+/live\.(\d{3})$")


# ==========================================================================
# Wire format: H.264 access units and Samsung side-port fragments
# ==========================================================================


def split_nal_units(data: bytes) -> list[bytes]:
    """NAL units of an Annex-B byte stream (start codes removed)."""
    starts = [m.end() for m in re.finditer(b"\x00\x00\x01", data)]
    nals = []
    for i, start in enumerate(starts):
        end = starts[i + 1] - 3 if i + 1 < len(starts) else len(data)
        nal = data[start:end].rstrip(b"\x00")
        if nal:
            nals.append(nal)
    return nals


def access_units(data: bytes) -> list[list[bytes]]:
    """Group an Annex-B stream's NAL units into frames (single-slice streams)."""
    units: list[list[bytes]] = []
    current: list[bytes] = []
    has_vcl = False
    for nal in split_nal_units(data):
        kind = nal[0] & 0x1F
        vcl = kind in (1, 5)
        first_slice = vcl and len(nal) > 1 and nal[1] & 0x80  # first_mb_in_slice == 0
        if has_vcl and (not vcl or first_slice):
            units.append(current)
            current, has_vcl = [], False
        current.append(nal)
        has_vcl = has_vcl or vcl
    if current and has_vcl:
        units.append(current)
    return units


def frame_payload(nals: list[bytes]) -> bytes:
    """A lone NAL unit goes bare (as in vectors.json); several go as Annex-B."""
    if len(nals) == 1:
        return nals[0]
    return b"".join(b"\x00\x00\x00\x01" + nal for nal in nals)


def build_fragments(
    payload: bytes, seq: int, timestamp: int, ssrc: int, size: int, pt: int = 96
) -> list[bytes]:
    """Samsung side-port fragments of one frame (PROTOCOLS 1.2, vectors samsung_rtp)."""
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        marker = 0x80 if i == len(chunks) - 1 else 0
        head = struct.pack("!BBHII", 0x90, marker | pt, (seq + i) & 0xFFFF, timestamp, ssrc)
        ext = b"\xab\xac\x00\x02" + struct.pack("<I", len(chunk)) + b"\x00\x00\x00\x00"
        out.append(head + ext + chunk)
    return out


def dvr_describe_body(mode: str, channel: int) -> bytes:
    """The DVR's SDP dialect (``text/parameters``): no rtpmap, no control."""
    proto = "TCP RTP/AVP" if mode == "tcp" else "RTP/AVP"
    lines = [
        "v=0",
        "o=- 1 1 IN IP4 127.0.0.1",
        f"s=SmartViewer channel {channel}",
        "c=IN IP4 127.0.0.1",
        "t=0 0",
        f"m=video 0 {proto} 96 H.264",
        "a=framerate:25",
        "m=audio 0 RTP/AVP 4 G.723",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


# Test patterns for the DVR to stream: lavfi sources and extra x264 options.
PATTERN_SMALL = ("testsrc2=size=640x360:rate=25", [])
# Noise at a high quality makes every keyframe larger than 65,535 bytes.
PATTERN_BIG = ("testsrc2=size=640x360:rate=25,noise=alls=40:allf=u", ["-crf", "14"])


def encode_test_h264(
    path: Path, big: bool = False, *, ffmpeg: str = "ffmpeg", seconds: float = 4.0
) -> bytes:
    """Write and return an Annex-B H.264 test pattern: 640x360, 25 fps, GOP 25, no B-frames.

    ``big`` gives a noisy stream whose keyframes exceed 65,535 bytes.  Raises
    ``subprocess.CalledProcessError`` if ffmpeg fails.
    """
    source, extra = PATTERN_BIG if big else PATTERN_SMALL
    argv = [
        ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-t", str(seconds),
        "-c:v", "libx264", "-profile:v", "main", "-bf", "0", "-pix_fmt", "yuv420p",
        "-x264-params", "keyint=25:min-keyint=25:scenecut=0", *extra,
        "-bsf:v", "h264_mp4toannexb", "-f", "h264", str(path),
    ]  # fmt: skip
    subprocess.run(argv, check=True, timeout=120)
    return Path(path).read_bytes()


def parse_request(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "RTSP/1.0":
        raise ValueError(f"bad request line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(": ")
        if not sep:
            raise ValueError(f"bad header line {line!r}")
        headers.append((name, value))
    return parts[0], parts[1], headers


# ==========================================================================
# Driver: threads and sockets
# ==========================================================================


class _Session:
    def __init__(self, sid: str, channel: int, mode: str, client_port: int, token: str) -> None:
        self.sid = sid
        self.channel = channel
        self.mode = mode
        self.client_port = client_port
        self.token = token
        self.side_conn: socket.socket | None = None
        self.udp_addr: tuple[str, int] | None = None
        self.playing = False
        self.closed = threading.Event()
        self.streamer: threading.Thread | None = None


class EmulatedDVR:
    """A whole DVR on 127.0.0.1: RTSP on ``rtsp_port``, DCP on +1, side port on +2."""

    def __init__(
        self,
        mode: str = "tcp",
        users: dict[str, str] | None = None,
        *,
        h264: bytes,
        fps: float = 25.0,
        clock: int = 1000,
        fragment_size: int = 1200,
        host: str = "127.0.0.1",
        parameter_sets: str = "every",
        garbage_after: int | None = None,
        port: int = 0,
    ) -> None:
        if mode not in ("tcp", "udp"):
            raise ValueError("mode is tcp or udp")
        self.mode = mode
        self.users = users if users is not None else {"admin": "4321"}
        units = access_units(h264)
        self.frames = [frame_payload(au) for au in units]
        # parameter_sets="first": SPS/PPS only in a stream's first frame (late joiners need a cache)
        self.bare_frames = [
            frame_payload([n for n in au if n[0] & 0x1F not in (7, 8)]) for au in units
        ]
        self.parameter_sets = parameter_sets
        self.garbage_after = garbage_after  # frames, then bytes that are no fragment
        if not self.frames:
            raise ValueError("no H.264 frames in the input")
        self.fps = fps
        self.clock = clock
        self.fragment_size = fragment_size
        self.host = host
        self.port = port  # 0: any free triple P, P+1, P+2
        self.rtsp_port = 0
        self.dcp: EmulatedDCP | None = None
        self.rtsp_sessions_started = 0
        self.plays = 0
        self.frames_sent = 0
        self.dead = False
        self.tokens_seen: set[str] = set()  # so tests can check that no log shows one
        self.requests: list[tuple[str, str]] = []  # (method, URL) of every RTSP request
        self._violations: list[str] = []
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._side: socket.socket | None = None

    # ---- public
    @property
    def dcp_port(self) -> int:
        return self.rtsp_port + 1

    @property
    def side_port(self) -> int:
        return self.rtsp_port + 2

    @property
    def violations(self) -> list[str]:
        dcp = list(self.dcp.violations) if self.dcp is not None else []
        with self._lock:
            return list(self._violations) + dcp

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if not s.closed.is_set())

    @property
    def address(self) -> str:
        """``host:port`` of the RTSP service, as the proxy's REMOTE argument."""
        return f"{self.host}:{self.rtsp_port}"

    def __enter__(self) -> EmulatedDVR:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _violation(self, text: str, fatal: bool = True) -> None:
        log.error("DVR violation: %s", text)
        with self._lock:
            self._violations.append(text)
            if fatal:
                self.dead = True

    # ---- lifecycle
    def start(self) -> None:
        for _ in range(50 if self.port == 0 else 1):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((self.host, self.port))
            except OSError:
                listener.close()
                continue
            port = listener.getsockname()[1]
            side_type = socket.SOCK_STREAM if self.mode == "tcp" else socket.SOCK_DGRAM
            side = socket.socket(socket.AF_INET, side_type)
            if self.mode == "tcp":
                side.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            dcp = EmulatedDCP(self.users, host=self.host, port=port + 1)
            try:
                if port + 2 > 65535:
                    raise OSError("port range")
                side.bind((self.host, port + 2))
                dcp.start()
            except OSError:
                listener.close()
                side.close()
                continue
            break
        else:
            if self.port:
                raise OSError(f"ports {self.port}..{self.port + 2} are not all free")
            raise OSError("no free port triple for the emulated DVR")
        listener.listen(32)
        if self.mode == "tcp":
            side.listen(32)
        self._listener, self._side, self.dcp, self.rtsp_port = listener, side, dcp, port
        self._spawn(self._accept_rtsp, "dvr-rtsp-accept")
        self._spawn(self._side_loop, "dvr-side")

    def stop(self) -> None:
        self._stopping.set()
        for sock in (self._listener, self._side):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self._close_all()
        if self.dcp is not None:
            self.dcp.stop()
        for thread in self._threads:
            thread.join(5)

    def reboot(self) -> None:
        """Like a power cycle: DCP tokens die and every RTSP/side connection is closed."""
        if self.dcp is not None:
            self.dcp.drop_connections()
        self._close_all()
        self.dead = False

    def _close_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
            sessions = list(self._sessions.values())
        for session in sessions:
            session.closed.set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _spawn(self, target, name: str, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    # ---- RTSP
    def _accept_rtsp(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve_rtsp, "dvr-rtsp-conn", conn)

    def _serve_rtsp(self, conn: socket.socket) -> None:
        buf = b""
        owned: list[_Session] = []
        try:
            while not self._stopping.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    if buf:
                        self._violation("pipelined request (sent before the reply)")
                    if self.dead:
                        continue
                    reply = self._handle(head, owned)
                    if reply and not self.dead:
                        conn.sendall(reply)
        finally:
            for session in owned:
                session.closed.set()
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, head: bytes, owned: list[_Session]) -> bytes | None:
        try:
            method, url, headers = parse_request(head)
        except (ValueError, UnicodeDecodeError) as exc:
            self._violation(f"malformed request: {exc}")
            return None
        with self._lock:
            self.requests.append((method, url))
        names = [name for name, _ in headers]
        values = dict(headers)
        match = _URL_RE.match(url)
        if method == "OPTIONS":
            self._violation("OPTIONS sent: the DVR never answers it", fatal=False)
            return None
        if match is None:
            self._violation(f"URL not ending in live.NNN: {url!r}")
            return None
        if method not in ("DESCRIBE", "SETUP", "PLAY"):
            self._violation(f"method {method} sent to the DVR")
            return None
        cseq = values.get("CSeq", "")
        if not cseq.isdigit() or names[:1] != ["CSeq"]:
            self._violation(f"{method} without CSeq first: {names}")
            return None
        token = values.get("Authorization", "")
        token_ok = self.dcp is not None and self.dcp.is_token_valid(token)
        if token_ok:
            with self._lock:
                self.tokens_seen.add(token)
        channel = int(match.group(1))
        if method == "DESCRIBE":
            extra = [n for n in names if n.lower() not in DESCRIBE_ALLOWED]
            if extra:
                self._violation(f"DESCRIBE with headers {extra}", fatal=False)
            if not token_ok:
                return b"RTSP/1.0 401 Unauthorized\r\nCSeq: 0\r\n\r\n\x00\x00"
            body = dvr_describe_body(self.mode, channel)
            # PROTOCOLS 1.2: CSeq 0 and trailing NULs
            return (
                b"RTSP/1.0 200 OK\r\nCSeq: 0\r\nContent-Type: text/parameters\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
                + b"\x00\x00\x00"
            )
        if method == "SETUP":
            if names != SETUP_HEADERS:
                self._violation(f"SETUP headers {names} (the DVR deadlocks)")
                return None
            transport = values["Transport"]
            if self.mode == "tcp":
                ok = transport == "RTP/AVP/TCP;unicast"
                client_port = 0
            else:
                tm = re.fullmatch(r"RTP/AVP/UDP;unicast;client_port=(\d+)", transport)
                ok = tm is not None
                client_port = int(tm.group(1)) if tm else 0
            if not ok:
                self._violation(f"SETUP transport {transport!r} in {self.mode} mode")
                return None
            if not token_ok:
                return f"RTSP/1.0 401 Unauthorized\r\nCSeq: {cseq}\r\n\r\n\x00".encode()
            sid = secrets.token_hex(4).upper()
            session = _Session(sid, channel, self.mode, client_port, token)
            with self._lock:
                self._sessions[sid] = session
                self.rtsp_sessions_started += 1
            owned.append(session)
            proto = "RTP/AVP/TCP" if self.mode == "tcp" else "RTP/AVP/UDP"
            ports = "" if self.mode == "tcp" else f"client_port={client_port};"
            # PROTOCOLS 1.2: wrong CSeq, no blank line after Transport, then NULs
            return (
                f"RTSP/1.0 200 OK\r\nCSeq: {int(cseq) + 1}\r\nSession: {sid};timeout=60\r\n"
                f"Transport: {proto};unicast;{ports}server_port={self.side_port}\r\n\x00"
            ).encode()
        # PLAY
        if names != PLAY_HEADERS:
            self._violation(f"PLAY headers {names} (the DVR deadlocks)")
            return None
        expected = {"Range": "npt=0.000-", "Speed": "+1.0", "Bandwidth": "2048"}
        if any(values[k] != v for k, v in expected.items()):
            self._violation(f"PLAY header values {values}")
            return None
        with self._lock:
            session = self._sessions.get(values["Session"])
        if session is None or session not in owned:
            return f"RTSP/1.0 454 Session Not Found\r\nCSeq: {cseq}\r\n\r\n\x00".encode()
        if not token_ok:
            return f"RTSP/1.0 401 Unauthorized\r\nCSeq: {cseq}\r\n\r\n\x00".encode()
        with self._lock:
            self.plays += 1
            session.playing = True
        self._maybe_stream(session)
        return f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nSession: {session.sid}\r\n\r\n\x00\x00".encode()

    # ---- side port
    def _side_loop(self) -> None:
        assert self._side is not None
        side = self._side
        while not self._stopping.is_set():
            try:
                if self.mode == "tcp":
                    conn, _ = side.accept()
                    self._spawn(self._side_hello, "dvr-side-hello", conn)
                else:
                    data, addr = side.recvfrom(65536)
                    if self._stopping.is_set():
                        return
                    self._udp_hello(data, addr)
            except OSError:
                return

    def _side_hello(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        try:
            while b"\x00" not in data and len(data) < 200:
                chunk = conn.recv(200)
                if not chunk:
                    conn.close()
                    return
                data += chunk
        except OSError:
            conn.close()
            return
        line, _, rest = data.partition(b"\x00")
        m = re.fullmatch(rb"Session: ([0-9A-F]+);timeout=60", line)
        with self._lock:
            session = self._sessions.get(m.group(1).decode()) if m else None
        if session is None or rest:
            self._violation(f"side-port hello {data!r}", fatal=False)
            conn.close()
            return
        with self._lock:
            self._conns.add(conn)
        session.side_conn = conn
        self._maybe_stream(session)

    def _udp_hello(self, data: bytes, addr: tuple[str, int]) -> None:
        if data != b"\x00":
            self._violation(f"side-port datagram {data[:20]!r}", fatal=False)
            return
        with self._lock:
            matches = [
                s for s in self._sessions.values() if s.client_port == addr[1] and not s.udp_addr
            ]
        if not matches:
            return  # a repeated hello is harmless
        matches[0].udp_addr = addr
        self._maybe_stream(matches[0])

    def _maybe_stream(self, session: _Session) -> None:
        with self._lock:
            ready = session.playing and (session.side_conn or session.udp_addr)
            if not ready or session.streamer is not None:
                return
            session.streamer = self._spawn(self._stream, "dvr-stream", session)

    def _frames(self) -> Iterator[tuple[int, bytes]]:
        index = 0
        while True:
            bare = self.parameter_sets == "first" and index > 0
            yield index, (self.bare_frames if bare else self.frames)[index % len(self.frames)]
            index += 1

    def _stream(self, session: _Session) -> None:
        ssrc = secrets.randbits(32)
        seq = secrets.randbits(16)
        ts0 = secrets.randbits(31)
        start = time.monotonic()
        step = 1.0 / self.fps
        ticks = self.clock / self.fps
        try:
            for index, payload in self._frames():
                if session.closed.is_set() or self._stopping.is_set() or self.dead:
                    return
                if index % 25 == 0 and not self.dcp.is_token_valid(session.token):
                    return  # the token died with its DCP connection
                ts = (ts0 + int(index * ticks)) & 0xFFFFFFFF
                fragments = build_fragments(payload, seq, ts, ssrc, self.fragment_size)
                if index == self.garbage_after:
                    fragments.insert(0, b"\x00" * 32)  # out of step
                seq = (seq + len(fragments)) & 0xFFFF
                if session.mode == "tcp":
                    session.side_conn.sendall(b"".join(fragments))
                else:
                    if index % 50 == 0:
                        self._side.sendto(b"\x00", session.udp_addr)
                    for i, fragment in enumerate(fragments):
                        self._side.sendto(fragment, session.udp_addr)
                        if i % 64 == 63:
                            time.sleep(0.001)  # pacing a burst, as a 100 Mbit/s link would
                with self._lock:
                    self.frames_sent += 1
                delay = start + (index + 1) * step - time.monotonic()
                if delay > 0 and session.closed.wait(delay):
                    return
        except OSError:
            return
        finally:
            session.closed.set()
            if session.side_conn is not None:
                try:
                    session.side_conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                session.side_conn.close()


# ==========================================================================
# Command line: an emulated DVR to try the proxy without hardware
# ==========================================================================


class _ViolationCounter(logging.Handler):
    """Counts the violations the DVR and its DCP service log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "violation" in record.getMessage():
            self.count += 1


def main(argv: list[str] | None = None) -> int:
    """Serve an emulated DVR on 127.0.0.1 until SIGINT/SIGTERM.

    Exit codes: 0 stopped by a signal, 1 could not start (ports taken, ffmpeg
    missing or failing, unreadable --h264 file), 2 usage error.
    """
    parser = argparse.ArgumentParser(
        prog="dvr_rtsp_emulator.py",
        description="Run an emulated Samsung SmartViewer DVR (RTSP on PORT, DCP on PORT+1, "
        "side port on PORT+2) on 127.0.0.1, streaming an H.264 test pattern made with ffmpeg. "
        "Every protocol violation a client commits is logged to stderr as it happens.",
        epilog="Try the proxy without hardware: dvr_rtsp_emulator.py --port 10554, then "
        "SV_USER=admin SV_PASS=4321 rtsp_proxy.py 127.0.0.1:8554 127.0.0.1:10554, then "
        "ffprobe rtsp://127.0.0.1:8554/live.000",
    )
    parser.add_argument(
        "--mode", choices=("tcp", "udp"), default="tcp", help="side-port transport (tcp)"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="RTSP port; PORT+1 and PORT+2 must be free too "
        "(default: any free triple)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument(
        "--user", default=os.environ.get("SV_USER", "admin"), help="login (SV_USER, admin)"
    )
    parser.add_argument(
        "--password",
        default=os.environ.get("SV_PASS", "4321"),
        help="password (better: environment SV_PASS; default 4321)",
    )
    parser.add_argument(
        "--big-keyframes",
        action="store_true",
        help="stream a noisy pattern whose keyframes exceed 65,535 bytes",
    )
    parser.add_argument("--h264", type=Path, help="stream this Annex-B H.264 file instead")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="violations and errors only")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65533:
        parser.error("--port must be 0..65533")

    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Violations stay visible under -q (the DCP side logs them at INFO).
    loggers = [logging.getLogger(name) for name in ("dvr_emulator.dcp", "dvr_rtsp_emulator")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(min(level, logging.INFO))
    counter = _ViolationCounter()
    logging.getLogger().addHandler(counter)

    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    dvr: EmulatedDVR | None = None
    try:
        if args.h264 is not None:
            h264 = args.h264.read_bytes()
        else:
            ffmpeg = shutil.which("ffmpeg")
            if ffmpeg is None:
                log.error("ffmpeg is needed to make the test pattern (or give --h264 FILE)")
                return 1
            with tempfile.TemporaryDirectory(prefix="dvr-emulator-") as tmp:
                h264 = encode_test_h264(Path(tmp) / "pattern.h264", args.big_keyframes,
                                        ffmpeg=ffmpeg)  # fmt: skip
        dvr = EmulatedDVR(
            args.mode, {args.user: args.password}, h264=h264, host=args.host, port=args.port
        )
        dvr.start()
        if not stop.is_set():
            print(
                f"emulated DVR: rtsp://{dvr.host}:{dvr.rtsp_port}/ (DCP {dvr.dcp_port}, "
                f"side port {dvr.side_port}, mode {args.mode}, "
                f"login {args.user}/{args.password})",
                flush=True,
            )
            stop.wait()
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.error("cannot start the emulated DVR: %s", exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dvr is not None:
            dvr.stop()
            if dvr.rtsp_port:
                log.info("stopped after %d frames, %d violations", dvr.frames_sent, counter.count)
        logging.getLogger().removeHandler(counter)
        for logger, old_level in zip(loggers, levels, strict=True):
            logger.setLevel(old_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
