"""Sans-IO parts of rtsp_proxy.py: parsers, DVR dialect, defragmenter, packetizer."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rtsp_proxy as rp

# --------------------------------------------------------------------------
# Client requests


def test_parser_handles_pipelined_requests_in_order() -> None:
    parser = rp.RTSPRequestParser()
    data = (
        b"OPTIONS rtsp://h/live.000 RTSP/1.0\r\nCSeq: 1\r\n\r\n"
        b"DESCRIBE rtsp://h/live.000 RTSP/1.0\r\nCSeq: 2\r\nAccept: application/sdp\r\n\r\n"
        b"SET_PARAMETER rtsp://h/live.000 RTSP/1.0\r\nCSeq: 3\r\nContent-Length: 5\r\n\r\nab"
    )
    events = parser.feed(data)
    assert [e.method for e in events] == ["OPTIONS", "DESCRIBE"]
    assert events[1].header("accept") == "application/sdp"
    events = parser.feed(b"cde$\x01\x00\x02xy")
    assert events[0].method == "SET_PARAMETER" and events[0].body == b"abcde"
    assert events[1] == rp.InterleavedData(1, b"xy")


def test_parser_byte_by_byte() -> None:
    parser = rp.RTSPRequestParser()
    data = b"PLAY rtsp://h/live.001 RTSP/1.0\r\nCSeq: 7\r\nSession: AB\r\n\r\n"
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    assert len(events) == 1 and events[0].cseq == "7" and events[0].header("Session") == "AB"


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"OPTIONS rtsp://h/ RTSP/1.0\r\n\r\n",  # no CSeq
        b"OPTIONS rtsp://h/ RTSP/1.0\r\nCSeq: x\r\n\r\n",
        b"OPTIONS rtsp://h/ HTTP/1.1\r\nCSeq: 1\r\n\r\n",
        b"OPTIONS rtsp://h/ RTSP/1.0\r\nCSeq: 1\r\nno colon here\r\n\r\n",
        b"OPTIONS rtsp://h/ RTSP/1.0\r\nCSeq: 1\r\n folded\r\n\r\n",
        b"OPTIONS rtsp://h/ RTSP/1.0\r\nCSeq: 1\r\nContent-Length: -1\r\n\r\n",
        b"OPTIONS rtsp://h/ RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 99999999\r\n\r\n",
        b"OPTIONS rtsp://h/\x00 RTSP/1.0\r\nCSeq: 1\r\n\r\n",
        b"\xff\xfe\xfd RTSP/1.0\r\nCSeq: 1\r\n\r\n",
        b"OPTIONS rtsp://h/ RTSP/1.0\r\nCSeq: 1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
        b"OPTIONS rtsp://h/ RTSP/1.0\r\nCSeq: 1\r\nX: " + b"a" * 10000,
    ],
)
def test_parser_rejects_bad_requests_with_its_own_error(data: bytes) -> None:
    with pytest.raises(rp.RTSPError) as info:
        rp.RTSPRequestParser().feed(data)
    assert info.value.status in (400, 505)


# Only ASCII DIGITs where RFC 2326 says DIGIT: str.isdigit() also takes "²" (which int()
# then refuses with a ValueError) and int() takes other scripts' digits, "_" and spaces.
ODD_NUMBERS = ["\xb2", "\u0661", "1_0", "+1", "1" * 5000, "\uff11"]


@pytest.mark.parametrize("number", ODD_NUMBERS)
@pytest.mark.parametrize("header", ["Content-Length", "CSeq"])
def test_parser_accepts_ascii_digits_only(header: str, number: str) -> None:
    cseq = "" if header == "CSeq" else "CSeq: 1\r\n"
    data = f"OPTIONS rtsp://h/ RTSP/1.0\r\n{cseq}{header}: {number}\r\n\r\n"
    with pytest.raises(rp.RTSPError) as info:
        rp.RTSPRequestParser().feed(data.encode("utf-8"))
    assert info.value.status == 400


@pytest.mark.parametrize("number", ["\xb2-\xb3", "\u0661-\u0662", "1_0-11", "5000-\xb3"])
@pytest.mark.parametrize("key", ["client_port", "interleaved"])
def test_transport_ports_accept_ascii_digits_only(key: str, number: str) -> None:
    profile = "RTP/AVP" if key == "client_port" else "RTP/AVP/TCP"
    with pytest.raises(rp.RTSPError) as info:
        rp.parse_client_transport(f"{profile};unicast;{key}={number}")
    assert info.value.status == 400
    proto = rp.ClientProtocol(credentials_required=False)
    text = f"SETUP rtsp://h/live.000 RTSP/1.0\nCSeq: 2\nTransport: {profile};{key}={number}"
    action = proto.handle(_req(text))
    assert isinstance(action, rp.Reply) and action.data.startswith(b"RTSP/1.0 400 ")


@pytest.mark.parametrize("number", ODD_NUMBERS)
def test_dvr_replies_accept_ascii_digits_only(number: str) -> None:
    for reply in (
        f"RTSP/1.0 {number} OK\r\n\r\n",
        f"RTSP/1.0 200 OK\r\nContent-Length: {number}\r\n\r\n",
    ):
        dvr = rp.DVRConnection("h", 1, 0, "T")
        dvr.describe()
        with pytest.raises(rp.DVRError):
            dvr.receive_data(reply.encode("utf-8"))
    described = rp.parse_dvr_describe(f"m=video 0 RTP/AVP {number} H.264\r\n".encode())
    assert described.payload_type == 96
    assert rp.side_port_from_transport(f"RTP/AVP;server_port={number}", 554) == 556
    if not number[:1].isascii():
        assert rp.channel_from_url(f"rtsp://h/live.00{number[:1]}") is None


def test_parser_keeps_cseq_for_error_reply() -> None:
    with pytest.raises(rp.RTSPError) as info:
        rp.RTSPRequestParser().feed(b"OPTIONS * RTSP/2.0\r\nCSeq: 9\r\n\r\n")
    assert info.value.status == 505 and info.value.cseq == "9"
    reply = rp.ClientProtocol(credentials_required=False).error(info.value)
    assert reply.close and reply.data.startswith(b"RTSP/1.0 505 ") and b"CSeq: 9\r\n" in reply.data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parser_never_leaks_other_errors(data: bytes) -> None:
    parser = rp.RTSPRequestParser()
    try:
        parser.feed(data)
        parser.feed(b"\r\n\r\n")
    except rp.RTSPError:
        pass


def test_urls() -> None:
    assert rp.channel_from_url("rtsp://u:p@h:8554/live.000") == 0
    assert rp.channel_from_url("rtsp://h/x/live.015") == 15
    for bad in (
        "rtsp://h/live.00",
        "rtsp://h/live.0000",
        "rtsp://h/live.000/",
        "rtsp://h/live.000?x=1",
        "rtsp://h/cam/realmonitor",
        "rtsp://h/live.000/trackID=1",
        "*",
    ):
        assert rp.channel_from_url(bad) is None, bad
    assert rp.strip_userinfo("rtsp://u:p@h:1/live.000") == "rtsp://h:1/live.000"


def test_basic_auth() -> None:
    value = "Basic " + base64.b64encode(b"admin:4:3:21").decode()
    assert rp.parse_basic_auth(value) == ("admin", "4:3:21")
    assert rp.parse_basic_auth('Digest username="a"') is None
    assert rp.parse_basic_auth("Basic !!!") is None
    assert rp.parse_basic_auth(None) is None


@pytest.mark.parametrize(
    ("value", "kind", "ports"),
    [
        ("RTP/AVP/TCP;unicast;interleaved=0-1", "tcp", (0, 1)),
        ("RTP/AVP/TCP;unicast;interleaved=4-5", "tcp", (4, 5)),
        ("RTP/AVP/TCP;unicast", "tcp", (0, 1)),
        ("RTP/AVP;unicast;client_port=5000-5001", "udp", (5000, 5001)),
        ("RTP/AVP/UDP;unicast;client_port=5002-5003;mode=play", "udp", (5002, 5003)),
        ("RTP/AVP;multicast,RTP/AVP;unicast;client_port=6000-6001", "udp", (6000, 6001)),
    ],
)
def test_client_transport(value: str, kind: str, ports: tuple[int, int]) -> None:
    transport = rp.parse_client_transport(value)
    assert transport.kind == kind
    assert (transport.interleaved if kind == "tcp" else transport.client_port) == ports
    reply = transport.reply(0x1234, (7000, 7001))
    assert reply.startswith(value.split(";")[0] if "," not in value else "RTP/AVP;")
    if kind == "udp":
        assert f"client_port={ports[0]}-{ports[1]};server_port=7000-7001" in reply


@pytest.mark.parametrize(
    "value", [None, "RTP/AVP;multicast", "RTP/SAVP;unicast;client_port=1-2", "RTP/AVP;unicast"]
)
def test_client_transport_unsupported(value: str | None) -> None:
    with pytest.raises(rp.RTSPError) as info:
        rp.parse_client_transport(value)
    assert info.value.status == 461


# --------------------------------------------------------------------------
# Client state machine


def _req(text: str) -> rp.RTSPRequest:
    (event,) = rp.RTSPRequestParser().feed(text.replace("\n", "\r\n").encode() + b"\r\n\r\n")
    return event


def test_client_protocol_flow_without_credentials_needs_basic() -> None:
    proto = rp.ClientProtocol(credentials_required=True)
    action = proto.handle(_req("OPTIONS rtsp://h/live.000 RTSP/1.0\nCSeq: 1"))
    assert isinstance(action, rp.Reply) and b"200 OK" in action.data
    assert b"Public: OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN, GET_PARAMETER" in action.data
    action = proto.handle(_req("DESCRIBE rtsp://h/live.000 RTSP/1.0\nCSeq: 2"))
    assert isinstance(action, rp.Reply) and action.data.startswith(b"RTSP/1.0 401 ")
    assert b'WWW-Authenticate: Basic realm="' in action.data and b"CSeq: 2\r\n" in action.data
    auth = "Authorization: Basic " + base64.b64encode(b"admin:4321").decode()
    action = proto.handle(_req(f"DESCRIBE rtsp://h/live.002 RTSP/1.0\nCSeq: 3\n{auth}"))
    assert isinstance(action, rp.NeedDescribe)
    assert action.channel == 2 and action.credentials == ("admin", "4321")
    proto.describe_reply(action.request, b"v=0\r\n", "rtsp://h/live.002")
    # later requests without credentials reuse the ones given on this connection
    setup = _req(
        "SETUP rtsp://h/live.002 RTSP/1.0\nCSeq: 4\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1"
    )
    action = proto.handle(setup)
    assert isinstance(action, rp.NeedSetup) and action.credentials == ("admin", "4321")
    data = proto.setup_reply(setup, 2, action.transport, 0xABCDEF01)
    assert b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1;ssrc=ABCDEF01" in data
    session = proto.session_id
    assert f"Session: {session};timeout=60".encode() in data
    play = _req(f"PLAY rtsp://h/live.002 RTSP/1.0\nCSeq: 5\nSession: {session}\nRange: npt=0-")
    assert isinstance(proto.handle(play), rp.NeedPlay)
    data = proto.play_reply(play, 70000, 123)
    assert b"RTP-Info: url=rtsp://h/live.002;seq=4464;rtptime=123" in data
    keep = proto.handle(
        _req(f"GET_PARAMETER rtsp://h/live.002 RTSP/1.0\nCSeq: 6\nSession: {session}")
    )
    assert isinstance(keep, rp.Reply) and b"CSeq: 6" in keep.data
    bad = proto.handle(_req("PLAY rtsp://h/live.002 RTSP/1.0\nCSeq: 7\nSession: NOPE"))
    assert isinstance(bad, rp.Reply) and b" 454 " in bad.data
    down = proto.handle(_req(f"TEARDOWN rtsp://h/live.002 RTSP/1.0\nCSeq: 8\nSession: {session}"))
    assert isinstance(down, rp.NeedTeardown)


def test_client_protocol_404_and_state_errors() -> None:
    proto = rp.ClientProtocol(credentials_required=False)
    for url in ("rtsp://h/cam/realmonitor", "rtsp://h/live.1", "rtsp://h/../../etc/passwd"):
        action = proto.handle(_req(f"DESCRIBE {url} RTSP/1.0\nCSeq: 1"))
        assert isinstance(action, rp.Reply) and b" 404 " in action.data
    action = proto.handle(_req("PLAY rtsp://h/live.000 RTSP/1.0\nCSeq: 2"))
    assert isinstance(action, rp.Reply) and b" 455 " in action.data
    action = proto.handle(_req("RECORD rtsp://h/live.000 RTSP/1.0\nCSeq: 3"))
    assert isinstance(action, rp.Reply) and b" 501 " in action.data
    action = proto.handle(_req("DESCRIBE rtsp://h/live.000 RTSP/1.0\nCSeq: 4"))
    assert isinstance(action, rp.NeedDescribe) and action.credentials is None
    action = proto.handle(
        _req("SETUP rtsp://h/live.000 RTSP/1.0\nCSeq: 5\nTransport: RTP/AVP;multicast")
    )
    assert isinstance(action, rp.Reply) and b" 461 " in action.data


# --------------------------------------------------------------------------
# DVR dialect


def _lines(data: bytes) -> list[str]:
    assert data.endswith(b"\r\n\r\n")
    return data[:-4].decode().split("\r\n")


def test_dvr_requests_have_exact_header_sets() -> None:
    dvr = rp.DVRConnection("192.0.2.1", 554, 3, "TOKEN1")
    assert _lines(dvr.describe()) == [
        "DESCRIBE rtsp://192.0.2.1:554/live.003 RTSP/1.0",
        "CSeq: 1",
        "Authorization: TOKEN1",
    ]
    with pytest.raises(rp.DVRError):
        dvr.setup("tcp")  # one request at a time
    body = b"v=0\r\nm=video 0 RTP/AVP 96 H.264\r\n"
    reply = dvr.receive_data(
        b"RTSP/1.0 200 OK\r\nCSeq: 0\r\nContent-Type: text/parameters\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        + b"\x00\x00"
    )
    assert reply is not None and reply.status == 200 and reply.body == body
    assert _lines(dvr.setup("udp", 40000)) == [
        "SETUP rtsp://192.0.2.1:554/live.003 RTSP/1.0",
        "CSeq: 2",
        "Transport: RTP/AVP/UDP;unicast;client_port=40000",
        "Authorization: TOKEN1",
    ]
    # PROTOCOLS 1.2: unterminated SETUP reply, wrong CSeq, trailing NULs
    part = b"\x00RTSP/1.0 200 OK\r\nCSeq: 7\r\nSession: 5A5A;timeout=60\r\n"
    assert dvr.receive_data(part) is None
    reply = dvr.receive_data(b"Transport: RTP/AVP/UDP;unicast;server_port=556\r\n\x00")
    assert reply is not None and reply.status == 200
    assert dvr.session == "5A5A" and dvr.session_line == "Session: 5A5A;timeout=60"
    assert rp.side_port_from_transport(reply.header("Transport"), 554) == 556
    assert rp.side_port_from_transport("RTP/AVP/TCP;unicast", 554) == 556
    assert _lines(dvr.play()) == [
        "PLAY rtsp://192.0.2.1:554/live.003 RTSP/1.0",
        "CSeq: 3",
        "Session: 5A5A",
        "Range: npt=0.000-",
        "Speed: +1.0",
        "Bandwidth: 2048",
        "Authorization: TOKEN1",
    ]
    assert dvr.receive_data(b"\x00\x00RTSP/1.0 200 OK\r\nCSeq: 3\r\n\r\n\x00").status == 200
    assert _lines(rp.DVRConnection("h", 1, 0, "T").setup("tcp"))[2] == (
        "Transport: RTP/AVP/TCP;unicast"
    )


@pytest.mark.parametrize(
    "data", [b"HTTP/1.1 200 OK\r\n\r\n", b"RTSP/1.0 abc\r\n\r\n", b"junk\r\n\r\n"]
)
def test_dvr_bad_replies(data: bytes) -> None:
    dvr = rp.DVRConnection("h", 1, 0, "T")
    dvr.describe()
    with pytest.raises(rp.DVRError):
        dvr.receive_data(data)


def test_dvr_describe_and_sdp() -> None:
    tcp = rp.parse_dvr_describe(
        b"v=0\r\ns=DVR live\r\nm=video 0 TCP RTP/AVP 97 H.264\r\na=framerate:25\r\n"
        b"m=audio 0 RTP/AVP 4 G.723\r\na=framerate:8\r\n\x00"
    )
    assert (tcp.mode, tcp.payload_type, tcp.title) == ("tcp", 97, "DVR live")
    assert tcp.attributes == ["a=framerate:25"]
    udp = rp.parse_dvr_describe(b"m=video 0 RTP/AVP 96 H.264\n")
    assert udp.mode == "udp"
    with pytest.raises(rp.DVRError):
        rp.parse_dvr_describe(b"v=0\r\nm=audio 0 RTP/AVP 4\r\n")
    sps, pps = bytes.fromhex("6764001eacd940a0"), bytes.fromhex("68ebe3cb")
    sdp = rp.build_sdp(tcp, "rtsp://127.0.0.1:8554/live.000", "127.0.0.1", 0, sps, pps, 42)
    lines = sdp.decode().split("\r\n")
    assert lines[:5] == [
        "v=0",
        "o=- 42 1 IN IP4 127.0.0.1",
        "s=DVR live",
        "c=IN IP4 0.0.0.0",
        "t=0 0",
    ]
    assert "m=video 0 RTP/AVP 96" in lines and "a=rtpmap:96 H264/90000" in lines
    fmtp = next(x for x in lines if x.startswith("a=fmtp:96 "))
    assert fmtp.startswith("a=fmtp:96 packetization-mode=1;profile-level-id=64001E")
    assert "sprop-parameter-sets=Z2QAHqzZQKA=,aOvjyw==" in fmtp
    assert lines[-2] == "a=control:rtsp://127.0.0.1:8554/live.000" and lines[-1] == ""


# --------------------------------------------------------------------------
# Samsung side-port fragments


def test_defragmenter_vectors_tcp_stream_and_udp(vectors: dict) -> None:
    vec = vectors["samsung_rtp"]
    fragments = [bytes.fromhex(h) for h in vec["fragments_hex"]]
    expected = bytes.fromhex(vec["reassembled_payload_hex"])
    stream = b"".join(fragments)
    for chunk in (1, 7, 100, len(stream)):
        defrag = rp.SamsungDefragmenter()
        frames = []
        for i in range(0, len(stream), chunk):
            frames += defrag.feed_stream(stream[i : i + chunk])
        assert len(frames) == 1 and frames[0].payload == expected
        assert frames[0].timestamp == 0x15F90
    defrag = rp.SamsungDefragmenter()
    frames = []
    for fragment in fragments:
        frames += defrag.feed_datagram(b"\x00")
        frames += defrag.feed_datagram(fragment)
    assert [f.payload for f in frames] == [expected]


def fragment(seq: int, ts: int, payload: bytes, marker: bool, cc: int = 0) -> bytes:
    head = struct.pack("!BBHII", 0x90 | cc, (0x80 if marker else 0) | 96, seq, ts, 0x1234)
    head += b"\x00\x00\x00\x01" * cc
    return head + b"\xab\xac\x00\x02" + struct.pack("<I", len(payload)) + b"\x00" * 4 + payload


def test_defragmenter_csrc_and_loss() -> None:
    defrag = rp.SamsungDefragmenter()
    out = defrag.feed_datagram(fragment(1, 40, b"ab", False, cc=2))
    out += defrag.feed_datagram(fragment(2, 40, b"cd", True, cc=2))
    assert [f.payload for f in out] == [b"abcd"]
    # a lost middle fragment drops the frame, the next one is whole
    out = defrag.feed_datagram(fragment(3, 80, b"x", False))
    out += defrag.feed_datagram(fragment(5, 80, b"z", True))
    out += defrag.feed_datagram(fragment(6, 120, b"q", True))
    out += defrag.feed_datagram(fragment(7, 160, b"r", False))
    out += defrag.feed_datagram(fragment(8, 160, b"s", True))
    assert [f.payload for f in out] == [b"q", b"rs"]
    assert defrag.dropped_frames == 1


@pytest.mark.parametrize(
    "bad",
    [
        b"\x80" + b"\x00" * 30,  # no extension bit
        b"\x50" + b"\x00" * 30,  # version 1
        fragment(1, 1, b"abc", True)[:-1],  # truncated datagram
        b"\x90\x60\x00\x01" + b"\x00" * 8 + b"\xab\xac\x00\x00" + b"\x00" * 8,  # no length word
        b"\x90\x60\x00\x01" + b"\x00" * 8 + b"\xab\xac\x00\x02\xff\xff\xff\x7f" + b"\x00" * 4,
    ],
)
def test_defragmenter_out_of_step(bad: bytes) -> None:
    with pytest.raises(rp.SamsungStreamError):
        rp.SamsungDefragmenter().feed_datagram(bad)
    if len(bad) > 20 and bad[0] != 0x90:
        with pytest.raises(rp.SamsungStreamError):
            rp.SamsungDefragmenter().feed_stream(bad)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_defragmenter_only_raises_its_error(data: bytes) -> None:
    for feed in (rp.SamsungDefragmenter().feed_stream, rp.SamsungDefragmenter().feed_datagram):
        try:
            feed(data)
        except rp.SamsungStreamError:
            pass


# --------------------------------------------------------------------------
# H.264 / RFC 6184


def test_split_annexb() -> None:
    assert rp.split_annexb(b"\x65abc") == [b"\x65abc"]
    data = b"\x00\x00\x00\x01\x67AB\x00\x00\x01\x68C\x00\x00\x00\x01\x65DEF\x00\x00"
    assert rp.split_annexb(data) == [b"\x67AB", b"\x68C", b"\x65DEF"]
    assert rp.split_annexb(b"") == []


def test_timestamps_map_to_90khz_across_wrap() -> None:
    mapper = rp.TimestampMapper(1000, 90000, base=0xFFFFFF00)
    assert mapper.map(0xFFFFFFF0) == 0xFFFFFF00
    assert mapper.map(0xFFFFFFF0 + 40 - (1 << 32)) == (0xFFFFFF00 + 3600) & 0xFFFFFFFF
    assert mapper.map(0x18) == (0xFFFFFF00 + 40 * 90) & 0xFFFFFFFF


def _rtp(packet: bytes) -> tuple[int, bool, int, int, int, bytes]:
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", packet[:12])
    assert b0 == 0x80
    return b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, packet[12:]


def test_packetizer_single_and_fu_a_roundtrip() -> None:
    pkt = rp.H264Packetizer(0xDEADBEEF, seq=0xFFFE)
    sps, big = b"\x67" + b"s" * 10, b"\x65" + bytes(range(256)) * 400  # 102,401 bytes
    packets = pkt.packetize([sps, big], 9000)
    assert all(len(p) - 12 <= 1400 for p in packets)
    fields = [_rtp(p) for p in packets]
    assert [f[2] for f in fields] == [(0xFFFE + i) & 0xFFFF for i in range(len(packets))]
    assert [f[1] for f in fields] == [False] * (len(packets) - 1) + [True]
    assert {(f[0], f[3], f[4]) for f in fields} == {(96, 9000, 0xDEADBEEF)}
    assert fields[0][5] == sps
    fus = [f[5] for f in fields[1:]]
    assert fus[0][0] == 0x7C and fus[0][1] == 0x85  # NRI kept, FU-A, start bit, type 5
    assert fus[-1][1] == 0x45 and all(fu[1] == 0x05 for fu in fus[1:-1])
    assert b"\x65" + b"".join(fu[2:] for fu in fus) == big
    assert pkt.seq == (0xFFFE + len(packets)) & 0xFFFF


def test_channel_media_late_joiner_packets() -> None:
    media = rp.ChannelMedia(clock_in=1000, ssrc=7)
    key = b"\x00\x00\x00\x01\x67SPS\x00\x00\x00\x01\x68PPS\x00\x00\x00\x01\x65IDR"
    first = media.on_frame(rp.SamsungFrame(1000, key))
    assert first.keyframe and first.has_parameter_sets
    assert media.start_packets(first) == []
    second = media.on_frame(rp.SamsungFrame(1040, b"\x41P"))
    assert not second.keyframe and second.first_seq == (first.first_seq + 3) & 0xFFFF
    assert (second.rtptime - first.rtptime) & 0xFFFFFFFF == 3600
    bare = media.on_frame(rp.SamsungFrame(1080, b"\x65IDR2"))
    start = media.start_packets(bare)
    seqs = [(bare.first_seq - 2) & 0xFFFF, (bare.first_seq - 1) & 0xFFFF]
    assert [_rtp(p)[2] for p in start] == seqs
    assert [_rtp(p)[5] for p in start] == [b"\x67SPS", b"\x68PPS"]
    assert {_rtp(p)[3] for p in start} == {bare.rtptime}
    inter = bare.interleaved(2)
    assert inter[:2] == b"$\x02" and inter is bare.interleaved(2)
    assert int.from_bytes(inter[2:4], "big") == len(bare.packets[0])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["DESCRIBE", "SETUP", "PLAY"]))
def test_dvr_reply_parser_only_raises_its_error(data: bytes, method: str) -> None:
    dvr = rp.DVRConnection("h", 554, 0, "T")
    dvr.session = "S"
    dvr.pending = method
    try:
        dvr.receive_data(data)
        dvr.receive_data(b"\r\n\r\n")
    except rp.DVRError:
        pass


_METHODS = ["OPTIONS", "DESCRIBE", "SETUP", "PLAY", "PAUSE", "TEARDOWN", "GET_PARAMETER", "X"]
_HEADERS = st.sampled_from(
    [
        "Session: 1",
        "Transport: RTP/AVP;unicast;client_port=1-2",
        "Transport: RTP/AVP/TCP;interleaved=300-301",
        "Transport: x;;;=",
        "Authorization: Basic !!",
        "Authorization: Basic YTpi",
        "Session: ;;",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_METHODS),
            st.sampled_from(["rtsp://h/live.000", "rtsp://h/x", "*", "rtsp://h/live.999"]),
            st.lists(_HEADERS, max_size=3),
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_client_protocol_always_answers(steps, required: bool) -> None:
    proto = rp.ClientProtocol(credentials_required=required)
    for cseq, (method, url, headers) in enumerate(steps, 1):
        text = "\n".join([f"{method} {url} RTSP/1.0", f"CSeq: {cseq}", *headers])
        action = proto.handle(_req(text))
        if isinstance(action, rp.Reply):
            assert f"CSeq: {cseq}\r\n".encode() in action.data
        elif isinstance(action, rp.NeedSetup):
            proto.setup_reply(action.request, action.channel, action.transport, 1, (2, 3))
        elif isinstance(action, rp.NeedDescribe):
            assert required == (action.credentials is not None)
