"""dh-p2p.lua run by tshark over captures of the Dahua tunnel (issue 7).

The synthetic capture is built from vectors.json packets plus a plausible session
(tests/_dissector_support.py); field values are compared with the vectors.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from _dissector_support import (
    DEVICE,
    HEARTBEAT_BODY,
    REALM_HTTP,
    REALM_PRIV,
    REALM_UNBOUND,
    REPO,
    RTP_SEQS,
    PtcpPacket,
    Session,
    build_session,
    data_body,
    fields,
    interleaved,
    ptcp_header,
    ptcp_packets,
    rtp_packet,
    status_body,
    tshark,
)

from conftest import free_port, play, require_tool
from pcap import LINKTYPE_ETHERNET, Datagram, write_udp_pcap

pytestmark = pytest.mark.real_peer

OUR_PROTOCOLS = {"ptcp", "dhp2p", "dhpunch"}
PI_WARN, PI_ERROR = 0x00600000, 0x00800000  # epan/proto.h expert severities


@pytest.fixture(scope="module")
def session(vectors: dict) -> Session:
    return build_session(vectors)


@pytest.fixture(scope="module")
def capture(session: Session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("tshark")
    return write_udp_pcap(tmp_path_factory.mktemp("dissector") / "session.pcap", session.datagrams)


TABLE_FIELDS = [
    "frame.number",
    "frame.protocols",
    "_ws.col.Info",
    "udp.srcport",
    "udp.dstport",
    "ptcp.sent",
    "ptcp.recv",
    "ptcp.pid",
    "ptcp.lmid",
    "ptcp.rmid",
    "ptcp.type",
    "ptcp.length",
    "ptcp.realm",
    "ptcp.bind.port",
    "ptcp.resend",
    "ptcp.bind.ip",
    "ptcp.status",
    "ptcp.realm.port",
    "_ws.expert.severity",
    "_ws.expert.message",
]


@pytest.fixture(scope="module")
def table(capture: Path) -> dict[int, dict[str, str]]:
    """One tshark run: every frame's fields by name."""
    rows = fields(capture, None, *TABLE_FIELDS)
    return {int(r[0]): dict(zip(TABLE_FIELDS, r, strict=True)) for r in rows}


def protocols(row: dict[str, str]) -> set[str]:
    return set(row["frame.protocols"].split(":"))


def test_no_lua_error_and_nothing_malformed(capture: Path) -> None:
    for two_pass in (False, True):
        res = tshark(capture, "-Y", "_ws.lua.error || _ws.malformed", two_pass=two_pass)
        assert res.returncode == 0, res.stderr
        assert res.lines == [], res.stdout
        assert "Lua Error" not in res.stderr
    verbose = tshark(capture, "-V")
    assert verbose.returncode == 0, verbose.stderr
    assert "Lua Error" not in verbose.stdout + verbose.stderr
    assert "Dahua PTCP tunnel" in verbose.stdout


def test_every_tunnel_datagram_is_recognised(
    session: Session, table: dict[int, dict[str, str]]
) -> None:
    assert len(table) == len(session.datagrams)
    on_tunnel = [
        row
        for row in table.values()
        if {int(row["udp.srcport"]), int(row["udp.dstport"])} & session.tunnel_ports
    ]
    assert len(on_tunnel) >= 40
    unclaimed = [row["frame.number"] for row in on_tunnel if not protocols(row) & OUR_PROTOCOLS]
    assert unclaimed == []


def test_stray_datagrams_are_not_claimed(
    session: Session, table: dict[int, dict[str, str]]
) -> None:
    for mark in ("stray", "stray_short", "stray_zeros", "stray_ssdp"):
        row = table[session.marks[mark]]
        assert not protocols(row) & OUR_PROTOCOLS, (mark, row["frame.protocols"])


@pytest.mark.parametrize("key", ["syn_hex", "ack_hex", "bind_554_hex"])
def test_header_fields_match_vectors(
    key: str, vectors: dict, session: Session, table: dict[int, dict[str, str]]
) -> None:
    raw = bytes.fromhex(vectors["ptcp"][key])
    sent, recv, pid, lmid, rmid = struct.unpack(">5I", raw[4:24])
    mark = {"syn_hex": "syn", "ack_hex": "ack_vec", "bind_554_hex": "bind554"}[key]
    row = table[session.marks[mark]]
    assert int(row["ptcp.sent"]) == sent
    assert int(row["ptcp.recv"]) == recv
    assert int(row["ptcp.pid"], 16) == pid
    assert int(row["ptcp.lmid"]) == lmid
    assert int(row["ptcp.rmid"]) == rmid


def test_body_fields_match_vectors(
    vectors: dict, session: Session, table: dict[int, dict[str, str]]
) -> None:
    p = vectors["ptcp"]
    realm = f"0x{p['realm']:08x}"
    m = session.marks

    syn = table[m["syn"]]
    assert int(syn["ptcp.type"], 16) == 0x00
    ack = table[m["ack_vec"]]
    assert int(ack["ptcp.type"], 16) == 0x100  # pseudo type of an empty body

    bind = table[m["bind554"]]
    bind_raw = bytes.fromhex(p["bind_554_hex"])
    assert int(bind["ptcp.type"], 16) == bind_raw[24] == 0x11
    assert bind["ptcp.realm"] == realm
    assert int(bind["ptcp.bind.port"]) == struct.unpack(">I", bind_raw[36:40])[0] == 554
    assert bind["ptcp.bind.ip"] == "127.0.0.1"

    conn_body = bytes.fromhex(p["conn_status_body_hex"])
    for mark, body in (("conn", conn_body), ("disc", bytes.fromhex(p["disc_status_body_hex"]))):
        row = table[m[mark]]
        assert int(row["ptcp.type"], 16) == 0x12
        assert row["ptcp.realm"] == realm
        assert row["ptcp.status"] == body[12:16].decode()

    assert int(table[m["heartbeat"]]["ptcp.type"], 16) == bytes.fromhex(p["heartbeat_body_hex"])[0]
    assert int(table[m["sign17"]]["ptcp.type"], 16) == 0x17

    data = table[m["options"]]
    assert int(data["ptcp.type"], 16) == 0x10
    assert data["ptcp.realm"] == realm
    assert int(data["ptcp.length"]) == len(p["data_payload"].encode())
    assert int(data["ptcp.realm.port"]) == 554


