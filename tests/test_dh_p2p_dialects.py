"""Cloud dialects in dh_p2p.py (PROTOCOLS 2.7 (c)): the DMSS identity, --app auto's
fallback on a 404, replies matched by x-pcs-request-id, the sign exchange skipped
for 2024+ firmware; sans-IO first, then real RTSP clients through the emulator."""

from __future__ import annotations

import random
import signal
import socket
from collections.abc import Callable, Iterator

import pytest
from _dissector_support import fields
from _p2p_support import dh_p2p_argv
from _ptcp_support import EchoServer
from hypothesis import given, settings
from hypothesis import strategies as st

import dh_p2p
import helpers
import ptcp
from conftest import free_port, play, require_tool
from dh_p2p import MAIN, CloudIdentity, Handshake, PathStep, Step
from helpers import ExitCode
from p2p_emulator import Emulator
from pcap import Datagram, write_udp_pcap

SMARTPSS_CLOUD = ("127.0.0.1", 8800)
DMSS_CLOUD = ("127.0.0.1", 8900)
P2P = "127.0.0.1:8801"
DEV_PUB = ("127.0.0.1", 40000)
LOCAL = ("127.0.0.1", 5555)
SN = "SN0001"
WALL = 1_788_688_800.0  # 2026-09-06T10:00:00Z

SMARTPSS = CloudIdentity.of(helpers.SMARTPSS, SMARTPSS_CLOUD)
DMSS = CloudIdentity.of(helpers.DMSS, DMSS_CLOUD)


def make(*identities: CloudIdentity, **kw) -> Handshake:
    kw.setdefault("rng", random.Random(3))
    return Handshake(SN, identities[0].cloud, LOCAL, identities=identities, **kw)


def requests(hs: Handshake) -> list[tuple[str, tuple[str, int], helpers.Request, bytes]]:
    """The signalling requests sent so far (PTCP and punches left out)."""
    out = []
    for sock, addr, data in hs.datagrams_to_send():
        if data[:2] in (b"DH", b"NF"):
            out.append((sock, addr, helpers.parse_request(data), data))
    return out


def reply_to(req: helpers.Request, code=200, reason="OK", body=None, **kw) -> bytes:
    """A reply as the cloud sends it: the request's x-pcs-request-id (and CSeq 0)
    where it carried one, else its CSeq."""
    if req.request_id is not None:
        kw.setdefault("cseq", 0)
        kw.setdefault("request_id", req.request_id)
    else:
        kw.setdefault("cseq", req.cseq)
    return helpers.build_reply(code, reason, body=body, **kw)


def channel_reply_body(version: str) -> str:
    return helpers.xml_body({"PubAddr": "127.0.0.1:40000", "LocalAddr": "127.0.0.1:40001",
                             "version": version})  # fmt: skip


def serve(hs: Handshake, answers: dict[str, tuple], now: float = 0.0) -> list[helpers.Request]:
    """Answer requests by path ending with (code, body) until none are left; return
    every request seen, in order."""
    seen = []
    for _ in range(30):
        batch = requests(hs)
        if not batch:
            break
        for sock, addr, req, _data in batch:
            seen.append(req)
            for end, (code, body) in answers.items():
                if req.path.endswith(end):
                    hs.receive(sock, addr, reply_to(req, code, "OK", body), now)
                    break
    return seen


DMSS_ANSWERS = {
    "/online/stun": (200, None),
    "/probe/p2psrv": (200, None),
    f"/online/p2psrv/{SN}": (200, helpers.xml_body({"US": P2P})),
    f"/probe/device/{SN}": (200, None),
}


# --- the DMSS dialect on the wire ------------------------------------------------


