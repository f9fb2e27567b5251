"""Support for tests/test_dissector.py: a synthetic tunnel session and a tshark runner.

The session is built from the byte-exact packets of tests/data/vectors.json plus
plausible packets around them (PROTOCOLS.md section 2), with our own small PTCP
builder so the tests do not depend on ptcp.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from pcap import Addr, Datagram

REPO = Path(__file__).resolve().parents[1]
DISSECTOR = REPO / "dh-p2p.lua"

# Options every run uses: try heuristics before port-based dissectors, so a random
# ephemeral port that happens to be registered for something else cannot steal packets.
TSHARK_OPTS = ["-o", "udp.try_heuristic_first:TRUE"]


@dataclass
class TsharkResult:
    returncode: int
    raw_stdout: bytes
    stderr: str

    @property
    def stdout(self) -> str:
        return self.raw_stdout.decode("utf-8", errors="replace")

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stdout.splitlines() if ln.strip()]


def tshark(
    capture: Path, *args: str, two_pass: bool = False, timeout: float = 120
) -> TsharkResult:
    """Run tshark with our dissector over ``capture``."""
    exe = shutil.which("tshark")
    if exe is None:
        raise FileNotFoundError("tshark")
    argv = [exe, "-n", "-X", f"lua_script:{DISSECTOR}", *TSHARK_OPTS, "-r", str(capture)]
    if two_pass:
        argv.append("-2")
    argv += list(args)
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    return TsharkResult(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def fields(
    capture: Path,
    display_filter: str | None,
    *names: str,
    extra: list[str] | None = None,
    **kw,
) -> list[list[str]]:
    """Rows of ``-T fields`` output (one row per matching frame, ``|`` separated)."""
    args = list(extra or [])
    args += ["-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"]
    for n in names:
        args += ["-e", n]
    if display_filter:
        args += ["-Y", display_filter]
    res = tshark(capture, *args, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"tshark failed ({res.returncode}): {res.stderr}")
    return [ln.split("|") for ln in res.stdout.splitlines() if ln.strip()]


@dataclass
class PtcpPacket:
    """One PTCP packet as dissected: a whole datagram, or one packet of a GSO batch."""

    frame: int
    index: int  # 1-based place in its frame
    src_port: int  # the UDP source port of its frame
    raw: bytes  # the packet's bytes
    payload_len: int  # the UDP payload of its frame
    offset: int  # where it starts in that payload
    fields: dict[str, list[str]]  # ptcp.* values shown in its subtree
    after: list[str]  # protocols dissected from it (until the next PTCP packet)
    sub: dict[str, list[str]]  # their field values

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None


def ptcp_packets(
    capture: Path, display_filter: str | None = None, *, two_pass: bool = False
) -> list[PtcpPacket]:
    """Every PTCP packet in the frames matching ``display_filter``, from ``-T pdml``.

    Sub-dissectors add their trees after the PTCP subtree of the packet whose data they
    decode, so a packet's ``after`` names what its realm data was handed to.
    """
    args = ["-T", "pdml"] + (["-Y", display_filter] if display_filter else [])
    res = tshark(capture, *args, two_pass=two_pass)
    if res.returncode != 0:
        raise RuntimeError(f"tshark failed ({res.returncode}): {res.stderr}")
    out: list[PtcpPacket] = []
    for packet in ET.fromstring(res.raw_stdout).iter("packet"):
        frame = payload = None
        payload_pos = src_port = 0
        current: PtcpPacket | None = None
        index = 0
        for proto in packet.findall("proto"):
            name = proto.get("name", "")
            if name == "frame":
                frame = int(proto.find("field[@name='frame.number']").get("show"))
            elif name == "udp" and payload is None:
                payload_pos = int(proto.get("pos")) + 8
                src_port = int(proto.find("field[@name='udp.srcport']").get("show"))
                field_ = proto.find("field[@name='udp.payload']")
                payload = bytes.fromhex(field_.get("value")) if field_ is not None else b""
            elif name == "ptcp":
                index += 1
                start = int(proto.get("pos")) - payload_pos
                values: dict[str, list[str]] = {}
                for f in proto.iter("field"):
                    if f.get("name", "").startswith("ptcp."):
                        values.setdefault(f.get("name"), []).append(f.get("show", ""))
                current = PtcpPacket(
                    frame or 0, index, src_port, payload[start : start + int(proto.get("size"))],
                    len(payload), start, values, [], {},
                )
                out.append(current)
            elif current is not None and name != "fake-field-wrapper":
                current.after.append(name)
                for f in proto.iter("field"):
                    current.sub.setdefault(f.get("name", ""), []).append(f.get("show", ""))
    return out


# --------------------------------------------------------------------------- PTCP builder


def ptcp_header(sent: int, recv: int, pid: int, lmid: int, rmid: int) -> bytes:
    return b"PTCP" + struct.pack(">IIIII", sent, recv, pid, lmid, rmid)


def data_body(realm: int, data: bytes) -> bytes:
    return struct.pack(">II", 0x10000000 | len(data), realm) + b"\x00" * 4 + data


def bind_body(realm: int, port: int, length_field: int = 0) -> bytes:
    """A bind; the official app puts 8 in its length field, older tools 0 (PROTOCOLS 2.7 (a))."""
    return struct.pack(">IIII", 0x11000000 | length_field, realm, 0, port) + bytes([127, 0, 0, 1])


def status_body(realm: int, status: bytes) -> bytes:
    return struct.pack(">III", 0x12000000, realm, 0) + status


HEARTBEAT_BODY = b"\x13" + b"\x00" * 11
SYN_BODY = b"\x00\x03\x01\x00"


@dataclass
class PtcpSide:
    """Counters of one side of a PTCP session (PROTOCOLS 2.5), for building packets."""

    sent: int = 0
    recv: int = 0
    lmid: int = 0
    rmid: int = 0
    nonempty: int = 0

    def packet(self, body: bytes, peer: PtcpSide) -> bytes:
        if body == SYN_BODY:
            pid = 0x0002FFFF
        elif body:
            pid = (0xFFFF - self.nonempty) & 0xFFFF
            self.nonempty += 1
        else:
            pid = 0xFFFF
        pkt = ptcp_header(self.sent, self.recv, pid, self.lmid, self.rmid) + body
        self.sent += len(body)
        self.lmid += 1
        peer.recv += len(body)
        peer.rmid = self.lmid - 1
        return pkt


# Linux UDP GSO (udp(7) UDP_SEGMENT): one send of up to 64 datagrams of one size, the
# last possibly shorter, at most 65507 bytes in all. A capture on the sending host shows
# the whole run as one datagram.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65507
CHUNK = 1280  # data bytes per full data packet, as the official app and ptcp.py split


def gso_batch(packets: list[bytes]) -> bytes:
    """The payload a capture on the sender shows for one GSO send of ``packets``."""
    size = len(packets[0]) if packets else 0
    if not 2 <= len(packets) <= GSO_MAX_SEGMENTS:
        raise ValueError(f"a GSO batch has 2..{GSO_MAX_SEGMENTS} packets, not {len(packets)}")
    if any(len(p) != size for p in packets[:-1]) or not 0 < len(packets[-1]) <= size:
        raise ValueError("GSO segments have one size, the last one may be shorter")
    payload = b"".join(packets)
    if len(payload) > GSO_MAX_BYTES:
        raise ValueError("GSO batch larger than one UDP datagram")
    return payload


@dataclass
class RtpStream:
    """Interleaved RTP frames (channel 0) of one realm, numbered from ``seq``.

    Records where each frame ends in the realm's byte stream, so a test knows in which
    capture frame each RTP packet completes.
    """

    seq: int
    data: bytearray = field(default_factory=bytearray)
    ends: list[tuple[int, int]] = field(default_factory=list)  # (end offset, RTP seq)
    taken: int = 0

    def add(self, *payload_lens: int) -> None:
        for n in payload_lens:
            self.data += interleaved(0, rtp_packet(self.seq, n))
            self.ends.append((len(self.data), self.seq))
            self.seq += 1

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes of the stream (fewer at its end)."""
        out = bytes(self.data[self.taken : self.taken + n])
        self.taken += len(out)
        return out

    def completed(self, start: int, stop: int) -> list[int]:
        """RTP sequence numbers of the frames whose last byte is in ``[start, stop)``."""
        return [seq for end, seq in self.ends if start < end <= stop]