def test_info_column_reads_like_a_sentence(
    vectors: dict, session: Session, table: dict[int, dict[str, str]]
) -> None:
    realm = f"0x{vectors['ptcp']['realm']:08x}"
    n = len(vectors["ptcp"]["data_payload"].encode())
    m = session.marks
    info = {mark: table[m[mark]]["_ws.col.Info"] for mark in m}
    assert info["syn"] == "PTCP SYN"
    assert info["ack_vec"] == "PTCP ack sent 4 recv 4"
    assert info["bind554"] == f"PTCP bind realm {realm} to 127.0.0.1:554"
    assert info["conn"] == f"PTCP status realm {realm} CONN (connected)"
    assert info["disc"] == f"PTCP status realm {realm} DISC (closed)"
    assert info["heartbeat"] == "PTCP heartbeat"
    assert info["options"].startswith(f"PTCP data realm {realm} {n} bytes: OPTIONS rtsp://")
    assert info["priv_data"] == f"PTCP data realm 0x{REALM_PRIV:08x} 32 bytes"
    assert info["describe_reply_1"].endswith("(continued in a later packet)")
    assert info["sign19"] == "PTCP sign exchange: sign (0x19)"
    assert info["short_header"] == "PTCP malformed: header truncated (7 of 24 bytes)"
    assert info["probe"] == "DH-P2P DHGET /probe/p2psrv HTTP/1.1"
    assert info["punch_req"] == "DH-P2P hole punch: inverted STUN Binding Request"


def test_type_value_names(capture: Path, session: Session) -> None:
    res = tshark(capture, "-T", "pdml", "-Y", "ptcp.type")
    assert res.returncode == 0, res.stderr
    shown: dict[int, list[str]] = {}
    for packet in ET.fromstring(res.stdout).iter("packet"):
        number = int(packet.find("proto[@name='frame']/field[@name='frame.number']").get("show"))
        types = [f for f in packet.iter("field") if f.get("name") == "ptcp.type"]
        shown[number] = [f.get("showname") for f in types]
    m = session.marks
    expected = {
        "ack_vec": "ack",
        "syn": "SYN",
        "options": "data",
        "bind554": "bind",
        "conn": "status",
        "heartbeat": "heartbeat",
        "sign17": "sign exchange",
        "sign18": "sign exchange",
        "sign19": "sign exchange",
        "sign1a": "sign exchange",
        "sign1b": "sign exchange",
    }
    for mark, name in expected.items():
        assert len(shown[m[mark]]) == 1, mark
        assert shown[m[mark]][0].startswith(f"Type: {name}"), (mark, shown[m[mark]])
    # Value names work in display filters too.
    hb = fields(capture, 'ptcp.type == "heartbeat"', "frame.number")
    assert [int(r[0]) for r in hb] == [m["heartbeat"], m["heartbeat_dev"], m["gso_heartbeat_ack"]]


def test_malformed_packets_get_expert_info(
    session: Session, table: dict[int, dict[str, str]]
) -> None:
    m = session.marks
    for mark, text in (
        ("short_header", "Only 7 of the 24 header bytes"),
        ("bad_length", "Length field says 500 bytes but 10 follow"),
        ("short_bind", "bind body of 10 bytes, at least 20 expected"),
        ("short_body", "Body of 2 bytes is shorter than its 4-byte type and length"),
    ):
        row = table[m[mark]]
        assert "ptcp" in protocols(row), mark
        assert text in row["_ws.expert.message"], (mark, row["_ws.expert.message"])
        assert int(row["_ws.expert.severity"]) == PI_ERROR, mark
    unknown = table[m["unknown_type"]]
    assert unknown["_ws.expert.message"] == "Unknown body type 0x30"
    assert int(unknown["_ws.expert.severity"]) == PI_WARN
    # The good packets carry no PTCP error.
    for mark in ("syn", "bind554", "options", "heartbeat", "disc"):
        assert table[m[mark]]["_ws.expert.message"] == "", mark


def test_expert_filters(capture: Path, session: Session) -> None:
    m = session.marks
    got = {
        name: [int(r[0]) for r in fields(capture, name, "frame.number")]
        for name in (
            "ptcp.short", "ptcp.bad_length", "ptcp.short_body", "ptcp.unknown_type", "ptcp.bad_syn"
        )
    }
    assert got == {
        "ptcp.bad_syn": [m["bad_syn"]],
        "ptcp.short": [m["short_header"]],
        "ptcp.bad_length": [m["bad_length"], m["short_length"]],
        "ptcp.short_body": [m["short_bind"], m["short_body"]],
        "ptcp.unknown_type": [m["unknown_type"], m["lookalike_ack"]],
    }


@pytest.mark.parametrize("two_pass", [False, True])
def test_rtsp_in_realm_data_is_decoded(
    two_pass: bool, capture: Path, vectors: dict, session: Session
) -> None:
    m = session.marks
    rows = fields(capture, "rtsp.request", "frame.number", "rtsp.method", "rtsp.request",
                  two_pass=two_pass)
    got = {int(r[0]): r[1] for r in rows}
    assert got == {m["options"]: "OPTIONS", m["describe"]: "DESCRIBE", m["setup"]: "SETUP",
                   m["play"]: "PLAY"}
    first_line = vectors["ptcp"]["data_payload"].split("\r\n")[0]
    options_row = next(r for r in rows if int(r[0]) == m["options"])
    assert options_row[2].replace("\\r\\n", "") == first_line

    # The DESCRIBE reply is split over two PTCP packets: decoded once, where it completes.
    replies = fields(capture, "rtsp.response", "frame.number", "rtsp.status", "sdp.media",
                     two_pass=two_pass)
    by_frame = {int(r[0]): r for r in replies}
    assert m["describe_reply_1"] not in by_frame
    assert by_frame[m["describe_reply_2"]][1] == "200"
    assert by_frame[m["describe_reply_2"]][2] == "video 0 RTP/AVP 96"
    assert {m["options_reply"], m["setup_reply"], m["play_reply"]} <= set(by_frame)


