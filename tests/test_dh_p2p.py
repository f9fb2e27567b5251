"""dh_p2p.py sans-IO parts: the cloud handshake driven by scripted replies, CLI parsing."""

from __future__ import annotations

import random
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dh_p2p
import helpers
import ptcp
from dh_p2p import MAIN, P2PSRV, RELAY, Handshake

CLOUD = ("127.0.0.1", 8800)
P2P = ("127.0.0.1", 8801)
RELAY_SRV = ("127.0.0.1", 8802)
AGENT = ("127.0.0.1", 8803)
DEV_PUB = ("127.0.0.1", 40000)
DEV_LAN = ("127.0.0.1", 40001)
LOCAL = ("127.0.0.1", 5555)
SN = "SN0001"
WALL = 1_767_323_045.0  # the wall clock at start (frozen: no time.time() in the handshake)


def make(**kw) -> Handshake:
    kw.setdefault("rng", random.Random(1))
    return Handshake(SN, CLOUD, LOCAL, **kw)


def sent(hs: Handshake) -> list[tuple[str, tuple[str, int], helpers.Request]]:
    """Parse the signalling requests produced so far (PTCP/STUN left out)."""
    out = []
    for sock, addr, data in hs.datagrams_to_send():
        if data[:2] == b"DH":
            out.append((sock, addr, helpers.parse_request(data)))
    return out


def answer(hs, sock, addr, req, code=200, reason="OK", body=None, now=0.0) -> None:
    hs.receive(sock, addr, helpers.build_reply(code, reason, cseq=req.cseq, body=body), now)


def drive_to_channel(hs: Handshake, now: float = 0.0) -> dict[str, tuple]:
    """Answer every request up to and including /relay/start; return requests by path."""
    hs.start(now, WALL)
    seen: dict[str, tuple] = {}
    bodies = {
        "/probe/p2psrv": None,
        f"/online/p2psrv/{SN}": helpers.xml_body({"US": "127.0.0.1:8801"}),
        f"/info/device/{SN}": helpers.xml_body({"Info": ""}),
        f"/probe/device/{SN}": None,
        "/online/relay": helpers.xml_body({"Address": "127.0.0.1:8802"}),
        "/relay/agent": helpers.xml_body({"Token": "tok1", "Agent": "127.0.0.1:8803"}),
        "/relay/start/tok1": None,
    }
    for _ in range(20):
        batch = sent(hs)
        if not batch:
            break
        for sock, addr, req in batch:
            seen[req.path] = (sock, addr, req)
            if req.path in bodies:
                answer(hs, sock, addr, req, body=bodies[req.path], now=now)
    return seen


# --- signalling -------------------------------------------------------------


def test_first_request_and_retry_schedule() -> None:
    hs = make(retry=dh_p2p.Retry(initial=0.5, cap=4.0, give_up=15.0))
    hs.start(0.0, WALL)
    first = hs.datagrams_to_send()
    assert len(first) == 1
    sock, addr, data = first[0]
    req = helpers.parse_request(data)
    assert (sock, addr, req.method, req.path) == (MAIN, CLOUD, "DHGET", "/probe/p2psrv")
    assert req.cseq == 1
    assert req.wsse_valid(helpers.DEFAULT_CLOUD_USER, helpers.DEFAULT_CLOUD_KEY)
    times = []
    while not hs.done:
        now = hs.next_deadline()
        assert now is not None
        hs.handle_timers(now)
        for _, _, again in hs.datagrams_to_send():
            assert again == data  # a retransmission is the same request, same CSeq
            times.append(now)
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5]
    assert hs.error is not None and hs.error.kind == "unreachable"
    assert "127.0.0.1:8800" in str(hs.error)


def test_unknown_serial_is_offline() -> None:
    hs = make()
    hs.start(0.0, WALL)
    ((sock, addr, req),) = sent(hs)
    answer(hs, sock, addr, req)
    ((sock, addr, req),) = sent(hs)
    assert req.path == f"/online/p2psrv/{SN}"
    answer(hs, sock, addr, req, 404, "Not Found")
    assert hs.error is not None and hs.error.kind == "offline"
    assert SN in str(hs.error)