def test_dmss_requests_warm_up_then_speak_the_dialect_with_the_frozen_clock() -> None:
    hs = make(DMSS)
    hs.start(0.0, WALL)
    seen = serve(hs, DMSS_ANSWERS, now=2.0)
    assert [r.path for r in seen] == [
        "/online/stun", "/probe/p2psrv", f"/online/p2psrv/{SN}", f"/probe/device/{SN}",
        f"/device/{SN}/p2p-channel",
    ]  # fmt: skip
    warmup, probe, *_, channel = seen
    assert [n for n, _ in warmup.headers] == ["X-ToUType", "CSeq"] and not warmup.wsse()
    assert probe.method == "NFGET" and probe.request_id is None
    assert [n for n, _ in probe.headers] == [
        "X-Version", "X-Sversion", "X-ToUType", "CSeq", "Authorization", "X-WSSE",
    ]  # fmt: skip
    assert probe.wsse_valid(helpers.DMSS.cloud_user, helpers.DMSS.cloud_key)
    assert probe.wsse()["Created"] == "2026-09-06T10:00:00+00:00"  # WALL, not time.time()
    assert channel.method == "NFPOST" and len(channel.request_id or "") == 32
    assert [n for n, _ in channel.headers][:4] == [
        "X-Version", "X-Sversion", "x-pcs-request-id", "X-ToUType",
    ]  # fmt: skip
    fields = channel.fields
    assert helpers.parse_identify(fields["Identify"]) == hs.identify
    assert all(len(part) == 2 for part in fields["Identify"].split())
    assert (fields["NatValueT"], fields["version"], fields["Pid"]) == ("0", "6.7.15", "0")
    assert fields["ClientId"].endswith(f":{LOCAL[1]}")
    assert wsse_created(channel) == "2026-09-06T10:00:02+00:00"  # the clock carried forward


def wsse_created(req: helpers.Request) -> str:
    return req.wsse()["Created"]


def test_dmss_with_credentials_refuses_to_sign_without_the_device_salt() -> None:
    hs = make(DMSS, username="admin", password="pw")
    hs.start(0.0, WALL)
    serve(hs, {**DMSS_ANSWERS, f"/info/device/{SN}": (200, helpers.xml_body({"Info": ""}))})
    assert hs.error is not None and hs.error.kind == "auth"
    assert "no salt" in str(hs.error)


def _to_channel(hs: Handshake) -> tuple[str, tuple[str, int], helpers.Request]:
    """Run the DMSS signalling up to the unanswered p2p-channel request."""
    hs.start(0.0, WALL)
    serve(hs, DMSS_ANSWERS)
    pending = hs._pending[Step.P2P_CHANNEL]
    return pending.sock, pending.addr, helpers.parse_request(pending.data)


def test_reply_matched_by_request_id_even_with_cseq_zero() -> None:
    hs = make(DMSS, mode="direct")
    sock, addr, channel = _to_channel(hs)
    body = channel_reply_body("6.1.0")
    foreign = reply_to(channel, 200, "OK", body, request_id="f" * 32)
    hs.receive(sock, addr, foreign, 0.1)
    assert hs.channel_reply is None and hs.ignored  # not ours, though CSeq 0 like ours
    hs.receive(sock, addr, reply_to(channel, 100, "Trying"), 0.1)
    hs.receive(sock, addr, reply_to(channel, 200, "OK", body), 0.2)
    assert hs.channel_reply is not None and hs.sign_exchange is False


def test_final_error_with_the_servers_request_id_ends_the_request() -> None:
    hs = make(DMSS)
    sock, addr, channel = _to_channel(hs)
    hs.receive(sock, addr, reply_to(channel, 403, "DevPwd_InvalidDigest", request_id="e" * 32), 1)
    assert hs.error is not None and hs.error.kind == "auth"


# --- 2024+ firmware: no sign exchange ----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "version", "wanted"),
    [
        ("auto", "5.0.0", True), ("auto", "", True), ("auto", "6.2.1", False),
        ("auto", " 7.0", False), ("always", "6.2.1", True), ("never", "5.0.0", False),
    ],
)  # fmt: skip
def test_sign_exchange_choice(mode: str, version: str, wanted: bool) -> None:
    assert dh_p2p.sign_exchange_wanted(mode, version) is wanted


def test_2024_firmware_opens_the_direct_path_with_a_bare_syn(caplog) -> None:
    hs = make(DMSS)
    sock, addr, channel = _to_channel(hs)
    with caplog.at_level("INFO", logger="dh_p2p"):
        hs.receive(sock, addr, reply_to(channel, 200, "OK", channel_reply_body("6.1.0")), 0.3)
    assert "without the sign exchange (--sign auto)" in caplog.text
    out = hs.datagrams_to_send()
    assert not [d for _s, _a, d in out if d[:2] == b"NF"]  # DMSS asks for no relay
    assert hs.direct_path.step == PathStep.PUNCH and hs.relay_path.step == PathStep.IDLE
    punch = helpers.StunMessage(1, b"abcd", bytes(12), {helpers.ATTR_ICE_CONTROLLED: hs.identify})
    hs.receive(MAIN, DEV_PUB, punch.to_wire(), 0.4)
    device = ptcp.Session(now=0.4, heartbeat_interval=None)
    for _sock, to, data in hs.datagrams_to_send():
        if data[:4] == ptcp.MAGIC:
            assert to == DEV_PUB
            device.receive_datagram(data, 0.4)
    assert [type(e) for e in device.events()] == [ptcp.SynReceived]  # no 0x19
    assert hs.direct_path.step == PathStep.SYN
    for data in device.datagrams_to_send():
        hs.receive(MAIN, DEV_PUB, data, 0.5)
    assert hs.result is not None and hs.result.path == "direct"
    assert hs.result.sign_exchange is False and hs.result.identity == DMSS
    assert not requests(hs)  # no local-channel: without device credentials it has no body