@pytest.mark.parametrize("two_pass", [False, True])
def test_interleaved_rtp_in_realm_data(two_pass: bool, capture: Path, session: Session) -> None:
    m = session.marks
    rows = fields(capture, "rtp", "frame.number", "rtp.seq", "rtp.ssrc", two_pass=two_pass)
    got = {int(r[0]): r[1].split(",") for r in rows}
    gso: dict[int, list[str]] = {}
    for (frame, _), seqs in session.gso_rtp.items():
        gso.setdefault(frame, []).extend(str(seq) for seq in seqs)
    assert got == {
        m["play_reply"]: [str(RTP_SEQS[0])],
        m["rtp_split_2"]: [str(RTP_SEQS[1]), str(RTP_SEQS[2])],
        # The held packet is dissected in order, after the resent one that fills the hole.
        m["fill"]: [str(RTP_SEQS[3]), str(RTP_SEQS[4])],
        # The packet after a hole that never fills: dissected when the wait ends.
        m["heartbeat_dev"]: [str(RTP_SEQS[6])],
        # GSO batches and the frames between them.
        **{frame: seqs for frame, seqs in gso.items() if seqs},
    }
    assert all(set(r[2].split(",")) == {"0xcafebabe"} for r in rows)
    # The video runs on without a hole from the last unbatched packet through the
    # batches (a frame spanning batch and single datagram included), nothing twice.
    seqs = [int(s) for r in rows for s in r[1].split(",")]
    tail = seqs[seqs.index(RTP_SEQS[-1]):]
    assert len(tail) > 40 and tail == list(range(RTP_SEQS[-1], RTP_SEQS[-1] + len(tail)))


def test_retransmission_and_gap_from_sent_counters(capture: Path, session: Session) -> None:
    m = session.marks
    retrans = fields(capture, "ptcp.retransmission", "frame.number", "_ws.col.Info")
    assert [int(r[0]) for r in retrans] == [m["describe_again"], m["gso_resend"]]
    assert retrans[0][1].endswith("(retransmission)")
    assert [int(r[0]) for r in fields(capture, "ptcp.retransmitted", "frame.number")] == [
        m["describe_again"], m["gso_resend"]
    ]
    held = fields(capture, "ptcp.out_of_order", "frame.number", "ptcp.ooo.dissected_in",
                  two_pass=True)
    assert held == [
        [str(m["held"]), str(m["fill"])],
        [str(m["after_gap"]), str(m["heartbeat_dev"])],
    ]
    bodies = fields(capture, "ptcp.ooo.body_of", "frame.number", "ptcp.ooo.body_of")
    assert bodies == [[str(m["fill"]), str(m["held"])],
                      [str(m["heartbeat_dev"]), str(m["after_gap"])]]
    gap = fields(capture, "ptcp.gap", "frame.number", "_ws.expert.message")
    assert [int(r[0]) for r in gap] == [m["heartbeat_dev"]]
    lost = 12 + 300  # the data body the capture never saw: 12-byte data header + 300 bytes
    assert f"{lost} body bytes missing before this packet (not captured)" in gap[0][1]
    info = {int(r[0]): r[1] for r in fields(capture, None, "frame.number", "_ws.col.Info")}
    assert info[m["held"]].endswith("bytes (out of order)")
    n = len(interleaved(0, rtp_packet(RTP_SEQS[3], 60)))
    assert info[m["fill"]].startswith(f"PTCP data realm 0x1a2b3c4d {n} bytes (+1 held body): ")


def test_http_realm_and_raw_realms(capture: Path, session: Session) -> None:
    m = session.marks
    req = fields(capture, "http.request && ptcp", "frame.number", "http.request.uri", "ptcp.realm")
    assert req == [
        [str(m["http_get"]), "/cgi-bin/magicBox.cgi?action=getDeviceType", f"0x{REALM_HTTP:08x}"]
    ]
    resp = fields(capture, "http.response && ptcp", "frame.number", "http.response.code")
    assert resp == [[str(m["http_reply"]), "200"]]
    raw = fields(capture, "ptcp && data", "frame.number", "ptcp.realm", "data.len")
    got = {int(r[0]): (r[1], r[2]) for r in raw}
    assert got[m["priv_data"]] == (f"0x{REALM_PRIV:08x}", "32")
    assert got[m["unbound_data"]][0] == f"0x{REALM_UNBOUND:08x}"
    unbound = fields(capture, "ptcp.unknown_realm", "frame.number")
    assert unbound == [[str(m["unbound_data"])]]
    # Unbound realm data that looks like HTTP still is not guessed at.
    assert fields(capture, f"frame.number == {m['unbound_data']} && http", "frame.number") == []


def test_realm_ports_preference(capture: Path, session: Session) -> None:
    m = session.marks
    pref = ["-o", "ptcp.realm_ports:80=http, 37777=rtsp, 99=no-such-dissector"]
    rows = fields(capture, "ptcp.type == 0x10", "frame.number", "frame.protocols",
                  extra=pref)
    protos = {int(r[0]): set(r[1].split(":")) for r in rows}
    assert "rtsp" not in protos[m["options"]] and "data" in protos[m["options"]]
    assert "http" in protos[m["http_get"]]
    assert "rtsp" in protos[m["priv_data"]]
    res = tshark(capture, "-Y", "_ws.lua.error", *pref)
    assert res.returncode == 0 and res.lines == [] and "Lua Error" not in res.stderr


def test_signalling_goes_through_http_with_xml(
    capture: Path, session: Session, vectors: dict
) -> None:
    m = session.marks
    rows = fields(
        capture,
        "dhp2p",
        "frame.number",
        "dhp2p.method",
        "dhp2p.uri",
        "dhp2p.code",
        "dhp2p.cseq",
        "http.request.method",
        "http.response.code",
        "xml.tag",
        "dhp2p.text",
    )
    by = {int(r[0]): r[1:] for r in rows}
    assert by[m["probe"]][:6] == ["DHGET", "/probe/p2psrv", "", "1", "GET", ""]
    relay = by[m["relay_start"]]
    assert relay[:6] == ["DHPOST", "/relay/start/abc", "", "7", "POST", ""]
    body_tags = [f"<{el.tag}>" for el in ET.fromstring(vectors["dhp2p"]["post_body"]).iter()]
    assert relay[6].split(",") == body_tags
    chan = by[m["chan"]]
    assert "<LocalAddr>" in chan[6].split(",")
    assert by[m["probe_reply"]][2:7] == ["200", "1", "", "200", "<body>,<US>"]
    assert by[m["trying"]][2] == "100"
    assert "<PubAddr>" in by[m["chan_reply"]][6]
    assert by[m["nat_info"]][7] == "Server Nat Info!"


