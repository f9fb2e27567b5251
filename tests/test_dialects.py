"""helpers.py app profiles (PROTOCOLS 2.7 (c)): both cloud dialects byte for byte,
against tests/data/dialect_vectors.json."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import helpers

VECTORS = json.loads((Path(__file__).parent / "data" / "dialect_vectors.json").read_text())
DEVICE = VECTORS["device"]


def _profile(name: str) -> helpers.AppProfile:
    return helpers.APP_PROFILES[name]


def test_profiles_in_the_order_auto_tries_them() -> None:
    assert list(helpers.APP_PROFILES) == ["smartpss", "dmss"]
    wsse = {v["app"]: v for v in VECTORS["wsse"]}
    for name, profile in helpers.APP_PROFILES.items():
        assert (profile.cloud_user, profile.cloud_key) == (
            wsse[name]["cloud_user"],
            wsse[name]["cloud_key"],
        )


@pytest.mark.parametrize("vec", VECTORS["wsse"], ids=lambda v: v["app"])
def test_wsse_digest_vectors(vec: dict) -> None:
    digest = helpers.wsse_digest(vec["nonce"], vec["created"], vec["cloud_user"], vec["cloud_key"])
    assert digest == vec["digest"]


def test_device_crypto_vectors() -> None:
    key = helpers.device_key(DEVICE["username"], DEVICE["password"], DEVICE["randsalt"])
    assert key == DEVICE["key"].encode()
    assert helpers.derive_addr_key(key, DEVICE["nonce"]).hex() == DEVICE["pbkdf2_hex"]
    for plain, enc, auth in (
        (DEVICE["addr"], DEVICE["enc_addr"], DEVICE["dev_auth"]),
        (DEVICE["addr_list"], DEVICE["enc_addr_list"], DEVICE["dev_auth_list"]),
    ):
        assert helpers.encrypt_local_addr(key, DEVICE["nonce"], plain) == enc
        assert helpers.decrypt_local_addr(key, DEVICE["nonce"], enc) == plain
        assert helpers.dev_auth(key, DEVICE["nonce"], DEVICE["created"], enc) == auth


@pytest.mark.parametrize(
    "vec", VECTORS["requests"], ids=lambda v: f"{v['app']}:{v['path'].rsplit('/', 1)[-1]}"
)
def test_request_bytes_with_header_order(vec: dict) -> None:
    wsse = next(w for w in VECTORS["wsse"] if w["app"] == vec["app"])
    data = helpers.build_request(
        vec["path"],
        vec["cseq"],
        body=vec["body"],
        nonce=wsse["nonce"],
        created=wsse["created"],
        profile=_profile(vec["app"]),
        request_id=vec["request_id"],
        auth=vec["auth"],
    )
    assert data == vec["text"].encode()
    req = helpers.parse_request(data)
    assert req.cseq == vec["cseq"] and req.request_id == vec["request_id"]
    if vec["auth"]:
        assert req.wsse_valid(wsse["cloud_user"], wsse["cloud_key"])


@pytest.mark.parametrize("vec", VECTORS["channel_bodies"], ids=lambda v: v["app"])
def test_p2p_channel_body_vectors(vec: dict) -> None:
    auth = ""
    if vec["auth"]:
        key = DEVICE["key"].encode()
        payload = DEVICE["enc_addr_list"] if vec["auth"] == "list" else DEVICE["enc_addr"]
        auth = helpers.dev_auth_xml(
            key, DEVICE["username"], DEVICE["nonce"], DEVICE["created"], payload, DEVICE["randsalt"]
        )
    body = helpers.p2p_channel_body(
        _profile(vec["app"]),
        identify=bytes.fromhex(vec["identify_hex"]),
        local_addr=vec["local_addr"],
        encrypted=vec["encrypted"],
        auth_xml=auth,
        client_id=vec["client_id"],
    )
    assert body == vec["body"]


def test_dmss_draws_signed_cseq_and_nonce_and_offset_created() -> None:
    dmss, smartpss = _profile("dmss"), _profile("smartpss")
    rng = random.Random(5).randbytes
    cseqs = {dmss.new_cseq(1, rng) for _ in range(200)}
    assert min(cseqs) < 0 < max(cseqs) and all(-(2**31) <= c < 2**31 for c in cseqs)
    assert smartpss.new_cseq(7, rng) == 7
    nonces = [smartpss.new_nonce(rng) for _ in range(200)]
    assert all(0 <= n < 2**31 for n in nonces)
    assert min(dmss.new_nonce(rng) for _ in range(200)) < 0
    assert helpers.wsse_created(0, dmss.created_style) == "1970-01-01T00:00:00+00:00"
    assert helpers.wsse_created(0, smartpss.created_style) == "1970-01-01T00:00:00Z"
    assert len(helpers.new_request_id()) == 32
    assert dmss.sends_request_id("/device/SN/p2p-channel")
    assert not dmss.sends_request_id("/online/p2psrv/SN")
    assert not smartpss.sends_request_id("/device/SN/p2p-channel")


def test_reply_cseq_may_be_signed_or_zero_and_carries_a_request_id() -> None:
    rep = helpers.parse_reply(b"HTTP/1.1 200 OK\r\nx-pcs-request-id: ab\r\nCSeq: 0\r\n\r\n")
    assert rep.cseq == 0 and rep.request_id == "ab"
    assert helpers.parse_reply(b"HTTP/1.1 200 OK\r\nCSeq: -2147483648\r\n\r\n").cseq == -(2**31)
    for bad in (b"2147483648", b"--1", b"1e3", b"\xd9\xa3"):
        rep = helpers.parse_reply(b"HTTP/1.1 200 OK\r\nCSeq: " + bad + b"\r\n\r\n")
        assert rep.cseq is None


def test_request_utility_speaks_either_dialect(capsysbinary) -> None:
    argv = ["request", "--app", "dmss", "/device/X/p2p-channel", "--body", "<b/>"]
    assert helpers.main(argv) == 0
    req = helpers.parse_request(capsysbinary.readouterr().out)
    assert req.method == "NFPOST" and len(req.request_id or "") == 32
    assert req.wsse_valid(helpers.DMSS.cloud_user, helpers.DMSS.cloud_key)
    assert helpers.main(["request", "/probe/p2psrv"]) == 0
    req = helpers.parse_request(capsysbinary.readouterr().out)
    assert (req.method, req.cseq, req.request_id) == ("DHGET", 1, None)