def test_older_firmware_under_dmss_gets_its_sign_from_a_relay_agent() -> None:
    hs = make(DMSS)
    sock, addr, channel = _to_channel(hs)
    hs.receive(sock, addr, reply_to(channel, 200, "OK", channel_reply_body("5.0.0")), 0.3)
    ((_sock, to, relay, _data),) = requests(hs)
    assert (to, relay.method, relay.path) == (DMSS_CLOUD, "NFGET", "/online/relay")
    assert hs.sign_exchange is True and hs.direct_path.step == PathStep.IDLE


# --- which identity: --app auto, an explicit app ------------------------------------


def test_auto_falls_back_to_dmss_on_a_404_for_the_serial() -> None:
    hs = make(SMARTPSS, DMSS)
    hs.start(0.0, WALL)
    ((sock, addr, probe, _),) = requests(hs)
    hs.receive(sock, addr, reply_to(probe), 0.0)
    ((sock, addr, online, _),) = requests(hs)
    hs.receive(sock, addr, reply_to(online, 404, "Not Found"), 0.0)
    after = requests(hs)
    assert [(a, r.method, r.path) for _s, a, r, _d in after] == [
        (DMSS_CLOUD, "NFGET", "/online/stun"), (DMSS_CLOUD, "NFGET", "/probe/p2psrv"),
    ]  # fmt: skip
    assert hs.identity == DMSS and hs.error is None


def test_auto_falls_back_on_a_404_for_p2p_channel_and_names_both_clouds() -> None:
    answers = {
        **DMSS_ANSWERS,
        "/online/relay": (200, helpers.xml_body({"Address": "127.0.0.1:8802"})),
        "/relay/agent": (200, helpers.xml_body({"Token": "t", "Agent": "127.0.0.1:8803"})),
    }
    hs = make(SMARTPSS, DMSS)
    hs.start(0.0, WALL)
    seen = serve(hs, answers)  # SmartPSS's p2p-channel left unanswered, its relay allocated
    channel = hs._pending[Step.P2P_CHANNEL]
    hs.receive(channel.sock, channel.addr, reply_to(helpers.parse_request(channel.data), 404), 0)
    seen += serve(hs, {**answers, "/p2p-channel": (404, None)})
    channels = [r.method for r in seen if r.path.endswith("/p2p-channel")]
    assert channels == ["DHPOST", "NFPOST"]
    unbinds = [r.method for r in seen if r.path == "/relay/unbind/t"]
    assert unbinds == ["DHGET"]  # SmartPSS's relay, allocated in parallel, released
    assert [i.profile.name for i in hs.tried] == ["smartpss", "dmss"]
    assert hs.error is not None and hs.error.kind == "offline"
    assert "unknown to the SmartPSS and the DMSS cloud" in str(hs.error)
    assert "bound to another cloud" in str(hs.error)


@pytest.mark.parametrize(("other_says", "kind"), [(200, "wrong_app"), (404, "offline")])
def test_explicit_app_asks_the_other_identity_to_explain_a_404(other_says, kind) -> None:
    hs = make(SMARTPSS, diagnose=(DMSS,))
    hs.start(0.0, WALL)
    ((sock, addr, probe, _),) = requests(hs)
    hs.receive(sock, addr, reply_to(probe), 0.0)
    ((sock, addr, online, _),) = requests(hs)
    hs.receive(sock, addr, reply_to(online, 404, "Not Found"), 0.0)
    ((sock, addr, ask, _),) = requests(hs)
    assert (addr, ask.method, ask.path) == (DMSS_CLOUD, "NFGET", f"/online/p2psrv/{SN}")
    assert ask.wsse_valid(helpers.DMSS.cloud_user, helpers.DMSS.cloud_key)
    hs.receive(sock, addr, reply_to(ask, other_says, "x", helpers.xml_body({"US": P2P})), 0.1)
    assert hs.error is not None and hs.error.kind == kind
    if kind == "wrong_app":
        assert str(hs.error) == (
            f"device {SN} is bound to the DMSS app's cloud, not to SmartPSS's: "
            "use --app dmss (or --app auto)"
        )