def test_signalling_order_sockets_and_bodies() -> None:
    hs = make(username="admin", password="pw")
    seen = drive_to_channel(hs)
    assert seen["/probe/p2psrv"][0] == MAIN
    assert seen[f"/probe/device/{SN}"][:2] == (P2PSRV, P2P)
    assert seen["/relay/agent"][:2] == (RELAY, RELAY_SRV)
    sock, addr, start = seen["/relay/start/tok1"]
    assert (sock, addr, start.body) == (RELAY, AGENT, "<body><Client>:0</Client></body>")
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    assert (sock, addr, chan.method) == (MAIN, CLOUD, "DHPOST")
    fields = chan.fields
    assert helpers.parse_identify(fields["Identify"]) == hs.identify
    assert fields["IpEncrptV2"] == "true" and fields["version"] == "5.0.0"
    key = helpers.device_key("admin", "pw", None)
    nonce = int(fields["Nonce"])
    assert helpers.decrypt_local_addr(key, nonce, fields["LocalAddr"]) == "127.0.0.1:5555"
    created = int(fields["CreateDate"])
    assert fields["DevAuth"] == helpers.dev_auth(key, nonce, created, fields["LocalAddr"])
    assert "RandSalt" not in fields  # empty <Info>: no salt of its own
    for name in (MAIN, P2PSRV, RELAY):  # CSeq counts each socket's requests
        cseqs = sorted(req.cseq for sock, _, req in seen.values() if sock == name)
        assert cseqs == list(range(1, len(cseqs) + 1))


def test_plain_channel_body_and_100_trying() -> None:
    hs = make(retry=dh_p2p.Retry(initial=0.5))
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    assert chan.body.startswith("<body><Identify>")
    assert chan.fields["IpEncrpt"] == "true" and chan.fields["LocalAddr"] == "127.0.0.1:5555"
    hs.receive(MAIN, CLOUD, helpers.build_reply(100, "Trying", cseq=chan.cseq), 0.1)
    hs.handle_timers(5.0)
    assert not [d for d in hs.datagrams_to_send() if b"p2p-channel" in d[2]]
    assert not hs.done


def _agent_session() -> ptcp.Session:
    return ptcp.Session(now=0.0, heartbeat_interval=None)


def _pump(hs: Handshake, agent: ptcp.Session, now: float) -> list:
    """Move PTCP datagrams between the handshake and a ptcp.Session playing the agent."""
    events = []
    for _ in range(10):
        moved = False
        for _sock, addr, data in hs.datagrams_to_send():
            if data[:4] == b"PTCP" and addr == AGENT:
                agent.receive_datagram(data, now)
                moved = True
        for ev in agent.events():
            events.append(ev)
            if isinstance(ev, ptcp.CommandReceived) and ev.body_type == 0x17:
                agent.send_command(0x18, b"SIGN1234", now)
            if isinstance(ev, ptcp.CommandReceived) and ev.body_type == 0x19:
                assert ev.payload == b"SIGN1234"
                agent.send_command(0x1A, b"", now)
        for data in agent.datagrams_to_send():
            hs.receive(RELAY, AGENT, data, now)
            moved = True
        if not moved:
            break
    return events


def test_relay_mode_completes_over_the_agent() -> None:
    hs = make(mode="relay")
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    body = helpers.xml_body({"PubAddr": "127.0.0.1:40000", "LocalAddr": "127.0.0.1:40001"})
    answer(hs, sock, addr, chan, body=body)
    ((sock, addr, rc),) = sent(hs)
    assert (sock, addr, rc.path) == (RELAY, CLOUD, f"/device/{SN}/relay-channel")
    assert rc.fields == {"agentAddr": "127.0.0.1:8803"}
    answer(hs, sock, addr, rc)
    hs.receive(MAIN, ("127.0.0.1", 9), b"HTTP/1.1 200 OK\r\nCSeq: 77\r\n\r\n", 0.0)  # stray
    hs.receive(RELAY, AGENT, b"Server Nat Info!", 0.0)
    agent = _agent_session()
    events = _pump(hs, agent, 0.0)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "SynReceived"
    commands = [e.body_type for e in events if isinstance(e, ptcp.CommandReceived)]
    assert commands == [0x17, 0x19, 0x1B]
    assert hs.result is not None
    assert (hs.result.path, hs.result.sock, hs.result.peer) == ("relay", RELAY, AGENT)
    assert hs.result.token == "tok1"
    assert hs.result.relay_cseq == 4  # relay/agent, relay/start, relay-channel, then unbind