@dataclass
class Session:
    """A synthetic capture: the datagrams and the frame numbers of notable packets."""

    datagrams: list[Datagram] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)
    tunnel_ports: set[int] = field(default_factory=set)
    # Frames that are GSO batches: frame number -> the PTCP packets in it.
    batches: dict[int, list[bytes]] = field(default_factory=dict)
    # RTP sequence numbers each packet (frame, index in frame) of the GSO part of the
    # session completes, in order.
    gso_rtp: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    clock: float = 1767323045.0

    def add(
        self, src: Addr, dst: Addr, payload: bytes, mark: str = "", pause: float = 0.0
    ) -> int:
        """Append a datagram 10 ms (plus ``pause`` seconds) after the previous one."""
        self.clock += 0.01 + pause
        self.datagrams.append(Datagram(self.clock, src, dst, payload))
        number = len(self.datagrams)
        if mark:
            self.marks[mark] = number
        return number


CLIENT = ("127.0.0.1", 40001)  # socket S: signalling to the main server, then the tunnel
RELAY_SOCK = ("127.0.0.1", 40002)  # socket R
CLIENT_2 = ("127.0.0.1", 40003)  # an earlier attempt's socket
MAIN = ("127.0.0.2", 38800)
AGENT = ("127.0.0.4", 40200)
DEVICE = ("127.0.0.3", 40100)
STRAY_A, STRAY_B = ("127.0.0.9", 41234), ("127.0.0.9", 41235)