def test_punch_is_uninverted_into_stun(capture: Path, session: Session, vectors: dict) -> None:
    m = session.marks
    rows = fields(
        capture,
        "dhpunch",
        "frame.number",
        "classicstun.type",
        "classicstun.id",
        "dhpunch.identify",
        "dhpunch.port",
        "dhpunch.ip",
    )
    by = {int(r[0]): r[1:] for r in rows}
    assert set(by) == {m["punch_req"], m["punch_resp"]}
    for mark, key in (("punch_req", "request_plain_hex"), ("punch_resp", "response_plain_hex")):
        plain = bytes.fromhex(vectors["punch"][key])
        mtype = struct.unpack(">H", plain[:2])[0]
        port = struct.unpack(">H", plain[38:40])[0]
        ip = ".".join(str(b) for b in plain[40:44])
        assert by[m[mark]] == [
            f"0x{mtype:04x}",
            plain[4:20].hex(),
            vectors["punch"]["identify_hex"],
            str(port),
            ip,
        ]


# --------------------------------------------------------------------------- GSO batches


@pytest.mark.parametrize("two_pass", [False, True])
def test_gso_batches_are_split_into_their_packets(
    two_pass: bool, capture: Path, session: Session
) -> None:
    """Each packet of a batch is dissected alone: its header, body and batch place."""
    packets = ptcp_packets(capture, two_pass=two_pass)
    by_frame: dict[int, list[PtcpPacket]] = {}
    for p in packets:
        by_frame.setdefault(p.frame, []).append(p)
    assert set(session.batches) == {f for f, ps in by_frame.items() if len(ps) > 1}
    for frame, sent in session.batches.items():
        got = by_frame[frame]
        assert [p.raw for p in got] == sent, frame
        assert sum(len(p.raw) for p in got) == got[0].payload_len
        n = len(sent)
        for i, (p, raw) in enumerate(zip(got, sent, strict=True), start=1):
            assert p.fields["ptcp.batch.index"] == [str(i)]
            assert p.fields["ptcp.batch.count"] == [str(n)]
            assert p.fields["ptcp.batch.segment_size"] == [str(len(sent[0]))]
            hdr = struct.unpack(">5I", raw[4:24])
            assert (int(p.get("ptcp.sent")), int(p.get("ptcp.recv")), int(p.get("ptcp.pid"), 16),
                    int(p.get("ptcp.lmid")), int(p.get("ptcp.rmid"))) == hdr
            body_type = 0x100 if len(raw) == 24 else raw[24]
            assert int(p.get("ptcp.type"), 16) == body_type
            if body_type == 0x10:
                assert int(p.get("ptcp.length")) == len(raw) - 36
    # Frames of one packet carry no batch fields.
    assert all("ptcp.batch.count" not in ps[0].fields
               for f, ps in by_frame.items() if f not in session.batches)
    # Counts per frame as tshark -T fields shows them (one occurrence per packet).
    rows = fields(capture, "ptcp.batch.count", "frame.number", "ptcp.sent", "ptcp.batch.count",
                  two_pass=two_pass)
    assert {int(r[0]): len(r[1].split(",")) for r in rows} == {
        f: len(ps) for f, ps in session.batches.items()
    }


@pytest.mark.parametrize("two_pass", [False, True])
def test_gso_batch_realm_data_goes_to_rtsp_per_packet(
    two_pass: bool, capture: Path, session: Session
) -> None:
    """RTP frames complete in the packet of the batch that holds their last byte, and a
    resent packet inside a batch is flagged and not dissected again."""
    m = session.marks
    packets = {(p.frame, p.index): p for p in ptcp_packets(
        capture, f"frame.number >= {m['gso_rtp']} && frame.number <= {m['gso_resend']}",
        two_pass=two_pass)}
    for key, seqs in session.gso_rtp.items():
        assert packets[key].sub.get("rtp.seq", []) == [str(s) for s in seqs], key
    resent = packets[(m["gso_resend"], 1)]
    assert resent.fields.get("ptcp.retransmission") == ["1"]
    assert resent.after == []
    assert all("ptcp.retransmission" not in p.fields
               for (f, i), p in packets.items() if (f, i) != (m["gso_resend"], 1))
    # The packets between RTP frame ends say they continue in a later packet, and point
    # to the packet that completes them (frame numbers, as Wireshark's links do).
    assert packets[(m["gso_rtp"], 1)].fields["ptcp.realm.port"] == ["554"]
    if two_pass:
        assert packets[(m["gso_rtp"], 1)].fields["ptcp.reassembled_in"] == [str(m["gso_rtp"])]
        assert packets[(m["gso_rtp"], 47)].fields["ptcp.reassembled_in"] == [
            str(m["gso_rtp_next"])
        ]


def test_gso_batch_info_column(capture: Path, session: Session, vectors: dict) -> None:
    m = session.marks
    realm = f"0x{vectors['ptcp']['realm']:08x}"
    info = {int(r[0]): r[1] for r in fields(capture, None, "frame.number", "_ws.col.Info")}
    assert info[m["gso_rtp"]].startswith(
        f"PTCP x49 (GSO batch): data realm {realm} 1280 bytes (continued in a later packet), "
        f"+48 more: 48 data ({47 * 1280 + 1000} bytes): PT=DynamicRTP-Type-96, "
        "SSRC=0xCAFEBABE, Seq=1021,"
    )
    assert info[m["gso_acks"]].startswith("PTCP x50 (GSO batch): ack sent ")
    assert info[m["gso_acks"]].endswith(", +49 more: 49 ack")
    assert info[m["gso_resend"]].startswith(
        f"PTCP x4 (GSO batch): data realm {realm} 1280 bytes (retransmission), "
        f"+3 more: 3 data ({2 * 1280 + 333} bytes): PT=DynamicRTP-Type-96"
    )
    assert info[m["gso_heartbeat_ack"]] == "PTCP x2 (GSO batch): heartbeat, +1 more: 1 ack"
    assert info[m["gso_status_status"]] == (
        f"PTCP x2 (GSO batch): status realm 0x{REALM_HTTP:08x} DISC (closed), "
        "+1 more: 1 status"
    )
    # RTSP leaves a separator after each interleaved frame: never doubled or trailing.
    for frame in session.batches:
        assert ", ," not in info[frame] and not info[frame].rstrip().endswith(",")