def drive_to_punch(hs: Handshake) -> ptcp.Session:
    """Signalling, relay-channel and the agent's sign; returns the agent's session.

    Afterwards the handshake has queued its first punches (not yet collected).
    """
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    body = helpers.xml_body({"PubAddr": "127.0.0.1:40000", "LocalAddr": "127.0.0.1:40001"})
    answer(hs, sock, addr, chan, body=body)
    ((sock, addr, rc),) = sent(hs)
    answer(hs, sock, addr, rc)
    hs.receive(RELAY, AGENT, b"Server Nat Info!", 0.0)
    agent = _agent_session()
    for _sock, _addr, data in hs.datagrams_to_send():
        agent.receive_datagram(data, 0.0)
    agent.events()
    agent.send_command(0x18, b"SIGN1234", 0.0)
    for data in agent.datagrams_to_send():
        hs.receive(RELAY, AGENT, data, 0.0)
    return agent


def test_auto_falls_back_to_relay_when_punch_unanswered() -> None:
    hs = make(mode="auto", punch_timeout=5.0)
    agent = drive_to_punch(hs)
    punches = [(a, helpers.parse_punch(d)) for s, a, d in hs.datagrams_to_send() if s == MAIN]
    assert {a for a, _ in punches} == {DEV_PUB, DEV_LAN}
    for _, msg in punches:
        assert msg.msg_type == helpers.STUN_BINDING_REQUEST
        assert msg.attributes[helpers.ATTR_ICE_CONTROLLING] == hs.identify
        assert msg.attributes[helpers.ATTR_ADDRESS] == DEV_PUB
    now = 0.0
    while hs.direct_path.step == "punch":
        now = hs.next_deadline()
        hs.handle_timers(now)
    assert now == pytest.approx(5.0)
    events = _pump(hs, agent, now)
    assert hs.result is not None and hs.result.path == "relay"
    assert any(isinstance(e, ptcp.CommandReceived) and e.body_type == 0x19 for e in events)


def test_direct_punch_answer_uses_device_transaction_and_local_addr() -> None:
    hs = make(mode="direct")
    drive_to_punch(hs)
    hs.datagrams_to_send()
    tid = bytes(range(12))
    device_req = helpers.StunMessage(1, b"abcd", tid, {helpers.ATTR_ICE_CONTROLLED: hs.identify})
    hs.receive(MAIN, DEV_PUB, device_req.to_wire(), 0.1)
    out = hs.datagrams_to_send()
    answer_msg = helpers.parse_punch(out[0][2])
    assert out[0][:2] == (MAIN, DEV_PUB)
    assert answer_msg.msg_type == helpers.STUN_BINDING_SUCCESS
    assert answer_msg.transaction_id == tid
    assert answer_msg.attributes[helpers.ATTR_ICE_CONTROLLED] == hs.identify
    assert answer_msg.attributes[helpers.ATTR_ADDRESS] == DEV_LAN
    device = ptcp.Session(now=0.1, heartbeat_interval=None)
    for _sock, addr, data in out[1:]:
        assert addr == DEV_PUB
        device.receive_datagram(data, 0.1)
    evs = device.events()
    assert isinstance(evs[0], ptcp.SynReceived)
    assert evs[1] == ptcp.CommandReceived(0x19, b"SIGN1234")
    hs.receive(MAIN, DEV_PUB, device_req.to_wire(), 0.1)  # more punches are skipped
    device.send_command(0x1A, b"", 0.1)
    for data in device.datagrams_to_send():
        hs.receive(MAIN, DEV_PUB, data, 0.1)
    for _sock, _addr, data in hs.datagrams_to_send():
        device.receive_datagram(data, 0.1)
    assert ptcp.CommandReceived(0x1B, b"") in device.events()
    for data in device.datagrams_to_send():
        hs.receive(MAIN, DEV_PUB, data, 0.1)
    assert hs.result is not None
    assert (hs.result.path, hs.result.sock, hs.result.peer) == ("direct", MAIN, DEV_PUB)