def test_cli_plans_identities_from_app_cloud_and_pair() -> None:
    parse = dh_p2p.build_parser().parse_args
    auto, diag = dh_p2p.plan_identities(parse(["--cloud", "dmss=10.0.0.2:9", "SN"]))
    assert [i.profile.name for i in auto] == ["smartpss", "dmss"] and diag == []
    assert auto[0].cloud == (helpers.SMARTPSS.host, 8800) and auto[1].cloud == ("10.0.0.2", 9)
    args = parse(["--app", "dmss", "--cloud", "h:1", "--cloud-user", "u", "--cloud-key", "k", "SN"])
    (dmss,), (smartpss,) = dh_p2p.plan_identities(args)
    assert (dmss.cloud, dmss.cloud_user, dmss.cloud_key) == (("h", 1), "u", "k")
    assert smartpss.cloud_user == helpers.SMARTPSS.cloud_user
    assert smartpss.cloud == ("www.easy4ipcloud.com", 8800)
    args = parse(["--cloud", "h:2", "--cloud-user", "u", "SN"])
    (first, second), _ = dh_p2p.plan_identities(args)
    assert (first.cloud, first.cloud_user) == (("h", 2), "u")  # auto: smartpss is in use
    assert second.cloud_user == helpers.DMSS.cloud_user
    for bad in (["--cloud", "icsee=h:1"], ["--cloud", "dmss=h:x"]):
        with pytest.raises(ValueError):
            dh_p2p.plan_identities(parse([*bad, "SN"]))
    others = set(ExitCode) - {ExitCode.WRONG_APP}
    assert dh_p2p.EXIT_WRONG_APP == ExitCode.WRONG_APP and dh_p2p.EXIT_WRONG_APP not in others


def test_relay_teardown_speaks_the_identitys_dialect() -> None:
    unbind = helpers.parse_request(dh_p2p.unbind_request("tok", 4, DMSS))
    assert (unbind.method, unbind.path) == ("NFGET", "/relay/unbind/tok")
    assert unbind.wsse_valid(helpers.DMSS.cloud_user, helpers.DMSS.cloud_key)
    assert helpers.parse_request(dh_p2p.unbind_request("tok", 4, SMARTPSS)).cseq == 4


# --- against the emulator ---------------------------------------------------------------


@pytest.fixture
def emulator() -> Iterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make_emulator(**kw) -> Emulator:
        emu = Emulator(seed=15, **kw).start()
        made.append(emu)
        return emu

    yield make_emulator
    for emu in made:
        emu.close()


def test_dmss_bound_device_with_app_smartpss_says_so(spawn, emulator) -> None:
    emu = emulator(app="dmss")
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{free_port()}:554")
    proc = spawn([*argv[:-1], "--app", "smartpss", "--retries", "0", argv[-1]])
    assert proc.wait(30) == dh_p2p.EXIT_WRONG_APP == ExitCode.WRONG_APP == 7
    assert proc.lines == [
        f"dh_p2p: device {emu.serial} is bound to the DMSS app's cloud, not to SmartPSS's: "
        "use --app dmss (or --app auto)"
    ]
    assert emu.violations == []


def test_unknown_serial_with_an_explicit_app_is_exit_3_after_both(spawn, emulator) -> None:
    emu = emulator()
    argv = dh_p2p_argv(emu.cloud_port, "NOSUCHSERIAL", "-p", f"127.0.0.1:{free_port()}:554")
    proc = spawn([*argv[:-1], "--app", "dmss", "--retries", "0", argv[-1]])
    assert proc.wait(30) == 3
    assert "unknown to the DMSS and the SmartPSS cloud" in proc.output
    assert emu.violations == []