def test_datagrams_that_only_look_like_batches_stay_one_packet(
    capture: Path, session: Session
) -> None:
    m = session.marks
    marks = ("lookalike_data", "lookalike_sign", "lookalike_ack", "short_length")
    frames = {m[k] for k in marks}
    expr = " || ".join(f"frame.number == {f}" for f in sorted(frames))
    packets = ptcp_packets(capture, expr)
    assert sorted(p.frame for p in packets) == sorted(frames)
    by = {p.frame: p for p in packets}
    assert all("ptcp.batch.count" not in p.fields and p.offset == 0 and len(p.raw)
               == p.payload_len for p in packets)
    data = by[m["lookalike_data"]]
    assert data.fields["ptcp.realm"] == [f"0x{REALM_PRIV:08x}"]
    assert data.fields["ptcp.length"] == ["108"]
    assert int(by[m["lookalike_sign"]].get("ptcp.type"), 16) == 0x19
    assert int(by[m["lookalike_ack"]].get("ptcp.type"), 16) == 0x50  # unknown type
    assert by[m["short_length"]].fields["ptcp.length"] == ["10"]


# Datagrams for the segment size rules alone, on a conversation of their own:
# (name, payload, PTCP packets expected in it).
def _layouts() -> list[tuple[str, bytes, int]]:
    def pkt(n: int, body: bytes = b"") -> bytes:
        return ptcp_header(n, 0, 0xFFFF, n, 0) + body

    def data(n: int, size: int) -> bytes:
        return pkt(n, data_body(REALM_PRIV, bytes(size)))

    status = status_body(REALM_PRIV, b"CONN")
    return [
        ("64 acks", b"".join(pkt(i) for i in range(64)), 64),
        ("65 acks: more than one GSO send holds", b"".join(pkt(i) for i in range(65)), 1),
        ("2 acks and 10 bytes", pkt(0) + pkt(1) + b"PTCP" + bytes(6), 1),
        ("SYN + SYN", pkt(0, b"\x00\x03\x01\x00") * 2, 2),
        ("status + ack", pkt(0, status) + pkt(1), 2),
        ("status + 14 bytes", pkt(0, status) + b"PTCP" + bytes(10), 1),
        ("3 heartbeats + ack", b"".join(pkt(i, HEARTBEAT_BODY) for i in range(3)) + pkt(3), 4),
        ("3 data + status", b"".join(data(i * 1292, 1280) for i in range(3)) + pkt(9, status), 4),
        ("empty data + heartbeat", data(0, 0) + pkt(12, HEARTBEAT_BODY), 2),
        ("data, length field too long", data(0, 100)[:-50] + pkt(1), 1),
        ("49 data", b"".join(data(i * 1292, 1280) for i in range(49)), 49),
        ("heartbeat + status (longer last)", pkt(0, HEARTBEAT_BODY) + pkt(1, status), 1),
    ]


def test_segment_size_rules(tmp_path: Path) -> None:
    require_tool("tshark")
    layouts = _layouts()
    dgrams = [Datagram(1767323045.0 + i, ("127.0.0.7", 45000 + i), ("127.0.0.8", 46000 + i),
                       payload) for i, (_, payload, _) in enumerate(layouts)]
    cap = write_udp_pcap(tmp_path / "layouts.pcap", dgrams)
    for two_pass in (False, True):
        packets = ptcp_packets(cap, two_pass=two_pass)
        count = {i + 1: 0 for i in range(len(layouts))}
        for p in packets:
            count[p.frame] += 1
        assert {name: count[i + 1] for i, (name, _, _) in enumerate(layouts)} == {
            name: n for name, _, n in layouts
        }
        for p in packets:
            _, payload, n = layouts[p.frame - 1]
            assert p.raw == payload[p.offset : p.offset + len(p.raw)]
        res = tshark(cap, "-Y", "_ws.lua.error || _ws.malformed", two_pass=two_pass)
        assert res.returncode == 0 and res.lines == [] and "Lua Error" not in res.stderr


def test_second_pass_dissects_like_the_first(capture: Path) -> None:
    """Per-packet state: tshark -2 shows the same packets, bodies and realm data."""
    names = ["frame.number", "ptcp.sent", "ptcp.type", "ptcp.batch.index", "ptcp.realm",
             "ptcp.retransmission", "ptcp.out_of_order", "rtp.seq", "rtsp.method",
             "rtsp.status", "http.request.uri", "_ws.col.Info"]
    assert fields(capture, "ptcp", *names) == fields(capture, "ptcp", *names, two_pass=True)


def _fuzz_datagrams(session: Session, seed: int = 7) -> list[Datagram]:
    """Every tunnel packet cut at every length, plus random byte flips."""
    rng = random.Random(seed)
    out: list[Datagram] = []
    ts = 1767323045.0
    for d in session.datagrams:
        if DEVICE not in (d.src, d.dst) and not d.payload.startswith(b"DH"):
            continue
        for cut in range(0, min(len(d.payload), 120)):
            ts += 0.001
            out.append(Datagram(ts, d.src, d.dst, d.payload[:cut]))
        for _ in range(5):
            flipped = bytearray(d.payload)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(4, len(flipped))] = rng.randrange(256)
            ts += 0.001
            out.append(Datagram(ts, d.src, d.dst, bytes(flipped)))
    return out


def test_truncated_and_mutated_packets_raise_no_lua_error(
    session: Session, tmp_path: Path
) -> None:
    require_tool("tshark")
    dgrams = _fuzz_datagrams(session)
    assert len(dgrams) > 2000
    cap = write_udp_pcap(tmp_path / "fuzz.pcap", dgrams, linktype=LINKTYPE_ETHERNET)
    res = tshark(cap, "-V", two_pass=True)
    assert res.returncode == 0, res.stderr
    assert "Lua Error" not in res.stdout + res.stderr
    # Labels and columns built from wire bytes stay valid UTF-8.
    res.raw_stdout.decode("utf-8")
    assert tshark(cap, "-Y", "_ws.lua.error").lines == []
    # Truncated headers are still claimed, as malformed PTCP.
    short = fields(cap, "ptcp.short", "frame.number")
    assert len(short) >= 20