@pytest.mark.parametrize("creds", [False, True])
def test_403_names_the_fix(creds: bool) -> None:
    hs = make(**({"username": "admin", "password": "bad"} if creds else {}))
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    answer(hs, sock, addr, chan, 403, "DevPwd_InvalidDigest")
    assert hs.error is not None and hs.error.kind == "auth"
    if creds:
        assert "refused the credentials" in str(hs.error)
    else:
        assert "-u USER and --password PASS" in str(hs.error)


def test_auth_reply_localaddr_is_decrypted() -> None:
    hs = make(mode="direct", username="admin", password="pw")
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    key = helpers.device_key("admin", "pw")
    enc = helpers.encrypt_local_addr(key, 99, "127.0.0.1:40001")
    body = helpers.xml_body({"PubAddr": "127.0.0.1:40000", "LocalAddr": enc, "Nonce": 99})
    answer(hs, sock, addr, chan, body=body)
    assert hs.device_local == DEV_LAN
    ((sock, addr, rc),) = sent(hs)
    fields = rc.fields
    assert fields["Nonce"] == "99"  # relay-channel signs with the device's reply nonce
    assert fields["DevAuth"] == helpers.dev_auth(key, 99, int(fields["CreateDate"]), "")


_junk = st.one_of(
    st.binary(max_size=120),
    st.sampled_from(
        [
            b"PTCP" + bytes(20),
            b"PTCP" + bytes(19),
            b"HTTP/1.1 200 OK\r\nCSeq: 1\r\n\r\n<body><US>x</US></body>",
            b"HTTP/1.1 100 Trying\r\n\r\n",
            b"Server Nat Info!",
            helpers.build_punch_request(bytes(8), ("1.2.3.4", 5)).to_wire(),
        ]
    ),
)


@given(
    st.sampled_from(["channel", "punch"]),
    st.lists(st.tuples(st.sampled_from([MAIN, P2PSRV, RELAY]), _junk), max_size=12),
)
@settings(max_examples=200, deadline=None)
def test_hostile_datagrams_never_crash_the_handshake(stage, items) -> None:
    hs = make(mode="direct")
    if stage == "channel":
        drive_to_channel(hs)
    else:
        drive_to_punch(hs)
    for sock, data in items:
        hs.receive(sock, ("127.0.0.1", 9), data, 0.5)
        hs.handle_timers(0.6)
        hs.datagrams_to_send()
    assert hs.error is None or isinstance(hs.error, dh_p2p.HandshakeError)


# --- CLI helpers ------------------------------------------------------------


def test_parse_forward() -> None:
    assert dh_p2p.parse_forward("1554:554") == dh_p2p.Forward("127.0.0.1", 1554, 554)
    assert dh_p2p.parse_forward("0.0.0.0:80:80") == dh_p2p.Forward("0.0.0.0", 80, 80)
    for bad in ("554", "a:554", "1:2:3:4", "70000:554", "1554:0"):
        with pytest.raises(ValueError):
            dh_p2p.parse_forward(bad)


def test_parse_cloud() -> None:
    assert dh_p2p.parse_cloud("example.com") == ("example.com", 8800)
    assert dh_p2p.parse_cloud("127.0.0.1:9") == ("127.0.0.1", 9)
    with pytest.raises(ValueError):
        dh_p2p.parse_cloud("host:x")


