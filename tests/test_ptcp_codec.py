"""PTCP codec: golden vectors (PROTOCOLS 2.5) and robustness of the decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptcp
from conftest import load_vectors
from ptcp import (
    Bind,
    Command,
    Data,
    Heartbeat,
    Packet,
    PTCPError,
    Status,
    Syn,
    decode_body,
    decode_packet,
    encode_body,
    encode_packet,
)

VECTORS = load_vectors()["ptcp"]
REALM = VECTORS["realm"]


def vec(name: str) -> bytes:
    return bytes.fromhex(VECTORS[name])


def test_syn_vector():
    packet = Packet(sent=0, recv=0, pid=0x0002FFFF, lmid=0, rmid=0, body=Syn())
    assert encode_packet(packet) == vec("syn_hex")
    assert decode_packet(vec("syn_hex")) == packet


def test_ack_vector():
    packet = Packet(sent=4, recv=4, pid=0xFFFF, lmid=1, rmid=0)
    assert encode_packet(packet) == vec("ack_hex")
    assert decode_packet(vec("ack_hex")) == packet
    assert decode_packet(vec("ack_hex")).body is None


def test_bind_vector():
    # the golden vector follows the older public tools: 0 in the length field
    packet = Packet(4, 4, 0xFFFF, 2, 1, Bind(REALM, 554, "127.0.0.1", length_field=0))
    assert encode_packet(packet) == vec("bind_554_hex")
    assert decode_packet(vec("bind_554_hex")) == packet


# Bodies lifted byte for byte from a capture of the official app (PROTOCOLS 2.7 (a)).
CAPTURED_BODIES = [
    ("11000008fffffe910000000000009391" "7f000001", Bind(0xFFFFFE91, 37777)),
    ("12000000ffd2c46c0000000044495343", Status(0xFFD2C46C, False)),
    ("120000005f7f1ce800000000434f4e4e", Status(0x5F7F1CE8, True)),
    ("130000000000000000000000", Heartbeat()),
    ("00030100", Syn()),
]


@pytest.mark.parametrize(("hexbody", "body"), CAPTURED_BODIES)
def test_bodies_as_the_official_app_sends_them(hexbody: str, body) -> None:
    assert encode_body(body) == bytes.fromhex(hexbody)
    assert decode_body(bytes.fromhex(hexbody)) == body


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("conn_status_body_hex", Status(REALM, True)),
        ("disc_status_body_hex", Status(REALM, False)),
        ("heartbeat_body_hex", Heartbeat()),
        ("data_body_hex", Data(REALM, VECTORS["data_payload"].encode())),
        ("sign_request_body_hex", Command(0x17, b"")),
    ],
)
def test_body_vectors(name, body):
    assert encode_body(body) == vec(name)
    assert decode_body(vec(name)) == body


def test_sign_command_payload_starts_at_offset_12():
    raw = bytes([0x19]) + bytes(11) + b"SIGNATURE"
    assert decode_body(raw) == Command(0x19, b"SIGNATURE")
    assert encode_body(Command(0x19, b"SIGNATURE")) == raw
    odd = bytes([0x1A, 0, 0, 9]) + bytes(8) + b"SIGNATURE"
    assert encode_body(decode_body(odd)) == odd


def test_non_data_length_field_is_ignored():
    # PROTOCOLS 2.5: devices answer status with any value in the length field
    raw = bytearray(vec("conn_status_body_hex"))
    raw[1:4] = b"\x00\x00\x04"
    assert decode_body(bytes(raw)) == Status(REALM, True)
    hb = bytearray(vec("heartbeat_body_hex"))
    hb[3] = 8
    assert decode_body(bytes(hb)) == Heartbeat()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"PTC",
        b"PTCP" + bytes(19),
        b"XTCP" + bytes(20),
        b"DHGET /probe/p2psrv HTTP/1.1\r\nCSeq: 1\r\n\r\n",
        bytes(20) + b"\x21\x12\xa4\x42" + bytes(8),  # a STUN-looking header
        bytes.fromhex(VECTORS["ack_hex"]) + b"\x10\x00",  # body shorter than its type field
        bytes.fromhex(VECTORS["ack_hex"]) + vec("data_body_hex")[:-1],  # length disagrees
        bytes.fromhex(VECTORS["ack_hex"]) + vec("data_body_hex") + b"x",  # length disagrees
        bytes.fromhex(VECTORS["ack_hex"]) + vec("bind_554_hex")[24:-1],  # short bind
        bytes.fromhex(VECTORS["ack_hex"]) + vec("conn_status_body_hex")[:-4] + b"OPEN",
        bytes.fromhex(VECTORS["ack_hex"]) + vec("heartbeat_body_hex") + b"\0",
        bytes.fromhex(VECTORS["ack_hex"]) + b"\x17\x00\x00\x00\x00",  # short command
    ],
)
def test_malformed_packets_raise_ptcperror(raw):
    with pytest.raises(PTCPError):
        decode_packet(raw)


@pytest.mark.parametrize(
    "body",
    [
        Bind(1, 70000 << 16, "127.0.0.1"),
        Bind(1, 554, "::1"),
        Bind(-1, 554),
        Command(0x10, b""),
        Command(0x17, b"", b"short"),
        Data(1 << 32, b"x"),
    ],
)
def test_unencodable_bodies_raise_ptcperror(body):
    with pytest.raises(PTCPError):
        encode_body(body)


def test_unencodable_header_raises_ptcperror():
    with pytest.raises(PTCPError):
        encode_packet(Packet(1 << 32, 0, 0, 0, 0))


u32 = st.integers(0, 0xFFFFFFFF)
bodies = st.one_of(
    st.none(),
    st.just(Syn()),
    st.just(Heartbeat()),
    st.builds(Data, u32, st.binary(max_size=2000)),
    st.builds(Bind, u32, u32, st.ip_addresses(v=4).map(str)),
    st.builds(Status, u32, st.booleans()),
    st.builds(
        Command,
        st.integers(0x14, 0xFF),
        st.binary(max_size=64),
        st.binary(min_size=11, max_size=11),
    ),
)


@given(st.builds(Packet, u32, u32, u32, u32, u32, bodies))
def test_roundtrip(packet):
    assert decode_packet(encode_packet(packet)) == packet


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_decoder_random_bytes_only_ptcperror(raw):
    try:
        decode_packet(raw)
    except PTCPError:
        pass


@settings(max_examples=500)
@given(
    st.sampled_from([b"", b"\x10", b"\x11", b"\x12", b"\x13", b"\x00\x03\x01\x00", b"\x17"]),
    st.binary(max_size=40),
)
def test_decoder_random_bodies_after_valid_header(prefix, rest):
    raw = vec("ack_hex") + prefix + rest
    try:
        packet = decode_packet(raw)
    except PTCPError:
        return
    assert encode_packet(packet)[:24] == raw[:24]


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_session_random_datagrams_only_ptcperror(raw):
    session = ptcp.Session(now=0.0)
    try:
        session.receive_datagram(raw, 0.0)
    except PTCPError:
        pass
    session.handle_timers(1.0)
    session.datagrams_to_send()