# --------------------------------------------------------------------------- real tunnel


@pytest.fixture
def emulator(request, rtsp_camera):
    """The cloud/device emulator whose device port 554 reaches the test camera.

    Indirect parametrisation passes extra Emulator keyword arguments (impairments).
    """
    from p2p_emulator import Emulator

    options = getattr(request, "param", {})
    with Emulator(port_map={554: (rtsp_camera.host, rtsp_camera.port)}, **options) as emu:
        yield emu


class LoopbackCapture:
    """tshark on lo capturing the emulator's datagrams, plus an end-of-capture sentinel.

    tshark prints a summary line per packet (-P -l); a datagram the test sends to its
    own sentinel port therefore shows when every earlier packet has been written.
    """

    def __init__(self, spawn, emu, path: Path) -> None:
        tshark_exe = require_tool("tshark")
        self.path = path
        self.ports = sorted({port for _, port in emu.addr.values()})
        self.sentinel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sentinel.bind(("127.0.0.1", 0))
        self.sentinel_port = self.sentinel.getsockname()[1]
        ports = [*self.ports, self.sentinel_port]
        capture_filter = "udp and (" + " or ".join(f"port {p}" for p in ports) + ")"
        argv = [tshark_exe, "-n", "-l", "-P", "-i", "lo", "-f", capture_filter, "-w", str(path)]
        try:
            self.proc = spawn(argv, ready=r"Capturing on", timeout=30)
        except AssertionError as exc:  # no capture privileges (CI runs as root)
            self.sentinel.close()
            if os.environ.get("REQUIRE_REAL_PEERS") == "1":
                raise
            pytest.skip(f"cannot capture on lo: {exc}")

    def finish(self) -> None:
        """Wait until everything sent so far is in the file, then stop tshark."""
        try:
            self.sentinel.sendto(b"end of capture", self.sentinel.getsockname())
            port = self.sentinel_port
            self.proc.wait_line(rf"\b{port}\b.*\b{port}\b", timeout=30)
        finally:
            self.sentinel.close()
            self.proc.stop(signal.SIGINT)


def _capture_tunnel_session(
    spawn, emulator, tmp_path: Path, mode: str
) -> tuple[Path, LoopbackCapture, list[list[str]]]:
    """Capture dh_p2p.py through the emulator while ffprobe plays the camera.

    Returns the capture, its recorder and the rows (frame number, protocols, ports) of
    the tunnel's datagrams, the sentinel left out. Checks that no Lua error or
    malformed packet shows up in one or two passes.
    """
    require_tool("ffprobe")
    cap = tmp_path / "tunnel.pcapng"
    capture = LoopbackCapture(spawn, emulator, cap)
    local = free_port()
    tunnel = spawn(
        [sys.executable, str(REPO / "dh_p2p.py"), "--cloud", f"127.0.0.1:{emulator.cloud_port}",
         f"--{mode}", "-p", f"127.0.0.1:{local}:554", emulator.serial],
        ready=r"^ready: ", timeout=60,
    )
    result = play(f"rtsp://127.0.0.1:{local}/cam/realmonitor?channel=1&subtype=0", "ffprobe",
                  "tcp", seconds=3)
    assert result.frames >= 25 and not result.errors, result.output
    # ffprobe has closed its connection: the tunnel closes the realm (DISC both ways).
    deadline = time.monotonic() + 10
    while emulator.open_realms() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tunnel.stop() == 0, tunnel.output
    capture.finish()
    assert emulator.violations == []

    # Every captured datagram on the tunnel's ports (all have an emulator port at one
    # end) is ours, and no Lua error or malformed packet shows up in one or two passes.
    rows = fields(cap, None, "frame.number", "frame.protocols", "udp.srcport", "udp.dstport")
    sentinel = [r for r in rows if int(r[2]) == capture.sentinel_port]
    assert len(sentinel) == 1 and not set(sentinel[0][1].split(":")) & OUR_PROTOCOLS
    rows = [r for r in rows if r not in sentinel]
    assert len(rows) > 100
    assert all({int(r[2]), int(r[3])} & set(capture.ports) for r in rows)
    for two_pass in (False, True):
        res = tshark(cap, "-Y", "_ws.lua.error || _ws.malformed", two_pass=two_pass)
        assert res.returncode == 0 and res.lines == [], res.stdout + res.stderr
        assert "Lua Error" not in res.stderr
    assert_no_misread_packets(cap)
    return cap, capture, rows


# Expert infos that a run of packets misread as one packet would raise (the next
# packet's "PTCP" taken for a body type, or for data past the length field).
MISREAD = "ptcp.unknown_type || ptcp.bad_length || ptcp.short_body || ptcp.short"


def assert_no_misread_packets(cap: Path) -> None:
    """Our peers only send well-formed packets: any of these means a datagram was split
    wrongly (or not at all)."""
    assert fields(cap, MISREAD, "frame.number", "_ws.expert.message") == []


def of_type(packets: list[PtcpPacket], body_type: int) -> list[PtcpPacket]:
    return [p for p in packets if int(p.get("ptcp.type") or "-1", 16) == body_type]


def header_of(p: PtcpPacket) -> tuple[int, ...]:
    """sent, recv, pid, lmid, rmid as dissected."""
    return (int(p.get("ptcp.sent")), int(p.get("ptcp.recv")), int(p.get("ptcp.pid"), 16),
            int(p.get("ptcp.lmid")), int(p.get("ptcp.rmid")))


def check_frames_add_up(packets: list[PtcpPacket]) -> None:
    """The packets of each frame (one, or a GSO batch) fill its UDP payload back to back,
    each dissected from its own bytes, and a batch says how many it holds."""
    by_frame: dict[int, list[PtcpPacket]] = {}
    for p in packets:
        by_frame.setdefault(p.frame, []).append(p)
    for frame, ps in by_frame.items():
        offsets = [0]
        for p in ps:
            offsets.append(offsets[-1] + len(p.raw))
        assert [p.offset for p in ps] == offsets[:-1] and offsets[-1] == ps[0].payload_len, frame
        assert all(p.raw[:4] == b"PTCP" and header_of(p) == struct.unpack(">5I", p.raw[4:24])
                   for p in ps), frame
        if len(ps) > 1:
            assert [p.fields.get("ptcp.batch.count") for p in ps] == [[str(len(ps))]] * len(ps)
            size = len(ps[0].raw)
            assert all(len(p.raw) == size for p in ps[:-1]) and len(ps[-1].raw) <= size
        else:
            assert "ptcp.batch.count" not in ps[0].fields, frame