def test_rtsp_url_and_channel_titles() -> None:
    assert (
        dh_p2p.rtsp_url("127.0.0.1", 554, "ad min", None, 2, 1)
        == "rtsp://ad%20min@127.0.0.1/cam/realmonitor?channel=2&subtype=1"
    )
    assert dh_p2p.rtsp_url("127.0.0.1", 1554, None, None).startswith("rtsp://127.0.0.1:1554/")
    assert dh_p2p.rtsp_url("h", 554, "u", "p@ss").startswith("rtsp://u:p%40ss@h/")
    text = "table.ChannelTitle[0].Name=Front\r\ntable.ChannelTitle[1].Name=Back\r\njunk\r\n"
    assert dh_p2p.parse_channel_titles(text) == {1: "Front", 2: "Back"}


def test_help_mentions_env_and_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        dh_p2p.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "DH_P2P_PASSWORD" in out and "--relay" in out and "Exit codes" in out


def test_default_forward_falls_back_when_554_is_not_permitted(monkeypatch, capsys) -> None:
    from conftest import free_port

    real = socket.create_server

    def fake(address, *args, **kw):
        if address[1] == 554:
            raise PermissionError(13, "Permission denied")
        return real(address, *args, **kw)

    monkeypatch.setattr(socket, "create_server", fake)
    client = dh_p2p.Client(dh_p2p.build_parser().parse_args(["SN"]), CLOUD)
    client.fallback_port = free_port()
    try:
        client.open_listeners([dh_p2p.Forward("127.0.0.1", 554, 554, explicit=False)])
        ((_lst, fwd),) = client.listeners
        assert (fwd.local, fwd.remote) == (client.fallback_port, 554)
        assert f"listening on {client.fallback_port} instead" in capsys.readouterr().err
        with pytest.raises(PermissionError):  # an explicit -p 554:554 is not silently moved
            client.open_listeners([dh_p2p.Forward("127.0.0.1", 554, 554)])
    finally:
        client.shutdown()


# --- real networks (PROTOCOLS 2.8) and who may answer (issue: hijack) -----------


def test_udp_sockets_bind_every_interface_unless_the_cloud_is_on_loopback() -> None:
    assert dh_p2p.udp_bind_address("203.0.113.7") == "0.0.0.0"
    assert dh_p2p.udp_bind_address("127.0.0.1") == "127.0.0.1"
    assert dh_p2p.udp_bind_address("203.0.113.7", "192.168.1.20") == "192.168.1.20"
    args = dh_p2p.build_parser().parse_args(["SN"])
    assert args.udp_bind is None and args.local_addr == "all"
    with pytest.raises(SystemExit):
        dh_p2p.build_parser().parse_args(["--bind-any", "SN"])  # gone: the default works


def test_local_addr_lists_interfaces_then_the_egress_address_and_port() -> None:
    fmt = dh_p2p.format_local_addr
    lan = ["192.168.1.10", "10.8.0.2"]
    assert fmt(lan, ("192.168.1.10", 50000)) == "10.8.0.2,192.168.1.10:50000"
    assert fmt([], ("192.168.1.10", 50000)) == "192.168.1.10:50000"
    hs = Handshake(SN, CLOUD, ("192.168.1.10", 5555), lan_addrs=("10.8.0.2",), rng=random.Random(1))
    seen = drive_to_channel(hs)
    assert seen[f"/device/{SN}/p2p-channel"][2].fields["LocalAddr"] == "10.8.0.2,192.168.1.10:5555"


def _to_relay_channel(hs: Handshake):
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    body = helpers.xml_body({"PubAddr": "127.0.0.1:40000", "LocalAddr": "127.0.0.1:40001"})
    answer(hs, sock, addr, chan, body=body)
    ((sock, addr, rc),) = sent(hs)
    return rc