def test_sign_exchange_with_2024_firmware_gets_binds_but_no_data(spawn, emulator) -> None:
    service = socket.create_server(("127.0.0.1", 0))
    emu = emulator(fw2024=True, port_map={9000: service.getsockname()[:2]})
    local = free_port()
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{local}:9000")
    spawn([*argv[:-1], "--sign", "always", "--direct", argv[-1]], ready=r"^ready:", timeout=30)
    with socket.create_connection(("127.0.0.1", local), timeout=10) as conn, service:
        conn.sendall(b"hello")
        service.settimeout(2.0)  # a negative check: nothing may arrive
        with pytest.raises(TimeoutError):
            service.accept()  # the made-up CONN opened no connection to the service
    sessions = emu.call(lambda: [s for s in emu.sessions.values() if s.role == "device"])
    device = [s.routes_nothing for s in sessions]
    assert device == [True] and emu.call(lambda: list(emu.binds)) == [9000]


CASES = {
    "dmss-bound": ({"app": "dmss"}, [], "DMSS"),
    "smartpss-bound": ({}, [], "SmartPSS"),
    "2024-firmware": ({"fw2024": True}, [], "SmartPSS"),
    "dmss-2024-firmware": ({"app": "dmss", "fw2024": True}, [], "DMSS"),
    "dmss-bound-with-credentials": (
        {"app": "dmss", "auth": ("admin", "admin123")},
        ["-u", "admin", "--password", "admin123"],
        "DMSS",
    ),
}


@pytest.mark.real_peer
@pytest.mark.parametrize("case", list(CASES))
def test_video_plays_with_default_flags(spawn, emulator, request, case: str) -> None:
    options, args, label = CASES[case]
    camera = request.getfixturevalue("rtsp_camera_auth" if "auth" in options else "rtsp_camera")
    emu = emulator(port_map={554: (camera.host, camera.port)}, **options)
    local = free_port()
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{local}:554", *args)
    proc = spawn(argv, ready=r"^ready:", timeout=40)
    assert f"cloud: the device answered the {label} identity" in proc.output
    result = play(camera.url().replace(f"{camera.host}:{camera.port}", f"127.0.0.1:{local}"))
    assert result.frames >= 50 and not result.errors, result.output[-3000:]
    assert proc.stop(signal.SIGTERM) == 0
    assert "admin123" not in proc.output
    assert emu.violations == []
    punished = emu.call(lambda: [s for s in emu.sessions.values() if s.routes_nothing])
    assert punished == []
    # DMSS sends local-channel once set up, when it has device credentials to sign it
    wanted = int(options.get("app") == "dmss" and "auth" in options)
    assert emu.call(lambda: emu.local_channels) == wanted


# --- the emulator's main servers check their dialects -----------------------------------


def _ask(sock: socket.socket, to: tuple[str, int], data: bytes) -> helpers.Reply:
    sock.sendto(data, to)
    while True:
        reply = helpers.parse_reply(sock.recv(65536))
        if not reply.provisional:
            return reply


def test_emulator_main_servers_are_strict_about_their_dialect(emulator) -> None:
    emu = emulator(app="dmss")
    smartpss, dmss = emu.addr["main"], emu.addr["dmss"]
    online = f"/online/p2psrv/{emu.serial}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        stun = helpers.build_request("/online/stun", -7, profile=helpers.DMSS, auth=False)
        assert _ask(sock, dmss, stun).code == 200  # no auth needed
        good = helpers.build_request(online, 12345, profile=helpers.DMSS)
        assert _ask(sock, dmss, good).fields["US"]  # bound to DMSS: known there
        assert _ask(sock, smartpss, helpers.build_request(online, 1)).code == 404  # not here
        assert emu.violations == [] and emu.refused == []
        # the legacy order (CSeq first), even with the DMSS method and correct crypto
        head, _, _ = good.partition(b"\r\n\r\n")
        first, *headers = head.split(b"\r\n")
        cseq = next(h for h in headers if h.startswith(b"CSeq"))
        legacy = b"\r\n".join([first, cseq, *(h for h in headers if h != cseq)]) + b"\r\n\r\n"
        refused = _ask(sock, dmss, legacy)
        assert (refused.code, refused.reason) == (403, "DevPwd_InvalidDigest")
        assert _ask(sock, dmss, helpers.build_request(online, 2)).code == 403  # SmartPSS's
    assert len(emu.refused) == 2 and len(emu.violations) == 2


# --- the fallback: no data 12 s after CONN -> once more without the sign exchange ------------