@pytest.mark.parametrize("mode", ["direct", "relay"])
def test_real_tunnel_session_capture(
    mode: str, spawn, emulator, tmp_path: Path, vectors: dict
) -> None:
    """dh_p2p.py through the emulator, played by ffprobe, captured and dissected."""
    cap, _, rows = _capture_tunnel_session(spawn, emulator, tmp_path, mode)
    assert [r[0] for r in rows if not set(r[1].split(":")) & OUR_PROTOCOLS] == []

    # Packet by packet: a sender using UDP GSO shows runs of packets as one datagram
    # (ptcp.py does; dh-p2p.lua splits them), so a frame may hold several.
    packets = ptcp_packets(cap, "ptcp")
    check_frames_add_up(packets)

    # Known packets: the client's SYNs are the vector's but for lmid, a clock now
    # (PROTOCOLS 2.7 (a)), decoded like it.
    syn = bytes.fromhex(vectors["ptcp"]["syn_hex"])
    client_syns = [p for p in packets if p.raw[24:] == syn[24:] and p.raw[8:12] == bytes(4)]
    assert client_syns, [p.raw.hex() for p in of_type(packets, 0x00)]
    for p in client_syns:
        sent, recv, pid, lmid, rmid = header_of(p)
        assert (sent, recv, pid, rmid) == (0, 0, 0x0002FFFF, 0) and 60_000 <= lmid < 2**31

    # Binds: port 554 on 127.0.0.1, as the emulator saw them; CONN and DISC on the realm.
    binds = of_type(packets, 0x11)
    assert [int(p.get("ptcp.bind.port")) for p in binds] == emulator.binds == [554]
    realm = binds[0].get("ptcp.realm")
    assert binds[0].get("ptcp.bind.ip") == "127.0.0.1"
    statuses = {(p.get("ptcp.realm"), p.get("ptcp.status")) for p in of_type(packets, 0x12)}
    assert statuses == {(realm, "CONN"), (realm, "DISC")}

    # Data bodies: each length field agrees with its packet, all on the bound realm.
    data = of_type(packets, 0x10)
    assert len(data) > 50
    assert all(int(p.get("ptcp.length")) == len(p.raw) - 24 - 12 for p in data)
    assert {p.get("ptcp.realm") for p in data} == {realm}

    # RTSP requests inside realm data, and the interleaved video behind them.
    methods = [m for r in fields(cap, "rtsp.request", "rtsp.method") for m in r[0].split(",")]
    assert methods[:4] == ["OPTIONS", "DESCRIBE", "SETUP", "PLAY"], methods
    rtp = fields(cap, "rtp", "rtp.seq")
    seqs = [int(s) for r in rtp for s in r[0].split(",")]
    assert len(seqs) >= 100
    assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:], strict=False)), seqs


# The emulated device drops, delays and duplicates some of its datagrams and sends stray
# signalling/STUN/junk datagrams on the tunnel socket (as PROTOCOLS 2.5 says happens).
IMPAIRED = {"loss": 0.03, "reorder": 0.03, "duplicate": 0.03, "stray": True, "seed": 5}


@pytest.mark.parametrize("emulator", [IMPAIRED], indirect=True)
def test_impaired_tunnel_capture(spawn, emulator, tmp_path: Path) -> None:
    """Loss, reordering, duplicates and strays: still no Lua error, nothing misread."""
    cap, capture, rows = _capture_tunnel_session(spawn, emulator, tmp_path, "direct")
    # Only the emulator's deliberate junk datagrams are left unclaimed.
    unclaimed = {r[0] for r in rows if not set(r[1].split(":")) & OUR_PROTOCOLS}
    junk = fields(cap, f"!ptcp && !dhp2p && !dhpunch && udp.srcport != {capture.sentinel_port}",
                  "frame.number", "udp.payload")
    assert {r[0] for r in junk} == unclaimed
    assert all(bytes.fromhex(r[1]) == b"\x00\x01garbage" for r in junk)
    # The impairments show: bodies arrived out of order (held) or twice (retransmission).
    held = fields(cap, "ptcp.out_of_order", "frame.number")
    retrans = fields(cap, "ptcp.retransmission", "frame.number")
    assert held or retrans
    # Resent data is never dissected twice (a frame may also hold new packets: look at
    # what each resent packet's data was handed to).
    packets = ptcp_packets(cap, "ptcp")
    check_frames_add_up(packets)
    resent = [p for p in packets if "ptcp.retransmission" in p.fields]
    assert {p.frame for p in resent} == {int(r[0]) for r in retrans}
    assert [(p.frame, p.after) for p in resent if {"rtsp", "rtp"} & set(p.after)] == []
    methods = [m for r in fields(cap, "rtsp.request", "rtsp.method") for m in r[0].split(",")]
    assert methods[:4] == ["OPTIONS", "DESCRIBE", "SETUP", "PLAY"], methods
    # Held bodies are dissected in order once the resent data fills the hole, duplicates
    # are not dissected again: the video reads as continuous as on a clean link.
    seqs = [int(s) for r in fields(cap, "rtp", "rtp.seq") for s in r[0].split(",")]
    assert len(seqs) >= 100
    assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:], strict=False)), seqs