REALM_HTTP = 0x0BADF00D
REALM_PRIV = 0x00C0FFEE
REALM_UNBOUND = 0x7E57DA7A

RTSP_URL = "rtsp://127.0.0.1/cam/realmonitor?channel=1&subtype=0"
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=Media Presentation\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
    "a=control:*\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=control:trackID=0\r\n"
)
DESCRIBE_REPLY = (
    f"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Base: {RTSP_URL}/\r\nContent-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP)}\r\n\r\n{SDP}"
).encode()
RTP_SEQS = [1000, 1001, 1002, 1009, 1010, 1019, 1020]


def signalling_request(method: str, path: str, cseq: int, body: str = "") -> bytes:
    """A cloud request in the layout of PROTOCOLS 2.1 (the digest is a placeholder)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"CSeq: {cseq}",
        'Authorization: WSSE profile="UsernameToken"',
        'X-WSSE: UsernameToken Username="u", PasswordDigest="AAAA", Nonce="1", '
        'Created="2026-01-02T03:04:05Z"',
    ]
    if body:
        lines += ["Content-Type: ", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def reply(code: int, reason: str, cseq: int, body: str = "") -> bytes:
    head = f"HTTP/1.1 {code} {reason}\r\nCSeq: {cseq}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n" + body).encode()


def rtp_packet(seq: int, payload_len: int, marker: bool = True) -> bytes:
    hdr = struct.pack(">BBHII", 0x80, (0x80 if marker else 0) | 96, seq, 90000 + seq, 0xCAFEBABE)
    return hdr + bytes([0x65]) + bytes(range(256)) * (payload_len // 256) + b"\x00" * (
        payload_len % 256
    )


def interleaved(channel: int, pkt: bytes) -> bytes:
    return b"$" + bytes([channel]) + struct.pack(">H", len(pkt)) + pkt


def build_session(vec: dict) -> Session:
    """The synthetic session: signalling, punch, PTCP handshake, RTSP, HTTP, faults."""
    s = Session()
    p = vec["ptcp"]
    realm = p["realm"]
    s.tunnel_ports = {CLIENT[1], CLIENT_2[1], DEVICE[1], RELAY_SOCK[1], AGENT[1]}

    # Cloud signalling (2.1, 2.2).
    s.add(CLIENT, MAIN, bytes.fromhex(vec["dhp2p"]["probe_request_hex"]), "probe")
    s.add(MAIN, CLIENT, reply(200, "OK", 1, "<body><US>127.0.0.5:8800</US></body>"), "probe_reply")
    body = (
        "<body><Identify>1 22 33 44 55 66 77 88</Identify><IpEncrpt>true</IpEncrpt>"
        "<LocalAddr>127.0.0.1:40001</LocalAddr><version>5.0.0</version></body>"
    )
    s.add(CLIENT, MAIN, signalling_request("DHPOST", "/device/SN123/p2p-channel", 2, body), "chan")
    s.add(MAIN, CLIENT, reply(100, "Trying", 2), "trying")
    s.add(
        MAIN,
        CLIENT,
        reply(200, "OK", 2, "<body><PubAddr>127.0.0.3:40100</PubAddr></body>"),
        "chan_reply",
    )
    s.add(RELAY_SOCK, AGENT, bytes.fromhex(vec["dhp2p"]["post_request_hex"]), "relay_start")
    s.add(AGENT, RELAY_SOCK, b"Server Nat Info!", "nat_info")

    # Hole punch (2.3).
    s.add(CLIENT, DEVICE, bytes.fromhex(vec["punch"]["request_wire_hex"]), "punch_req")
    s.add(DEVICE, CLIENT, bytes.fromhex(vec["punch"]["response_wire_hex"]), "punch_resp")

    # Relay path (2.2 step 9): SYN, sign request 0x17, the agent's answer carries the sign.
    rel, agent = PtcpSide(), PtcpSide()
    sign = bytes(range(0x40, 0x60))
    s.add(RELAY_SOCK, AGENT, rel.packet(SYN_BODY, agent), "")
    s.add(AGENT, RELAY_SOCK, agent.packet(SYN_BODY, rel), "")
    s.add(RELAY_SOCK, AGENT, rel.packet(bytes.fromhex(p["sign_request_body_hex"]), agent), "sign17")
    s.add(AGENT, RELAY_SOCK, agent.packet(b"\x18" + b"\x00" * 11 + sign, rel), "sign18")

    # A first direct attempt (2.2 step 10) that the capture shows up to the sign exchange.
    first, dev0 = PtcpSide(), PtcpSide()
    s.add(CLIENT_2, DEVICE, first.packet(SYN_BODY, dev0), "")
    s.add(DEVICE, CLIENT_2, dev0.packet(SYN_BODY, first), "")
    s.add(CLIENT_2, DEVICE, first.packet(b"\x19" + b"\x00" * 11 + sign, dev0), "sign19")
    s.add(DEVICE, CLIENT_2, dev0.packet(b"\x1a" + b"\x00" * 11 + b"ok", first), "sign1a")
    s.add(CLIENT_2, DEVICE, first.packet(b"\x1b" + b"\x00" * 11, dev0), "sign1b")
    s.add(DEVICE, CLIENT_2, dev0.packet(b"", first), "ack_dev")

    # The session used below, consistent with the vectors: SYN, ack and bind verbatim.
    cli, dev = PtcpSide(), PtcpSide()
    # "PTCP" inside a sign, where no segment size fits (the rest is too short a packet).
    s.add(CLIENT_2, DEVICE, first.packet(b"\x19" + bytes(27) + b"PTCP" + bytes(10), dev0),
          "lookalike_sign")
    s.add(CLIENT, DEVICE, bytes.fromhex(p["syn_hex"]), "syn")
    cli.sent, cli.lmid = 4, 1
    s.add(DEVICE, CLIENT, dev.packet(SYN_BODY, cli), "syn_dev")
    s.add(CLIENT, DEVICE, bytes.fromhex(p["ack_hex"]), "ack_vec")
    s.add(CLIENT, DEVICE, bytes.fromhex(p["bind_554_hex"]), "bind554")
    cli.sent, cli.lmid, cli.nonempty = 4 + 20, 3, 1
    dev.recv = 4 + 20
    s.add(DEVICE, CLIENT, dev.packet(b"", cli), "")
    s.add(DEVICE, CLIENT, dev.packet(bytes.fromhex(p["conn_status_body_hex"]), cli), "conn")

    def tunnel(
        sender: PtcpSide, peer: PtcpSide, body: bytes, mark: str = "", pause: float = 0.0
    ) -> int:
        src, dst = (CLIENT, DEVICE) if sender is cli else (DEVICE, CLIENT)
        return s.add(src, dst, sender.packet(body, peer), mark, pause)

    # RTSP through the realm: OPTIONS is the data vector's body.
    tunnel(cli, dev, bytes.fromhex(p["data_body_hex"]), "options")
    tunnel(
        dev,
        cli,
        data_body(realm, b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nPublic: OPTIONS, DESCRIBE, PLAY\r\n\r\n"),
        "options_reply",
    )
    describe = tunnel(
        cli, dev, data_body(realm, f"DESCRIBE {RTSP_URL} RTSP/1.0\r\nCSeq: 2\r\n\r\n".encode()),
        "describe",
    )
    # The same datagram again: a retransmission, not a second DESCRIBE.
    s.add(CLIENT, DEVICE, s.datagrams[describe - 1].payload, "describe_again")
    half = len(DESCRIBE_REPLY) // 2
    tunnel(dev, cli, data_body(realm, DESCRIBE_REPLY[:half]), "describe_reply_1")
    tunnel(dev, cli, data_body(realm, DESCRIBE_REPLY[half:]), "describe_reply_2")
    setup = (
        f"SETUP {RTSP_URL}/trackID=0 RTSP/1.0\r\nCSeq: 3\r\n"
        "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n"
    )
    tunnel(cli, dev, data_body(realm, setup.encode()), "setup")
    tunnel(
        dev,
        cli,
        data_body(
            realm,
            b"RTSP/1.0 200 OK\r\nCSeq: 3\r\nSession: 12345678;timeout=60\r\n"
            b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n",
        ),
        "setup_reply",
    )
    tunnel(cli, dev, data_body(realm, f"PLAY {RTSP_URL}/ RTSP/1.0\r\nCSeq: 4\r\n"
                               "Session: 12345678\r\nRange: npt=0.000-\r\n\r\n".encode()), "play")
    play_reply = b"RTSP/1.0 200 OK\r\nCSeq: 4\r\nSession: 12345678\r\n\r\n"
    # The PLAY reply and the first RTP frame share a packet; the second frame (2000
    # bytes) is split over two packets as the official app splits at 1280 bytes.
    first = interleaved(0, rtp_packet(RTP_SEQS[0], 100))
    second = interleaved(0, rtp_packet(RTP_SEQS[1], 2000))
    third = interleaved(0, rtp_packet(RTP_SEQS[2], 50))
    tunnel(dev, cli, data_body(realm, play_reply + first), "play_reply")
    tunnel(dev, cli, data_body(realm, second[:1280]), "rtp_split_1")
    tunnel(dev, cli, data_body(realm, second[1280:] + third), "rtp_split_2")
    tunnel(cli, dev, b"", "")
    # A datagram lost before the capture, so the next one arrives out of order and is
    # held; the device resends the lost one, which dissects both in order.
    lost = dev.packet(data_body(realm, interleaved(0, rtp_packet(RTP_SEQS[3], 60))), cli)
    tunnel(dev, cli, data_body(realm, interleaved(0, rtp_packet(RTP_SEQS[4], 70))), "held")
    s.add(DEVICE, CLIENT, lost, "fill")
    # A datagram lost for good (devices need not resend): the next one is held until
    # the device's next packet, over a second later, gives up on the hole.
    dev.packet(data_body(realm, interleaved(0, rtp_packet(RTP_SEQS[5], 700))[:300]), cli)
    tunnel(dev, cli, data_body(realm, interleaved(0, rtp_packet(RTP_SEQS[6], 80))), "after_gap")

    # Heartbeats both ways.
    tunnel(cli, dev, HEARTBEAT_BODY, "heartbeat")
    tunnel(dev, cli, HEARTBEAT_BODY, "heartbeat_dev", pause=1.5)

    def batch(
        sender: PtcpSide, peer: PtcpSide, bodies: list[bytes], mark: str,
        resend: bytes = b"",
    ) -> list[bytes]:
        """One GSO send of new packets with ``bodies`` (after ``resend``, if any)."""
        src, dst = (CLIENT, DEVICE) if sender is cli else (DEVICE, CLIENT)
        packets = ([resend] if resend else []) + [sender.packet(b, peer) for b in bodies]
        s.batches[s.add(src, dst, gso_batch(packets), mark)] = packets
        return packets

    # GSO batches, as a capture on a host sending with UDP_SEGMENT shows them: a run of
    # 49 data packets of video (48 of 1280 bytes, a shorter last one) in one datagram,
    # one frame continuing into the next, unbatched datagram.
    video = RtpStream(RTP_SEQS[-1] + 1)
    video.add(*[(3000, 1200, 400, 2000, 300, 5000, 800, 64)[i % 8] for i in range(60)])

    def video_bodies(sizes: list[int], first_index: int = 1) -> list[bytes]:
        """Data bodies of the next ``sizes`` bytes of video, for the next datagram's
        packets from ``first_index`` on."""
        frame = len(s.datagrams) + 1
        bodies = []
        for i, n in enumerate(sizes):
            start = video.taken
            bodies.append(data_body(realm, video.take(n)))
            s.gso_rtp[(frame, first_index + i)] = video.completed(start, video.taken)
        return bodies

    run = batch(dev, cli, video_bodies([CHUNK] * 48 + [1000]), "gso_rtp")
    tunnel(dev, cli, video_bodies([CHUNK])[0], "gso_rtp_next")
    # The client acknowledges them all in one batch of empty packets.
    batch(cli, dev, [b""] * 50, "gso_acks")
    # A batch that resends one packet of the first (retransmission, not dissected again)
    # followed by new data.
    batch(dev, cli, video_bodies([CHUNK, CHUNK, 333], first_index=2),
          "gso_resend", resend=run[47])
    # Batches whose first packet is not data: a heartbeat and an ack.
    batch(cli, dev, [HEARTBEAT_BODY, b""], "gso_heartbeat_ack")

    # A second realm bound to HTTP (80), a third to the private protocol (37777).
    tunnel(cli, dev, bind_body(REALM_HTTP, 80), "bind80")
    tunnel(dev, cli, status_body(REALM_HTTP, b"CONN"), "")
    tunnel(cli, dev, data_body(
        REALM_HTTP,
        b"GET /cgi-bin/magicBox.cgi?action=getDeviceType HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ), "http_get")
    tunnel(dev, cli, data_body(
        REALM_HTTP, b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\ntype=IPC-HFW\n"
    ), "http_reply")
    tunnel(cli, dev, bind_body(REALM_PRIV, 37777, length_field=8), "bind37777")
    # The device asks for a retransmission (0x0a, the captured 11-byte sample): out of
    # band, its sent is the offset of its next real body, which follows in order.
    s.add(DEVICE, CLIENT, ptcp_header(dev.sent, dev.recv, 0xFFFF, dev.lmid, dev.rmid)
          + bytes.fromhex("0a00085300000000003a00"), "resend_request")
    s.add(DEVICE, CLIENT, ptcp_header(dev.sent, dev.recv, 0xFFFF, dev.lmid, dev.rmid)
          + b"\x0a", "resend_request_bare")
    tunnel(cli, dev, data_body(REALM_PRIV, b"\xa0\x00\x00\x60" + b"\x00" * 28), "priv_data")
    tunnel(cli, dev, data_body(REALM_UNBOUND, b"GET / HTTP/1.1\r\n\r\n"), "unbound_data")
    # Not a batch although "PTCP" shows inside: data whose bytes would fit as segments of
    # 36 (the length field says it is one packet).
    tunnel(cli, dev, data_body(REALM_PRIV, (b"PTCP" + bytes(32)) * 3), "lookalike_data")

    # Teardown: DISC both ways (vector body).
    tunnel(cli, dev, bytes.fromhex(p["disc_status_body_hex"]), "disc")
    tunnel(dev, cli, bytes.fromhex(p["disc_status_body_hex"]), "disc_dev")
    # The device closes the other two realms in one batch: status + status.
    batch(dev, cli, [status_body(REALM_HTTP, b"DISC"), status_body(REALM_PRIV, b"DISC")],
          "gso_status_status")

    # Faults: a truncated header, a data body whose length field lies, a short bind, an
    # unknown type, a short body.
    s.add(CLIENT, DEVICE, b"PTCP\x00\x00\x00", "short_header")
    lying = bytearray(data_body(realm, b"0123456789"))
    lying[1:4] = (500).to_bytes(3, "big")
    tunnel(cli, dev, bytes(lying), "bad_length")
    tunnel(cli, dev, bind_body(realm, 554)[:10], "short_bind")
    tunnel(cli, dev, b"\x30\x00\x00\x00", "unknown_type")
    tunnel(cli, dev, b"\x10\x00", "short_body")
    s.add(CLIENT_2, DEVICE, ptcp_header(0, 0, 0x0002FFFF, 0, 0) + b"\x00\x03\x01\x01", "bad_syn")
    # An ack followed by bytes that are no packet: one malformed packet, not a batch.
    tunnel(cli, dev, b"PTCP" + bytes(6), "lookalike_ack")
    # A data length field shorter than the data, no packet where it says the next starts.
    short = bytearray(data_body(realm, bytes(40)))
    short[1:4] = (10).to_bytes(3, "big")
    tunnel(cli, dev, bytes(short), "short_length")

    # Stray datagrams elsewhere that must not be claimed.
    s.add(STRAY_A, STRAY_B, b"hello, this is not a tunnel packet", "stray")
    s.add(STRAY_A, STRAY_B, b"PTC", "stray_short")
    s.add(STRAY_A, STRAY_B, bytes(44), "stray_zeros")
    ssdp = b"HTTP/1.1 200 OK\r\nST: upnp:rootdevice\r\nUSN: uuid:1::upnp:rootdevice\r\n\r\n"
    s.add(STRAY_A, STRAY_B, ssdp, "stray_ssdp")
    return s
