"""helpers.py: signalling, crypto and punch messages against the golden vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from conftest import load_vectors
from helpers import P2PProtocolError

ROOT = Path(__file__).resolve().parents[1]
VECTORS = load_vectors()
DHP2P = VECTORS["dhp2p"]
AUTH = VECTORS["device_auth"]
INFO = VECTORS["device_info"]
PUNCH = VECTORS["punch"]


# --- requests ---------------------------------------------------------------


def test_wsse_digest_vector() -> None:
    digest = helpers.wsse_digest(
        DHP2P["nonce"], DHP2P["created"], DHP2P["cloud_user"], DHP2P["cloud_key"]
    )
    assert digest == DHP2P["password_digest"]


def test_dhget_request_bytes() -> None:
    data = helpers.build_request(
        "/probe/p2psrv",
        1,
        cloud_user=DHP2P["cloud_user"],
        cloud_key=DHP2P["cloud_key"],
        nonce=DHP2P["nonce"],
        created=DHP2P["created"],
    )
    assert data == bytes.fromhex(DHP2P["probe_request_hex"])


def test_dhpost_request_bytes() -> None:
    data = helpers.build_request(
        "/relay/start/abc",
        7,
        body=DHP2P["post_body"],
        cloud_user=DHP2P["cloud_user"],
        cloud_key=DHP2P["cloud_key"],
        nonce=DHP2P["nonce"],
        created=DHP2P["created"],
    )
    assert data == bytes.fromhex(DHP2P["post_request_hex"])


def test_default_cloud_pair_is_current_one() -> None:
    assert helpers.DEFAULT_CLOUD_USER == DHP2P["cloud_user"]
    assert helpers.DEFAULT_CLOUD_KEY == DHP2P["cloud_key"]


def test_request_roundtrip_and_wsse_check() -> None:
    data = helpers.build_request("/online/p2psrv/SN1", 3, cloud_user="u", cloud_key="k")
    req = helpers.parse_request(data)
    assert (req.method, req.path, req.cseq) == ("DHGET", "/online/p2psrv/SN1", 3)
    assert [name for name, _ in req.headers] == ["CSeq", "Authorization", "X-WSSE"]
    assert req.wsse_valid("u", "k")
    assert not req.wsse_valid("u", "other")
    assert not req.wsse_valid("v", "k")


@pytest.mark.parametrize("text", ["h:\xb2", "h:\u0661", "h:1_0", "h:" + "1" * 5000, "h:-1"])
def test_parse_host_port_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(P2PProtocolError):
        helpers.parse_host_port(text)


@pytest.mark.parametrize(
    ("text", "defaults", "expected"),
    [
        ("10.0.0.5:1554", {}, ("10.0.0.5", 1554)),
        (" [::1]:80 ", {}, ("::1", 80)),
        ("8554", {"default_host": "127.0.0.1"}, ("127.0.0.1", 8554)),
        (":8554", {"default_host": "127.0.0.1"}, ("127.0.0.1", 8554)),
        ("dvr.lan", {"default_port": 554}, ("dvr.lan", 554)),
        ("0", {"default_host": "127.0.0.1", "lowest_port": 0}, ("127.0.0.1", 0)),
    ],
)
def test_split_host_port(text: str, defaults: dict, expected: tuple[str, int]) -> None:
    assert helpers.split_host_port(text, **defaults) == expected


@pytest.mark.parametrize(
    ("text", "defaults"),
    [
        ("8554", {}),  # no host and no default host
        ("dvr.lan", {}),  # no port and no default port
        ("h:99999", {}),
        ("h:0", {}),
        ("h:", {"default_port": 554}),  # a colon promises a port
        ("h:\u0661", {}),
        ("", {"default_port": 554}),
    ],
)
def test_split_host_port_rejects(text: str, defaults: dict) -> None:
    with pytest.raises(ValueError):
        helpers.split_host_port(text, **defaults)


@pytest.mark.parametrize("host", ["1.2.3", "1.2.3.256", "\u0661.2.3.4", " 1.2.3.4", "1_0.2.3.4"])
def test_punch_address_must_be_dotted_ascii_ipv4(host: str) -> None:
    with pytest.raises(ValueError, match="not an IPv4 address"):
        helpers.build_punch_request(bytes(8), (host, 5000)).to_wire()


def test_odd_cseq_and_nonce_are_not_numbers() -> None:
    data = helpers.build_request("/online/p2psrv/SN1", 3, cloud_user="u", cloud_key="k")
    for odd in ("\u0663", "1" * 5000):
        req = helpers.parse_request(data.replace(b"CSeq: 3", f"CSeq: {odd}".encode()))
        assert req.cseq is None
    nonce = helpers.parse_request(data).wsse()["Nonce"]
    odd = f"{nonce[:-1]}_{nonce[-1]}"  # int() reads it as the same number
    forged = data.replace(f'Nonce="{nonce}"'.encode(), f'Nonce="{odd}"'.encode())
    assert not helpers.parse_request(forged).wsse_valid("u", "k")


def test_post_request_parse_has_body_fields() -> None:
    body = helpers.xml_body([("Identify", "1 2 3 4 5 6 7 8"), ("LocalAddr", "127.0.0.1:5")])
    req = helpers.parse_request(helpers.build_request("/device/X/p2p-channel", 2, body=body))
    assert req.method == "DHPOST"
    assert req.header("Content-Type") == ""
    assert req.fields == {"Identify": "1 2 3 4 5 6 7 8", "LocalAddr": "127.0.0.1:5"}


def test_random_nonce_is_below_2_31_and_varies() -> None:
    nonces = set()
    for _ in range(20):
        req = helpers.parse_request(helpers.build_request("/x", 1))
        nonce = int(req.wsse()["Nonce"])
        assert 0 <= nonce < 2**31
        nonces.add(nonce)
    assert len(nonces) > 1


# --- replies ----------------------------------------------------------------


def test_parse_reply_with_fields() -> None:
    body = b"<body><US>127.0.0.1:9000</US><Extra><Deep>x</Deep></Extra></body>"
    data = b"HTTP/1.1 200 OK\r\nCSeq: 4\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    rep = helpers.parse_reply(data)
    assert rep.ok and not rep.provisional and rep.cseq == 4 and rep.reason == "OK"
    assert rep.fields["US"] == "127.0.0.1:9000"
    assert rep.fields["Deep"] == "x"
    assert helpers.parse_host_port(rep.fields["US"]) == ("127.0.0.1", 9000)


def test_parse_reply_100_trying_and_no_body() -> None:
    rep = helpers.parse_reply(b"HTTP/1.1 100 Trying\r\nCSeq: 5\r\n\r\n")
    assert rep.provisional and rep.code == 100 and rep.fields == {}
    rep = helpers.parse_reply(b"HTTP/1.1 404 Not Found\r\n")
    assert rep.code == 404 and not rep.ok


def test_build_reply_roundtrip() -> None:
    body = helpers.xml_body({"Token": "a&b", "Agent": "127.0.0.1:1"})
    rep = helpers.parse_reply(helpers.build_reply(200, "OK", cseq=9, body=body))
    assert rep.cseq == 9 and rep.fields == {"Token": "a&b", "Agent": "127.0.0.1:1"}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"RTSP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n".encode(),
        "HTTP/1.1 200 OK\r\nContent-Length: \u0661\r\n\r\n".encode(),
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n<body/>",
        b"HTTP/1.1 200 OK\r\n\r\n<body><a></body>",
        b'HTTP/1.1 200 OK\r\n\r\n<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]>'
        b"<body>&lol;</body>",
        b"HTTP/1.1 200 OK\r\n\r\n<body>" + b"<a>" * 20000 + b"</body>",
        b"Server Nat Info!",
    ],
)
def test_parse_reply_rejects_bad_input(data: bytes) -> None:
    with pytest.raises(P2PProtocolError):
        helpers.parse_reply(data)


@given(st.binary(max_size=300))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_reply_parser_raises_only_its_error(data: bytes) -> None:
    for parse in (helpers.parse_reply, helpers.parse_request):
        try:
            parse(data)
        except P2PProtocolError:
            pass


_xmlish = st.lists(
    st.sampled_from(
        ["<body>", "</body>", "<a>", "</a>", "<!DOCTYPE x>", "&amp;", "&x;", "<b/>", "\x00", "é"]
        + ["HTTP/1.1 200 OK\r\n", "Content-Length: 3\r\n", "\r\n", "<![CDATA[", "]]>", "<?p?>"]
    ),
    max_size=30,
).map("".join)


@given(st.text(max_size=40) | _xmlish)
@settings(max_examples=300)
def test_reply_parser_on_text_raises_only_its_error(text: str) -> None:
    for data in (text.encode(), b"HTTP/1.1 200 OK\r\n\r\n" + text.encode()):
        try:
            helpers.parse_reply(data)
        except P2PProtocolError:
            pass


# --- device credentials -----------------------------------------------------


def test_device_key_vector() -> None:
    key = helpers.device_key(AUTH["username"], AUTH["password"], AUTH["randsalt"])
    assert key == AUTH["key"].encode()
    assert helpers.device_key(AUTH["username"], AUTH["password"], None) == key  # default salt


def test_local_addr_encryption_vector() -> None:
    key = AUTH["key"].encode()
    enc = helpers.encrypt_local_addr(key, AUTH["nonce"], AUTH["plain_addr"])
    assert enc == AUTH["enc_addr_b64"]
    assert helpers.decrypt_local_addr(key, AUTH["nonce"], enc) == AUTH["plain_addr"]


def test_dev_auth_xml_vectors() -> None:
    key = AUTH["key"].encode()
    with_payload = helpers.dev_auth_xml(
        key,
        AUTH["username"],
        AUTH["nonce"],
        AUTH["created"],
        AUTH["enc_addr_b64"],
        AUTH["randsalt"],
    )
    assert with_payload == AUTH["auth_xml_with_payload"]
    no_payload = helpers.dev_auth_xml(key, AUTH["username"], AUTH["nonce"], AUTH["created"])
    assert no_payload == AUTH["auth_xml_no_payload"]
    no_salt = helpers.dev_auth_xml(key, "admin", 42, 1767323045, randsalt=None)
    assert no_salt == AUTH["auth_xml_no_payload"].replace(
        f"<RandSalt>{AUTH['randsalt']}</RandSalt>", ""
    )


def test_decrypt_local_addr_bad_input() -> None:
    with pytest.raises(P2PProtocolError):
        helpers.decrypt_local_addr(b"K", 1, "not base64!!")


def test_info_vector() -> None:
    info = helpers.decrypt_info(INFO["info_b64"])
    assert info == json.loads(INFO["plain_json"])
    assert helpers.encrypt_info(INFO["plain_json"]) == INFO["info_b64"]
    assert helpers.decrypt_info("") == {}


@pytest.mark.parametrize("blob", ["@@@", "AAAA", helpers.encrypt_info("[1, 2]")])
def test_info_bad_input(blob: str) -> None:
    with pytest.raises(P2PProtocolError):
        helpers.decrypt_info(blob)


# --- identify ---------------------------------------------------------------


def test_identify_format_without_zero_padding() -> None:
    ident = bytes.fromhex(PUNCH["identify_hex"])
    assert helpers.format_identify(ident) == "0 11 22 33 44 55 66 77"
    assert helpers.format_identify(b"\x0a\x00\xff\x01\x02\x03\x04\x05") == "a 0 ff 1 2 3 4 5"
    assert helpers.parse_identify("0 11 22 33 44 55 66 77") == ident


@given(st.binary(min_size=8, max_size=8))
def test_identify_roundtrip(ident: bytes) -> None:
    assert helpers.parse_identify(helpers.format_identify(ident)) == ident


@pytest.mark.parametrize("text", ["", "1 2 3", "1 2 3 4 5 6 7 100", "g 1 2 3 4 5 6 7"])
def test_identify_bad(text: str) -> None:
    with pytest.raises(P2PProtocolError):
        helpers.parse_identify(text)


def test_new_identify_is_random() -> None:
    assert len(helpers.new_identify()) == 8
    assert helpers.new_identify() != helpers.new_identify()


# --- punch ------------------------------------------------------------------

COOKIE = bytes.fromhex("01020304")
TID = bytes.fromhex("a1a2a3a4a5a6a7a8a9aaabac")


def test_punch_request_vector() -> None:
    ident = bytes.fromhex(PUNCH["identify_hex"])
    msg = helpers.build_punch_request(
        ident, ("203.0.113.7", 40000), cookie=COOKIE, transaction_id=TID
    )
    assert msg.to_bytes() == bytes.fromhex(PUNCH["request_plain_hex"])
    assert msg.to_wire() == bytes.fromhex(PUNCH["request_wire_hex"])


def test_punch_response_vector() -> None:
    ident = bytes.fromhex(PUNCH["identify_hex"])
    msg = helpers.build_punch_response(ident, ("192.168.1.64", 50001), COOKIE, TID)
    assert msg.to_bytes() == bytes.fromhex(PUNCH["response_plain_hex"])
    assert msg.to_wire() == bytes.fromhex(PUNCH["response_wire_hex"])


def test_punch_parse_vectors() -> None:
    req = helpers.parse_punch(bytes.fromhex(PUNCH["request_wire_hex"]))
    assert req.msg_type == helpers.STUN_BINDING_REQUEST
    assert req.cookie == COOKIE and req.transaction_id == TID
    assert req.attributes[helpers.ATTR_ICE_CONTROLLING] == bytes.fromhex(PUNCH["identify_hex"])
    assert req.attributes[helpers.ATTR_ADDRESS] == ("203.0.113.7", 40000)
    rsp = helpers.parse_punch(bytes.fromhex(PUNCH["response_wire_hex"]))
    assert rsp.msg_type == helpers.STUN_BINDING_SUCCESS
    assert rsp.attributes[helpers.ATTR_ADDRESS] == ("192.168.1.64", 50001)
    assert helpers.looks_like_punch(bytes.fromhex(PUNCH["response_wire_hex"]))
    # The plain (non-inverted) form, PTCP and HTTP text are not punches.
    assert not helpers.looks_like_punch(bytes.fromhex(PUNCH["response_plain_hex"]))
    assert not helpers.looks_like_punch(b"PTCP" + bytes(20))
    assert not helpers.looks_like_punch(b"HTTP/1.1 200 OK\r\n\r\n")


def test_punch_unknown_attribute_kept_raw_and_padded() -> None:
    msg = helpers.StunMessage(1, COOKIE, TID, {0x0022: b"abcde"})
    data = msg.to_bytes()
    assert len(data) == 20 + 4 + 8
    assert helpers.StunMessage.parse(data).attributes == {0x0022: b"abcde"}


@given(st.binary(max_size=80))
@settings(max_examples=500)
def test_stun_parser_raises_only_its_error(data: bytes) -> None:
    for parse in (helpers.parse_punch, helpers.StunMessage.parse):
        try:
            parse(data)
        except P2PProtocolError:
            pass


@given(st.binary(min_size=0, max_size=60))
@settings(max_examples=300)
def test_stun_parser_on_valid_header_random_attrs(attrs: bytes) -> None:
    length = len(attrs) + (-len(attrs) % 4)
    data = bytes.fromhex("0001") + length.to_bytes(2, "big") + COOKIE + TID
    data += attrs + bytes(-len(attrs) % 4)
    try:
        helpers.StunMessage.parse(data)
    except P2PProtocolError:
        pass


# --- CLI --------------------------------------------------------------------


def test_cli_request_and_info() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "helpers.py"), "request", "/probe/p2psrv"],
        capture_output=True,
        check=True,
    ).stdout
    assert out.startswith(b"DHGET /probe/p2psrv HTTP/1.1\r\nCSeq: 1\r\n")
    assert helpers.main(["info", INFO["info_b64"]]) == 0
    assert helpers.main(["info", "@@"]) == 1


def test_cli_encrypt_addr_uses_env_password(monkeypatch, capsys) -> None:
    monkeypatch.setenv("DH_P2P_PASSWORD", AUTH["password"])
    argv = ["encrypt-addr", "-u", "admin", "--nonce", "42", "--randsalt", AUTH["randsalt"]]
    argv.append(AUTH["plain_addr"])
    assert helpers.main(argv) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"nonce=42 LocalAddr={AUTH['enc_addr_b64']}"
    assert AUTH["key"] not in out and AUTH["password"] not in out
    monkeypatch.delenv("DH_P2P_PASSWORD")
    assert helpers.main(["encrypt-addr", AUTH["plain_addr"]]) == 2