class _DeviceHTTP(http.server.BaseHTTPRequestHandler):
    """The device's HTTP API, as far as these tests need it (PROTOCOLS 2.6)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b"type=IPC-HDW\r\n" if "getDeviceType" in self.path else b"Error\r\n"
        self._reply(200 if body.startswith(b"type") else 404, body)

    def do_POST(self) -> None:  # noqa: N802
        """An upload (as of a firmware or a config file): answers with what it got."""
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._reply(200, f"received {len(data)} bytes {hashlib.sha256(data).hexdigest()}"
                    .encode())

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _capture_http_realm(spawn, tmp_path: Path, exchange: Callable[[str], None]) -> Path:
    """Capture dh_p2p.py with a realm bound to the device's port 80 while
    ``exchange(base_url)`` talks HTTP through it; the realm is closed before the end."""
    from p2p_emulator import Emulator

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DeviceHTTP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Emulator(port_map={80: server.server_address[:2]}) as emu:
            cap = tmp_path / "http.pcapng"
            capture = LoopbackCapture(spawn, emu, cap)
            local = free_port()
            tunnel = spawn(
                [sys.executable, str(REPO / "dh_p2p.py"), "--cloud",
                 f"127.0.0.1:{emu.cloud_port}", "-p", f"127.0.0.1:{local}:80", emu.serial],
                ready=r"^ready: ", timeout=60,
            )
            exchange(f"http://127.0.0.1:{local}")
            deadline = time.monotonic() + 10
            while emu.open_realms() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert tunnel.stop() == 0, tunnel.output
            capture.finish()
            assert emu.violations == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return cap


def test_real_tunnel_http_realm(spawn, tmp_path: Path) -> None:
    """A realm bound to port 80 carries the device's HTTP API: decoded as HTTP."""

    def exchange(base: str) -> None:
        url = f"{base}/cgi-bin/magicBox.cgi?action=getDeviceType"
        with urllib.request.urlopen(url, timeout=20) as reply:
            assert reply.read() == b"type=IPC-HDW\r\n"

    cap = _capture_http_realm(spawn, tmp_path, exchange)
    packets = ptcp_packets(cap, "ptcp")
    check_frames_add_up(packets)
    binds = of_type(packets, 0x11)
    assert [p.get("ptcp.bind.port") for p in binds] == ["80"]
    realm = binds[0].get("ptcp.realm")
    # Per packet: the one whose data HTTP decoded, whatever else shares its frame.
    requests = [(p.sub["http.request.uri"], p.get("ptcp.realm"), p.get("ptcp.realm.port"))
                for p in packets if "http.request.uri" in p.sub]
    assert requests == [(["/cgi-bin/magicBox.cgi?action=getDeviceType"], realm, "80")]
    responses = [(p.sub["http.response.code"], p.get("ptcp.realm"))
                 for p in packets if "http.response.code" in p.sub]
    assert responses == [(["200"], realm)]
    res = tshark(cap, "-Y", "_ws.lua.error || _ws.malformed", two_pass=True)
    assert res.returncode == 0 and res.lines == [], res.stdout + res.stderr
    assert_no_misread_packets(cap)


def test_real_tunnel_upload_in_gso_batches(spawn, tmp_path: Path) -> None:
    """A large upload makes dh_p2p.py send full data packets in GSO runs, which the
    capture on lo shows as one datagram each: split, and the HTTP request reassembled
    across batches and decoded once, in the packet with its last byte."""
    upload = bytes(random.Random(3).randrange(256) for _ in range(400_000))
    digest = hashlib.sha256(upload).hexdigest()

    def exchange(base: str) -> None:
        req = urllib.request.Request(f"{base}/cgi-bin/upload.cgi", data=upload, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=60) as reply:
            assert reply.read() == f"received {len(upload)} bytes {digest}".encode()

    cap = _capture_http_realm(spawn, tmp_path, exchange)
    assert_no_misread_packets(cap)
    packets = ptcp_packets(cap, "ptcp")
    check_frames_add_up(packets)
    bind = of_type(packets, 0x11)[0]
    realm, client = bind.get("ptcp.realm"), bind.src_port
    data = [p for p in of_type(packets, 0x10) if p.src_port == client]
    assert {p.get("ptcp.realm") for p in data} == {realm}
    # The client's data packets carry the upload (and the request head) once.
    sent = [p for p in data if "ptcp.retransmission" not in p.fields]
    assert len(upload) < sum(int(p.get("ptcp.length")) for p in sent) < len(upload) + 1000
    # GSO (Linux, ptcp.py's default) put runs of full data packets into one datagram.
    batched = [p for p in data if "ptcp.batch.count" in p.fields]
    assert len(batched) >= 10, "no data packets in GSO batches"
    assert max(int(p.get("ptcp.batch.count")) for p in batched) > 2
    # HTTP decoded the request once, whole, in the last packet of the upload.
    posts = [p for p in packets if p.sub.get("http.request.method") == ["POST"]]
    assert len(posts) == 1
    assert posts[0].sub["http.content_length_header"] == [str(len(upload))]
    responses = [p.sub["http.response.code"] for p in packets if "http.response.code" in p.sub]
    assert responses == [["200"]]
    res = tshark(cap, "-Y", "_ws.lua.error || _ws.malformed", two_pass=True)
    assert res.returncode == 0 and res.lines == [], res.stdout + res.stderr


def test_retransmission_request_is_out_of_band(
    capture: Path, session: Session, table: dict[int, dict[str, str]]
) -> None:
    """0x0a (PROTOCOLS 2.7 (b)) in any length: named, fields kept, no expert, and not
    counted in the device's stream: its next body is in order, not a retransmission."""
    m = session.marks
    for mark in ("resend_request", "resend_request_bare"):
        row = table[m[mark]]
        assert int(row["ptcp.type"], 16) == 0x0A, mark
        assert row["_ws.expert.message"] == "", (mark, row["_ws.expert.message"])
        assert row["_ws.col.Info"].startswith("PTCP retransmission request from offset "), mark
    assert table[m["resend_request"]]["ptcp.resend"].replace(":", "") == "00085300000000003a00"
    requests = fields(capture, "ptcp.type == 0x0a", "frame.number")
    assert [int(r[0]) for r in requests] == [m["resend_request"], m["resend_request_bare"]]
    after = [int(r[0]) for r in fields(capture, "ptcp.retransmission", "frame.number")]
    device_next = m["disc_dev"]
    assert device_next not in after and m["resend_request"] not in after
    assert table[device_next]["ptcp.status"] == "DISC"


def test_bind_with_the_captured_length_field(session: Session, table: dict[int, dict[str, str]]):
    row = table[session.marks["bind37777"]]
    assert int(row["ptcp.length"]) == 8 and int(row["ptcp.bind.port"]) == 37777
    assert row["_ws.expert.message"] == ""
    assert row["_ws.col.Info"] == f"PTCP bind realm 0x{REALM_PRIV:08x} to 127.0.0.1:37777"