def test_agent_answers_relay_channel_with_an_http_like_reply() -> None:
    hs = make(mode="relay")
    rc = _to_relay_channel(hs)
    # the main server stays silent; the agent sends 100 then 200 with a CSeq of its own
    foreign = rc.cseq + 40
    nat_info = helpers.build_reply(200, "Server Nat Info!", cseq=foreign)
    hs.receive(RELAY, ("127.0.0.1", 9), nat_info, 0.1)
    assert hs.state == "relay_channel"  # not from the agent: ignored
    hs.receive(RELAY, AGENT, helpers.build_reply(100, "Trying", cseq=foreign), 0.1)
    hs.handle_timers(3.0)
    assert not [d for d in hs.datagrams_to_send() if b"relay-channel" in d[2]]  # no resend
    hs.receive(RELAY, AGENT, nat_info, 3.1)
    assert hs.state == "sign"
    _pump(hs, _agent_session(), 3.1)
    assert hs.result is not None and hs.result.path == "relay"


def test_agent_refusing_relay_channel_fails_the_handshake() -> None:
    hs = make(mode="relay", username="admin", password="pw")
    _to_relay_channel(hs)
    hs.receive(RELAY, AGENT, helpers.build_reply(403, "DevPwd_InvalidDigest", cseq=7), 0.1)
    assert hs.error is not None and hs.error.kind == "auth"


def test_reply_from_another_address_answers_nothing() -> None:
    hs = make()
    hs.start(0.0, WALL)
    ((sock, addr, req),) = sent(hs)
    hs.receive(MAIN, ("127.0.0.1", 9999), helpers.build_reply(200, "OK", cseq=req.cseq), 0.0)
    assert not sent(hs) and hs.ignored
    answer(hs, sock, addr, req)
    assert sent(hs)[0][2].path == f"/online/p2psrv/{SN}"


def _punch_from(hs: Handshake, addr, identify: bytes, tid: bytes = bytes(12), now=0.1):
    msg = helpers.StunMessage(1, b"abcd", tid, {helpers.ATTR_ICE_CONTROLLED: identify})
    hs.receive(MAIN, addr, msg.to_wire(), now)
    return [d for d in hs.datagrams_to_send() if d[0] == MAIN]


def test_rogue_punches_are_ignored_and_counted() -> None:
    hs = make(mode="direct")
    drive_to_punch(hs)
    hs.datagrams_to_send()
    # another host, even with our Identify; the device's host without it
    assert _punch_from(hs, ("192.0.2.66", 40000), hs.identify) == []
    assert _punch_from(hs, ("127.0.0.1", 40555), bytes(8)) == []
    attrs = {helpers.ATTR_ICE_CONTROLLED: hs.identify}
    wrong_tid = helpers.StunMessage(0x0101, b"abcd", bytes(12), attrs)
    hs.receive(MAIN, DEV_PUB, wrong_tid.to_wire(), 0.1)  # answers a transaction not ours
    assert [d for d in hs.datagrams_to_send() if d[0] == MAIN] == []
    assert sum(hs.ignored.values()) == 3 and hs.device_peer is None
    # PTCP from a stranger is not our peer either
    hs.receive(MAIN, ("192.0.2.66", 40000), b"PTCP" + bytes(20), 0.1)
    assert sum(hs.ignored.values()) == 4
    # the device, from another port of its public address (its NAT), is taken
    out = _punch_from(hs, ("127.0.0.1", 41234), hs.identify)
    assert out and hs.device_peer == ("127.0.0.1", 41234)


def test_address_only_punch_check_is_a_switch() -> None:
    hs = make(mode="direct", punch_check="address")
    drive_to_punch(hs)
    hs.datagrams_to_send()
    assert _punch_from(hs, ("192.0.2.66", 40000), bytes(8)) == []
    assert _punch_from(hs, DEV_PUB, bytes(8))


def _device_side(hs: Handshake, now: float) -> list[tuple[str, tuple[str, int], bytes]]:
    """Play the device after its punch: 1a for 19, then acknowledge 1b.  Returns
    what the handshake sent elsewhere meanwhile."""
    device = ptcp.Session(now=now, heartbeat_interval=None)
    others = []
    for _ in range(6):
        for sock, addr, data in hs.datagrams_to_send():
            if data[:4] == b"PTCP" and addr == hs.device_peer:
                device.receive_datagram(data, now)
            else:
                others.append((sock, addr, data))
        for ev in device.events():
            if isinstance(ev, ptcp.CommandReceived) and ev.body_type == 0x19:
                device.send_command(0x1A, b"", now)
        for data in device.datagrams_to_send():
            hs.receive(MAIN, hs.device_peer, data, now)
    return others