def test_silent_realm_watch() -> None:
    watch = dh_p2p.SilentRealmWatch(after=12.0)
    assert not watch.silent(100.0, 0, 0, True)
    watch.connected(1, 10.0, 500, 70)
    assert not watch.silent(21.9, 500, 90, True)
    assert watch.silent(22.0, 500, 90, True)  # acknowledged, never answered
    assert not watch.silent(22.0, 500, 70, True)  # the client sent nothing: no sign
    assert not watch.silent(30.0, 500, 90, False)  # the device acknowledges nothing: gone
    quiet_later = dh_p2p.SilentRealmWatch(after=12.0)
    quiet_later.connected(2, 10.0, 500, 70)
    assert not quiet_later.silent(11.0, 501, 90, True)  # data came: the device routes it
    assert not quiet_later.silent(60.0, 501, 200, True)  # an idle realm later means nothing


def test_sign_exchange_punished_despite_an_old_version_is_retried_without(spawn, emulator) -> None:
    echo = EchoServer()
    emu = emulator(fw2024=True, version="5.3.0", port_map={9000: ("127.0.0.1", echo.port)})
    local = free_port()
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{local}:9000")
    proc = spawn(argv, ready=r"^ready:", timeout=30)
    try:
        with socket.create_connection(("127.0.0.1", local), timeout=30) as first:
            first.sendall(b"ping")
            proc.wait_line(r"^reconnected", timeout=40)  # after 12 s of silence
            try:
                rest = first.recv(100)
            except ConnectionResetError:
                rest = b""
            assert rest == b""  # that connection ended with the old tunnel
        assert "sent nothing for 12 s: reconnecting without the sign exchange" in proc.output
        with socket.create_connection(("127.0.0.1", local), timeout=10) as second:
            second.sendall(b"ping")
            second.settimeout(10)
            assert second.recv(100) == b"ping"
    finally:
        echo.close()
    assert emu.violations == []


def test_an_agent_that_never_signs_makes_auto_go_on_without_the_sign_exchange(
    spawn, emulator
) -> None:
    # PROTOCOLS 2.7 (c): short or heartbeat replies to 0x17 instead of a sign
    echo = EchoServer()
    emu = emulator(
        fw2024=True, version="5.3.0", sign_refused=True, port_map={9000: ("127.0.0.1", echo.port)}
    )
    local = free_port()
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{local}:9000")
    proc = spawn(argv, ready=r"^ready:", timeout=30)
    try:
        # (stderr: read by its own thread, so perhaps after the "ready:" of stdout)
        proc.wait_line(r"times without a sign .*: trying again without the sign exchange")
        with socket.create_connection(("127.0.0.1", local), timeout=10) as conn:
            conn.sendall(b"ping")
            conn.settimeout(10)
            assert conn.recv(100) == b"ping"  # routed: no sign exchange on this tunnel
    finally:
        echo.close()
    assert emu.violations == []


def test_with_sign_always_an_agent_without_a_sign_is_not_given_up(spawn, emulator) -> None:
    emu = emulator(fw2024=True, version="5.3.0", sign_refused=True)
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{free_port()}:554")
    proc = spawn([*argv[:-1], "--sign", "always", "--retries", "0", "--timeout", "3", argv[-1]])
    assert proc.wait(30) == ExitCode.ERROR
    assert "trying again without the sign exchange" not in proc.output
    assert emu.call(lambda: any(s.refusing_sign for s in emu.sessions.values()))


# --- the dissector knows the DMSS dialect ----------------------------------------------


@pytest.mark.real_peer
def test_dissector_decodes_dmss_requests_and_replies(tmp_path) -> None:
    require_tool("tshark")
    client, cloud = ("192.0.2.10", 40000), ("198.51.100.5", 8800)
    channel = helpers.build_request(
        f"/device/{SN}/p2p-channel", -1234567, body="<body><Pid>0</Pid></body>",
        profile=helpers.DMSS, request_id="ab" * 16,
    )  # fmt: skip
    probe = helpers.build_request("/probe/p2psrv", 2147483647, profile=helpers.DMSS)
    answer = helpers.build_reply(200, "OK", cseq=0, request_id="ab" * 16, body="<body/>")
    capture = tmp_path / "dmss.pcap"
    write_udp_pcap(
        capture,
        [
            Datagram(1.0, client, cloud, probe),
            Datagram(1.1, client, cloud, channel),
            Datagram(1.2, cloud, client, answer),
        ],
    )
    rows = fields(capture, "dhp2p", "dhp2p.method", "dhp2p.cseq", "http.request.method",
                  "dhp2p.code", "xml.tag")  # fmt: skip
    assert rows == [
        ["NFGET", "2147483647", "GET", "", ""],
        ["NFPOST", "-1234567", "POST", "", "<body>,<Pid>"],
        ["", "0", "", "200", "<body/>"],
    ]