def test_auto_opens_both_paths_and_prefers_direct_within_the_grace() -> None:
    hs = make(mode="auto", relay_grace=1.5)
    agent = drive_to_punch(hs)
    _pump(hs, agent, 0.2)  # the relay opens first
    assert hs.relay_path.step == "open" and hs.result is None
    punch = helpers.StunMessage(1, b"abcd", bytes(12), {helpers.ATTR_ICE_CONTROLLED: hs.identify})
    hs.receive(MAIN, DEV_PUB, punch.to_wire(), 1.0)
    elsewhere = _device_side(hs, 1.0)
    assert hs.result is not None and hs.result.path == "direct" and hs.result.token is None
    unbind = [helpers.parse_request(d) for s, a, d in elsewhere if s == RELAY and d[:2] == b"DH"]
    assert [r.path for r in unbind] == ["/relay/unbind/tok1"]  # the spare relay released


def test_auto_settles_for_the_relay_after_the_grace() -> None:
    hs = make(mode="auto", relay_grace=1.5, punch_timeout=5.0)
    agent = drive_to_punch(hs)
    _pump(hs, agent, 0.2)
    now = 0.2
    while hs.result is None:
        now = hs.next_deadline()
        hs.handle_timers(now)
        hs.datagrams_to_send()
    assert hs.result.path == "relay" and now == pytest.approx(1.7)


def test_tunnel_with_a_realm_dies_when_the_peer_acknowledges_nothing() -> None:
    s = ptcp.Session(
        now=0.0, heartbeat_interval=5.0, dead_after=120.0, stall_after=20.0, open_timeout=60.0
    )
    s.open_realm(554, now=0.0)
    s.datagrams_to_send()
    now = 0.0
    while not s.dead:
        now = s.next_deadline()
        s.handle_timers(now)
        s.datagrams_to_send()
        if now < 19.0:  # the peer keeps talking (so not silent) but never acknowledges
            s.receive_datagram(ptcp.encode_packet(ptcp.Packet(0, 0, 0xFFFF, 1, 0, None)), now)
    assert s.events()[-1] == ptcp.PeerDead(pytest.approx(now - 19.0, abs=5.1), "stall")
    assert now == pytest.approx(20.0)
    idle = ptcp.Session(now=0.0, heartbeat_interval=5.0, dead_after=120.0, stall_after=20.0)
    now = 0.0
    while now < 60.0:  # heartbeats in flight, never acknowledged, but no realm: exempt
        now = idle.next_deadline()
        idle.handle_timers(now)
        idle.datagrams_to_send()
    assert not idle.dead


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        ({"PubAddr": "example.com:40000", "LocalAddr": "127.0.0.1:40001"}, "not IPv4"),
        ({"PubAddr": "127.0.0.1:40000", "LocalAddr": "10.0.0.1.5:1"}, "not IPv4"),
        ({}, "names no device address"),
    ],
)
def test_device_addresses_must_be_ipv4(fields: dict, expect: str) -> None:
    hs = make(mode="direct")
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    answer(hs, sock, addr, chan, body=helpers.xml_body(fields))
    assert hs.error is not None and expect in str(hs.error)


def test_missing_pub_addr_punches_the_lan_address() -> None:
    hs = make(mode="direct")
    seen = drive_to_channel(hs)
    sock, addr, chan = seen[f"/device/{SN}/p2p-channel"]
    answer(hs, sock, addr, chan, body=helpers.xml_body({"LocalAddr": "127.0.0.1:40001"}))
    assert hs.error is None and hs.device_pub == hs.device_local == DEV_LAN


def test_channel_titles_take_ascii_indexes_only() -> None:
    text = "table.ChannelTitle[0].Name=Front\r\ntable.ChannelTitle[\u00b2].Name=Odd\r\n"
    assert dh_p2p.parse_channel_titles(text) == {1: "Front"}