@pytest.mark.parametrize("identity", [DMSS, SMARTPSS], ids=["dmss", "smartpss"])
def test_p2p_channel_resend_is_made_afresh_only_where_the_profile_says(identity) -> None:
    hs = make(identity, username="admin", password="pw", retry=dh_p2p.Retry(initial=0.5))
    salt = helpers.xml_body({"Info": helpers.encrypt_info({"randsalt": "s4lt"})})
    hs.start(0.0, WALL)
    serve(hs, {
        **DMSS_ANSWERS, f"/info/device/{SN}": (200, salt),
        "/online/relay": (200, helpers.xml_body({"Address": "127.0.0.1:8802"})),
    })  # fmt: skip
    first = helpers.parse_request(hs._pending[Step.P2P_CHANNEL].data)
    hs.handle_timers(0.6)
    (again,) = [r for _s, _a, r, _d in requests(hs) if r.path.endswith("/p2p-channel")]
    if not identity.profile.fresh_resend:
        assert again == first
        return
    kept = ("CSeq", "x-pcs-request-id", "X-Version")
    assert [again.header(h) for h in kept] == [first.header(h) for h in kept]
    for tag in ("Identify", "CreateDate", "ClientId", "RandSalt", "UserName"):
        assert again.fields[tag] == first.fields[tag]
    for tag in ("Nonce", "LocalAddr", "DevAuth"):
        assert again.fields[tag] != first.fields[tag]
    assert again.wsse()["Nonce"] != first.wsse()["Nonce"]
    assert again.wsse()["Created"] == first.wsse()["Created"]
    key = helpers.device_key("admin", "pw", "s4lt")
    nonce, created = int(again.fields["Nonce"]), int(again.fields["CreateDate"])
    local = helpers.decrypt_local_addr(key, nonce, again.fields["LocalAddr"])
    assert local == f"{LOCAL[0]}:{LOCAL[1]}"
    signed = helpers.dev_auth(key, nonce, created, again.fields["LocalAddr"])
    assert again.fields["DevAuth"] == signed
    assert again.wsse_valid(helpers.DMSS.cloud_user, helpers.DMSS.cloud_key)


_dmss_junk = st.one_of(
    st.binary(max_size=120),
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK\r\nx-pcs-request-id: 0\r\nCSeq: 0\r\n\r\n<body><US>x</US></body>",
            b"HTTP/1.1 404 Not Found\r\nx-pcs-request-id: abc\r\nCSeq: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nCSeq: -2147483648\r\n\r\n<body><version>6</version></body>",
            b"HTTP/1.1 100 Trying\r\nCSeq: 99999999999\r\n\r\n",
            b"HTTP/1.1 403 DevPwd_InvalidDigest\r\n\r\n",
            b"NFGET /online/stun HTTP/1.1\r\nCSeq: 1\r\n\r\n",
        ]
    ),
)


@given(st.lists(st.tuples(st.sampled_from([MAIN, dh_p2p.P2PSRV, dh_p2p.RELAY]), _dmss_junk),
                max_size=12))  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_hostile_datagrams_never_crash_a_dmss_handshake(items) -> None:
    hs = make(SMARTPSS, DMSS, username="admin", password="pw")
    hs.start(0.0, WALL)
    ((sock, addr, probe, _),) = requests(hs)
    hs.receive(sock, addr, reply_to(probe), 0.0)
    ((sock, addr, online, _),) = requests(hs)
    hs.receive(sock, addr, reply_to(online, 404, "Not Found"), 0.0)  # on to DMSS
    salt = helpers.xml_body({"Info": helpers.encrypt_info({"randsalt": "s4lt"})})
    serve(hs, {**DMSS_ANSWERS, f"/info/device/{SN}": (200, salt)})
    assert Step.P2P_CHANNEL in hs._pending and hs.identity == DMSS
    for sock, data in items:
        for addr in (DMSS_CLOUD, ("127.0.0.1", 9)):
            hs.receive(sock, addr, data, 0.5)
        hs.handle_timers(0.6)
        hs.datagrams_to_send()
    assert hs.error is None or isinstance(hs.error, dh_p2p.HandshakeError)
