"""svtool.py: DCP codec against vectors.json, client and token keeper against the emulated DVR,
and the command line as a subprocess."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svtool
from conftest import load_vectors
from dvr_emulator import (
    REASON_UNKNOWN_USER,
    REASON_WRONG_PASSWORD,
    DCPSession,
    EmulatedDCP,
    reply,
)
from helpers import ExitCode
from svtool import (
    AuthenticationError,
    AuthResult,
    ClientProtocol,
    DCPClient,
    DescribeResult,
    HeartbeatAck,
    Message,
    MessageDecoder,
    SVArgumentError,
    SVError,
    SVProtocolError,
    TokenKeeper,
    encode_message,
    parse_describe,
    parse_dvr_url,
)

REPO = Path(__file__).resolve().parents[1]
SVTOOL = str(REPO / "svtool.py")
VECTORS = load_vectors()["smartviewer"]
AUTH_OK = bytes.fromhex(VECTORS["authenticate_ok_hex"])
DESCRIBE_OK = bytes.fromhex(VECTORS["describe_ok_hex"])


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.01)  # polling interval of a condition check


def fuzz(examples: int) -> settings:
    """Hypothesis settings for the fuzz tests: no per-example deadline (load makes those
    flaky); a hang is caught by the test's pytest timeout instead."""
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def _emulated_dvr(silence_timeout: float) -> Iterator[EmulatedDCP]:
    with EmulatedDCP({"admin": "4321"}, silence_timeout=silence_timeout) as server:
        yield server
        assert server.violations == []  # our client never sends what a real box rejects


@pytest.fixture
def dvr() -> Iterator[EmulatedDCP]:
    """An emulated DVR that drops silent connections only after 30 s (as a real one might)."""
    yield from _emulated_dvr(30.0)


@pytest.fixture
def quick_dvr() -> Iterator[EmulatedDCP]:
    """An emulated DVR that drops a connection after 1 s without HEARTBEAT."""
    yield from _emulated_dvr(1.0)


# ---------------------------------------------------------------------------------------------
# Wire format against vectors.json


def test_client_messages_reproduce_vectors() -> None:
    user, password = VECTORS["username"], VECTORS["password"]
    assert svtool.build_authenticate(user, password).hex() == VECTORS["authenticate_hex"]
    assert svtool.build_describe().hex() == VECTORS["describe_hex"]
    assert svtool.build_heartbeat().hex() == VECTORS["heartbeat_hex"]
    assert len(svtool.build_describe()) == len(svtool.build_heartbeat()) == 44
    proto = ClientProtocol()
    assert proto.send_authenticate(user, password).hex() == VECTORS["authenticate_hex"]


def test_encode_message_layout() -> None:
    raw = encode_message("AUTHENTICATE", b"xyz", "TEXT")
    assert raw[:4] == b"SV\x00\x00"
    assert int.from_bytes(raw[4:8], "little") == len(raw) == 47
    assert raw[8:33] == b"AUTHENTICATE".ljust(25, b"\x00")
    assert raw[33:44] == b"\x01TEXT" + b"\x00" * 6
    assert raw[44:] == b"xyz"
    assert encode_message("HEARTBEAT")[33:44] == b"\x01BINARY" + b"\x00" * 4


def test_replies_in_vectors_decode() -> None:
    proto = ClientProtocol()
    proto.send_authenticate("admin", "4321")
    assert proto.receive_data(AUTH_OK) == [AuthResult(True, "SUCCESS")]
    proto.send_describe()
    [event] = proto.receive_data(DESCRIBE_OK)
    assert isinstance(event, DescribeResult)
    assert event.info == {
        "model": "SRD-1650DC",
        "channels": "16",
        "authority": VECTORS["describe_ok_authority"],
    }


def test_emulator_replies_reproduce_vectors() -> None:
    assert reply("AUTHENTICATE_OK", "SUCCESS\r\n") == AUTH_OK
    session = DCPSession(
        {"admin": "4321"},
        {"model": "SRD-1650DC", "channels": "16"},
        0.0,
        silence_timeout=30,
        make_token=lambda: VECTORS["describe_ok_authority"],
    )
    assert session.receive_data(bytes.fromhex(VECTORS["authenticate_hex"]), 0.0) == AUTH_OK
    assert session.receive_data(bytes.fromhex(VECTORS["describe_hex"]), 0.0) == DESCRIBE_OK
    assert session.violations == []


def test_decoder_handles_every_split_and_coalesced_messages() -> None:
    stream = AUTH_OK + DESCRIBE_OK + svtool.build_heartbeat()
    expected = [
        Message("AUTHENTICATE_OK", "TEXT", b"SUCCESS\r\n\x00"),
        Message("DESCRIBE_OK", "TEXT", DESCRIBE_OK[44:]),
        Message("HEARTBEAT", "BINARY", b""),
    ]
    for cut in range(len(stream) + 1):
        decoder = MessageDecoder(strict=True)
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == expected, cut
        assert decoder.buffered == 0
    decoder = MessageDecoder()
    one_by_one = [m for i in range(len(stream)) for m in decoder.feed(stream[i : i + 1])]
    assert one_by_one == expected
    assert expected[1].text.endswith("authority:8f3a9c2e71d04b55\r\n")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"XV\x00\x00" + DESCRIBE_OK[4:], "bad magic"),
        (b"S\x00", "bad magic"),
        (b"SV\x00\x00" + (43).to_bytes(4, "little"), "impossible message length"),
        (b"SV\x00\x00" + (0).to_bytes(4, "little"), "impossible message length"),
        (b"SV\x00\x00" + (2**32 - 1).to_bytes(4, "little"), "limit"),
        (DESCRIBE_OK[:8] + b"\xff" * 25 + DESCRIBE_OK[33:], "name field"),
        (DESCRIBE_OK[:8] + b"\x00" * 25 + DESCRIBE_OK[33:], "name field"),
        (DESCRIBE_OK[:33] + b"\x01\x00" + DESCRIBE_OK[35:], "payload type"),
    ],
)
def test_decoder_rejects_bad_input(data: bytes, needle: str) -> None:
    decoder = MessageDecoder()
    with pytest.raises(SVProtocolError, match=needle):
        decoder.feed(data)
    with pytest.raises(SVProtocolError):  # the stream stays broken
        decoder.feed(AUTH_OK)


def test_strict_decoder_demands_padding_and_known_types() -> None:
    bad_marker = DESCRIBE_OK[:33] + b"\x02" + DESCRIBE_OK[34:]
    dirty_name = DESCRIBE_OK[:20] + b"X" + DESCRIBE_OK[21:]
    odd_type = encode_message("X")[:34] + b"JSON\x00\x00" + b"\x00" * 4
    assert MessageDecoder().feed(bad_marker)[0].name == "DESCRIBE_OK"  # lenient by default
    assert MessageDecoder().feed(dirty_name)[0].name == "DESCRIBE_OK"
    assert MessageDecoder().feed(odd_type)[0].payload_type == "JSON"
    for data in (bad_marker, dirty_name, odd_type):
        with pytest.raises(SVProtocolError):
            MessageDecoder(strict=True).feed(data)


def test_decoder_size_bound_is_configurable() -> None:
    big = encode_message("DESCRIBE_OK", b"a" * 1000, "TEXT")
    assert MessageDecoder(max_size=1044).feed(big)[0].payload == b"a" * 1000
    with pytest.raises(SVProtocolError, match="limit"):
        MessageDecoder(max_size=1043).feed(big[:8])  # refused before the body arrives


def test_username_limits() -> None:
    assert svtool.scramble_username("a" * 16)
    assert svtool.scramble_username("é" * 8)  # 16 UTF-8 bytes
    for bad in ("a" * 17, "é" * 9, ""):
        with pytest.raises(SVArgumentError, match="username"):
            svtool.build_authenticate(bad, "pw")
    assert issubclass(SVArgumentError, SVError) and issubclass(SVArgumentError, ValueError)


@pytest.mark.parametrize(
    ("name", "payload_type"),
    [("", "BINARY"), ("X" * 25, "BINARY"), ("NAMÉ", "TEXT"), ("A\x00B", "TEXT"), ("A", "JSON")],
)
def test_encode_message_rejects_bad_arguments(name: str, payload_type: str) -> None:
    with pytest.raises(SVArgumentError):
        encode_message(name, b"", payload_type)


def test_parse_describe_splits_at_first_colon_and_keeps_values() -> None:
    text = "model:SRD-1650DC\r\ntime:12:30:00\r\nname: front door \r\njunk\r\n\r\nlf:only\n"
    assert parse_describe(text) == {
        "model": "SRD-1650DC",
        "time": "12:30:00",
        "name": " front door ",
        "lf": "only",
    }


def test_client_protocol_auth_failure_reason_and_reply_checks() -> None:
    proto = ClientProtocol()
    proto.send_authenticate("admin", "x")
    assert proto.receive_data(reply("AUTHENTICATE_OK", "INVALID PASSWORD\r\n")) == [
        AuthResult(False, "INVALID PASSWORD")
    ]
    assert not proto.authenticated
    proto.send_heartbeat()
    with pytest.raises(SVError):
        proto.send_describe()  # one request at a time
    assert proto.receive_data(reply("HEARTBEAT")) == [HeartbeatAck()]
    other = ClientProtocol()
    other.send_describe()
    with pytest.raises(SVProtocolError, match="answered DESCRIBE"):
        other.receive_data(AUTH_OK)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://10.0.0.5/", ("10.0.0.5", 554, None, None)),
        ("rtsp://127.0.0.1:8554/live.001", ("127.0.0.1", 8554, None, None)),
        ("RTSP://admin:4321@dvr.local:600/", ("dvr.local", 600, "admin", "4321")),
        ("rtsp://ad%40min:p%3Aw%2F@h/", ("h", 554, "ad@min", "p:w/")),
        ("rtsp://admin:@h", ("h", 554, "admin", "")),
        ("rtsp://[::1]:9/", ("::1", 9, None, None)),
    ],
)
def test_parse_dvr_url(url: str, expected: tuple) -> None:
    assert parse_dvr_url(url) == expected


@pytest.mark.parametrize(
    "url", ["http://h/", "rtsp:///x", "rtsp://h:99999/", "rtsp://h:0/", "rtsp://h:port/", "h"]
)
def test_parse_dvr_url_rejects(url: str) -> None:
    with pytest.raises(SVArgumentError):
        parse_dvr_url(url)


def test_bad_url_message_hides_password() -> None:
    with pytest.raises(SVArgumentError) as info:
        parse_dvr_url("http://admin:s3cret@h/")
    assert "s3cret" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Property-based: random, truncated and mutated input only ever raises SVProtocolError


def _valid_message() -> st.SearchStrategy[bytes]:
    names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=24)
    return st.builds(
        encode_message, names, st.binary(max_size=200), st.sampled_from(["TEXT", "BINARY"])
    )


def _feed_all(decoder: MessageDecoder, data: bytes, cuts: list[int]) -> list[Message]:
    out: list[Message] = []
    for piece in chunks(data, cuts):
        out += decoder.feed(piece)
    return out


@pytest.mark.timeout(120)  # a hang fails here
@fuzz(400)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8), st.booleans())
def test_decoder_random_bytes_raise_only_protocol_error(
    data: bytes, cuts: list[int], strict: bool
) -> None:
    decoder = MessageDecoder(strict=strict, max_size=4096)
    try:
        _feed_all(decoder, data, cuts)
    except SVProtocolError:
        pass
    assert decoder.buffered <= len(data)


@pytest.mark.timeout(120)  # a hang fails here
@fuzz(300)
@given(st.lists(_valid_message(), min_size=1, max_size=5), st.lists(st.integers(0, 2000)))
def test_decoder_round_trip_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(messages)
    decoded = _feed_all(MessageDecoder(strict=True), stream, cuts)
    assert [encode_message(m.name, m.payload, m.payload_type) for m in decoded] == messages


@pytest.mark.timeout(120)  # a hang fails here
@fuzz(300)
@given(_valid_message(), st.data())
def test_decoder_truncated_message_waits_without_error(raw: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(raw) - 1))
    decoder = MessageDecoder(strict=True)
    assert decoder.feed(raw[:cut]) == []
    assert decoder.buffered == cut
    assert len(decoder.feed(raw[cut:])) == 1


@pytest.mark.timeout(120)  # a hang fails here
@fuzz(400)
@given(
    st.lists(_valid_message(), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
    st.lists(st.integers(0, 2000), max_size=6),
)
def test_decoder_mutated_stream_raises_only_protocol_error(
    messages: list[bytes], flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    stream = bytearray(b"".join(messages))
    for pos, value in flips:
        stream[pos % len(stream)] = value
    try:
        _feed_all(MessageDecoder(strict=True, max_size=4096), bytes(stream), cuts)
    except SVProtocolError:
        pass


@pytest.mark.timeout(120)  # a hang fails here
@fuzz(300)
@given(st.sampled_from(["AUTHENTICATE", "DESCRIBE", "HEARTBEAT"]), st.binary(max_size=300))
def test_client_protocol_random_reply_raises_only_protocol_error(
    request_name: str, data: bytes
) -> None:
    proto = ClientProtocol()
    {
        "AUTHENTICATE": lambda: proto.send_authenticate("admin", "pw"),
        "DESCRIBE": proto.send_describe,
        "HEARTBEAT": proto.send_heartbeat,
    }[request_name]()
    try:
        proto.receive_data(data)
    except SVProtocolError:
        pass


@pytest.mark.timeout(120)  # a hang fails here
@fuzz(300)
@given(st.one_of(st.binary(max_size=300), _valid_message()), st.lists(st.integers(0, 400)))
def test_emulated_dvr_session_never_crashes(data: bytes, cuts: list[int]) -> None:
    session = DCPSession({"admin": "4321"}, {}, 0.0, silence_timeout=1.0)
    for piece in chunks(data, cuts):
        session.receive_data(piece, 0.0)
    assert session.closed == bool(session.violations)


# ---------------------------------------------------------------------------------------------
# The emulated DVR's session logic (sans-IO)


def _session() -> DCPSession:
    return DCPSession({"admin": "4321", "ü": "pässword"}, {"model": "X"}, 100.0, silence_timeout=5)


def test_session_login_describe_heartbeat() -> None:
    session = _session()
    out = session.receive_data(svtool.build_authenticate("ü", "pässword"), 100.0)
    assert out == reply("AUTHENTICATE_OK", "SUCCESS\r\n")
    [described] = MessageDecoder().feed(session.receive_data(svtool.build_describe(), 101.0))
    info = parse_describe(described.text)
    assert info == {"model": "X", "authority": session.token}
    assert session.expired(105.0)
    assert session.receive_data(svtool.build_heartbeat(), 104.0) == reply("HEARTBEAT")
    assert not session.expired(108.9) and session.expired(109.0)
    assert session.violations == [] and session.counts["login"] == 1


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [("admin", "1234", REASON_WRONG_PASSWORD), ("root", "4321", REASON_UNKNOWN_USER)],
)
def test_session_refuses_bad_credentials_with_reason(user: str, password: str, reason: str) -> None:
    session = _session()
    out = session.receive_data(svtool.build_authenticate(user, password), 0.0)
    assert out == reply("AUTHENTICATE_OK", reason + "\r\n")
    assert session.token is None and not session.closed


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (svtool.build_describe(), "before a successful login"),
        (svtool.build_heartbeat(), "before a successful login"),
        (encode_message("REBOOT"), "unknown message"),
        (encode_message("AUTHENTICATE", b"ID:EddbA64=\r\nPW:x\r\n", "TEXT"), "malformed"),
        (encode_message("AUTHENTICATE", svtool.build_authenticate("a", "b")[44:]), "BINARY"),
        (encode_message("AUTHENTICATE", b"ID:!!!!\r\nPW:" + b"0" * 32 + b"\r\n", "TEXT"), "mal"),
        (encode_message("AUTHENTICATE", b"ID:" + b"QUFB" * 6 + b"\r\nPW:" + b"0" * 32 + b"\r\n",
                        "TEXT"), "decodes to 18 bytes"),  # fmt: skip
        (encode_message("DESCRIBE", b"x"), "empty BINARY"),
        (b"GET / HTTP/1.0\r\n\r\n", "malformed message"),
    ],
)
def test_session_rejects_what_a_real_box_would_choke_on(data: bytes, needle: str) -> None:
    session = _session()
    assert session.receive_data(data, 0.0) == b""
    assert session.closed
    assert needle in session.violations[0]


def test_session_rejects_second_login() -> None:
    session = _session()
    session.receive_data(svtool.build_authenticate("admin", "4321"), 0.0)
    session.receive_data(svtool.build_authenticate("admin", "4321"), 0.0)
    assert session.closed and "already logged-in" in session.violations[0]


# ---------------------------------------------------------------------------------------------
# DCPClient and TokenKeeper against the emulated DVR


def test_client_talks_to_emulator(dvr: EmulatedDCP) -> None:
    with DCPClient(dvr.host, dvr.port, timeout=5) as client:
        client.authenticate("admin", "4321")
        info = client.describe()
        client.heartbeat()
        assert info["model"] == "SRD-1650DC" and info["channels"] == "16"
        assert len(info["authority"]) == 16 and dvr.is_token_valid(info["authority"])
        assert client.describe()["authority"] == info["authority"]  # same login, same token
    wait_until(lambda: not dvr.is_token_valid(info["authority"]), what="token invalidated")
    assert dvr.logins == 1 and dvr.heartbeats == 1 and dvr.describes == 2


def test_each_login_gets_its_own_token(dvr: EmulatedDCP) -> None:
    tokens = set()
    with DCPClient(dvr.host, dvr.port) as one, DCPClient(dvr.host, dvr.port) as two:
        for client in (one, two):
            client.authenticate("admin", "4321")
            tokens.add(client.describe()["authority"])
    assert len(tokens) == 2


def test_client_wrong_password_carries_reason(dvr: EmulatedDCP) -> None:
    with DCPClient(dvr.host, dvr.port, timeout=5) as client:
        with pytest.raises(AuthenticationError) as info:
            client.authenticate("admin", "wrong")
        assert info.value.reason == REASON_WRONG_PASSWORD
        client.authenticate("admin", "4321")  # the connection is still usable
        assert client.describe()["authority"]
    assert dvr.refused_logins == 1


def test_client_too_long_username_is_clear_error_before_io(dvr: EmulatedDCP) -> None:
    with DCPClient(dvr.host, dvr.port) as client:
        with pytest.raises(SVArgumentError, match="at most 16"):
            client.authenticate("x" * 17, "pw")
        client.authenticate("admin", "4321")
    assert dvr.violations == []


def test_token_dies_without_heartbeats(quick_dvr: EmulatedDCP) -> None:
    start = time.monotonic()
    with DCPClient(quick_dvr.host, quick_dvr.port, timeout=5) as client:
        client.authenticate("admin", "4321")
        token = client.describe()["authority"]
        assert quick_dvr.is_token_valid(token)
        wait_until(lambda: not quick_dvr.is_token_valid(token), what="silent connection dropped")
        assert time.monotonic() - start >= quick_dvr.silence_timeout
        with pytest.raises(OSError):
            client.heartbeat()
    assert quick_dvr.silence_drops == 1


def test_token_keeper_keeps_token_past_silence_timeout(quick_dvr: EmulatedDCP) -> None:
    lost: list[object] = []
    keeper = TokenKeeper(
        quick_dvr.host, quick_dvr.port, "admin", "4321", heartbeat_interval=0.2, on_lost=lost.append
    )
    with keeper:
        start = time.monotonic()
        token = keeper.start()
        assert keeper.token == token and keeper.alive
        assert keeper.describe_info["authority"] == token
        wait_until(lambda: quick_dvr.heartbeats >= 8, what="8 heartbeats")  # 8 * 0.2 s > 1 s
        assert time.monotonic() - start > quick_dvr.silence_timeout
        assert quick_dvr.is_token_valid(token) and keeper.alive
    assert not keeper.alive
    wait_until(lambda: not quick_dvr.is_token_valid(token), what="token invalidated by close()")
    assert lost == [] and quick_dvr.silence_drops == 0
    assert "4321" not in repr(keeper) and token not in repr(keeper)


def test_token_keeper_reports_lost_connection_once(dvr: EmulatedDCP) -> None:
    lost: list[BaseException | None] = []
    called = threading.Event()

    def on_lost(exc: BaseException | None) -> None:
        lost.append(exc)
        called.set()

    with TokenKeeper(
        dvr.host, dvr.port, "admin", "4321", heartbeat_interval=5, on_lost=on_lost
    ) as keeper:
        token = keeper.start()
        dvr.drop_connections()  # a reboot, long before the next heartbeat is due
        assert called.wait(5)
        assert not keeper.alive and not dvr.is_token_valid(token)
    assert len(lost) == 1 and isinstance(lost[0], OSError)


def test_token_keeper_unanswered_heartbeat_is_a_loss(dvr: EmulatedDCP) -> None:
    called = threading.Event()
    errors: list[BaseException | None] = []
    dvr.mute_heartbeats = True
    with TokenKeeper(
        dvr.host, dvr.port, "admin", "4321", timeout=0.5, heartbeat_interval=0.1,
        on_lost=lambda exc: (errors.append(exc), called.set()),
    ) as keeper:  # fmt: skip
        keeper.start()
        assert called.wait(10)
        assert not keeper.alive
    assert isinstance(errors[0], TimeoutError)


def test_token_keeper_start_failures(dvr: EmulatedDCP) -> None:
    with pytest.raises(AuthenticationError, match=REASON_WRONG_PASSWORD):
        TokenKeeper(dvr.host, dvr.port, "admin", "nope").start()
    with pytest.raises(AuthenticationError, match=REASON_UNKNOWN_USER):
        TokenKeeper(dvr.host, dvr.port, "guest", "4321").start()
    wait_until(lambda: dvr.open_connections == 0, what="failed logins closed")
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        TokenKeeper("127.0.0.1", port, "admin", "4321").start()


def test_token_keeper_close_is_idempotent_and_start_once(dvr: EmulatedDCP) -> None:
    keeper = TokenKeeper(dvr.host, dvr.port, "admin", "4321", heartbeat_interval=0.1)
    keeper.close()  # before start: harmless
    with pytest.raises(SVError):
        keeper.start()
    other = TokenKeeper(dvr.host, dvr.port, "admin", "4321")
    other.start()
    other.close()
    other.close()
    with pytest.raises(SVError):
        other.start()


@pytest.fixture
def mute_listener() -> Iterator[int]:
    """A port that completes TCP handshakes (backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        yield sock.getsockname()[1]


def test_client_times_out_on_a_mute_server(mute_listener: int) -> None:
    with DCPClient("127.0.0.1", mute_listener, timeout=0.3) as client:
        with pytest.raises(TimeoutError):
            client.authenticate("admin", "4321")
        assert not client.connected


class ScriptedDVR:
    """A one-connection DCP server that answers each request with scripted bytes.

    ``script`` maps a request name to the list of byte strings sent for its 1st, 2nd, ...
    occurrence; ``served`` counts requests answered. Runs until the client disconnects.
    """

    def __init__(self, script: dict[str, list[bytes]]) -> None:
        self.script = {name: list(replies) for name, replies in script.items()}
        self.served: dict[str, int] = {}
        self.changed = threading.Condition()
        self.conn: socket.socket | None = None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def push(self, data: bytes) -> None:
        """Send bytes unasked (once the client is connected)."""
        with self.changed:
            self.changed.wait_for(lambda: self.conn is not None, 5)
        assert self.conn is not None
        self.conn.sendall(data)

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with self.changed:
            self.conn = conn
            self.changed.notify_all()
        decoder = MessageDecoder(strict=True)
        with conn:
            while data := conn.recv(4096):
                for msg in decoder.feed(data):
                    conn.sendall(self.script[msg.name].pop(0))
                    with self.changed:
                        self.served[msg.name] = self.served.get(msg.name, 0) + 1
                        self.changed.notify_all()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def scripted() -> Iterator[Callable[[dict[str, list[bytes]]], ScriptedDVR]]:
    servers: list[ScriptedDVR] = []

    def make(script: dict[str, list[bytes]]) -> ScriptedDVR:
        servers.append(ScriptedDVR(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_client_rejects_garbage_from_server(scripted) -> None:
    server = scripted({"AUTHENTICATE": [b"HTTP/1.0 400 Bad Request\r\n\r\n"]})
    with DCPClient("127.0.0.1", server.port, timeout=5) as client:
        with pytest.raises(SVProtocolError, match="bad magic"):
            client.authenticate("admin", "4321")
        assert not client.connected  # a broken stream is never reused


def test_client_protocol_turns_unrequested_messages_into_notifications() -> None:
    proto = ClientProtocol()
    alarm = encode_message("ALARM", b"motion", "TEXT")
    [note] = proto.receive_data(alarm)
    assert isinstance(note, svtool.Notification) and note.message.name == "ALARM"
    proto.send_heartbeat()
    assert proto.receive_data(encode_message("HEARTBEAT_OK") + alarm) == [HeartbeatAck(), note]
    proto.send_describe()
    with pytest.raises(SVProtocolError, match="answered DESCRIBE with 'ALARM'"):
        proto.receive_data(alarm)  # while a request waits, only its reply may come


def test_keeper_ignores_notifications_and_accepts_heartbeat_ok(scripted) -> None:
    alarm = encode_message("ALARM", b"motion\x00", "TEXT")
    server = scripted(
        {
            "AUTHENTICATE": [AUTH_OK],
            "DESCRIBE": [DESCRIBE_OK + alarm],  # the alarm arrives after the reply: idle
            "HEARTBEAT": [reply("HEARTBEAT_OK") + alarm] + [reply("HEARTBEAT")] * 50,
        }
    )
    lost: list[object] = []
    with TokenKeeper(
        "127.0.0.1", server.port, "admin", "4321", heartbeat_interval=0.05, on_lost=lost.append
    ) as keeper:
        assert keeper.start() == VECTORS["describe_ok_authority"]
        with server.changed:
            assert server.changed.wait_for(lambda: server.served.get("HEARTBEAT", 0) >= 4, 10)
        assert keeper.alive and lost == []


def test_keeper_loses_token_on_garbage_while_idle(scripted) -> None:
    called = threading.Event()
    server = scripted({"AUTHENTICATE": [AUTH_OK], "DESCRIBE": [DESCRIBE_OK]})
    errors: list[BaseException | None] = []
    with TokenKeeper(
        "127.0.0.1", server.port, "admin", "4321", heartbeat_interval=5,
        on_lost=lambda exc: (errors.append(exc), called.set()),
    ) as keeper:  # fmt: skip
        keeper.start()
        server.push(b"garbage")
        assert called.wait(5) and not keeper.alive
    assert isinstance(errors[0], SVProtocolError)


# ---------------------------------------------------------------------------------------------
# Command line (subprocess against the in-process emulator)


def _cli(
    dvr: EmulatedDCP,
    *command: str,
    opts: tuple[str, ...] = (),
    url: str = "rtsp://admin:4321@127.0.0.1/",
) -> list[str]:
    return [sys.executable, SVTOOL, "--dcp-port", str(dvr.port), *opts, url, *command]


TOKEN_LINE = r"^[0-9a-f]{16}$"


def _run(spawn, argv: list[str], timeout: float = 20.0) -> tuple[int, str, list[str]]:
    proc = spawn(argv)
    code = proc.wait(timeout)
    return code, proc.output, proc.lines


def test_cli_describe_prints_key_value_lines(dvr: EmulatedDCP, spawn) -> None:
    code, output, lines = _run(spawn, _cli(dvr, "describe"))
    assert code == 0, output
    assert lines[:2] == ["model: SRD-1650DC", "channels: 16"]
    assert lines[2].startswith("authority: ") and len(lines) == 3


def test_cli_dcp_port_defaults_to_rtsp_port_plus_one(dvr: EmulatedDCP, spawn) -> None:
    argv = [sys.executable, SVTOOL, f"rtsp://admin:4321@127.0.0.1:{dvr.port - 1}/", "describe"]
    code, output, _ = _run(spawn, argv)
    assert code == 0 and "model: SRD-1650DC" in output


def test_cli_credentials_flags_then_url_then_env(dvr: EmulatedDCP, spawn) -> None:
    bare = "rtsp://127.0.0.1/"
    bare_user = "rtsp://admin:bad@127.0.0.1/"
    env_ok = {"SV_USER": "admin", "SV_PASS": "4321"}
    cases = [
        (_cli(dvr, "describe", url=bare), env_ok, 0),
        (_cli(dvr, "describe", opts=("--password", "4321"), url=bare_user), {}, 0),
        (_cli(dvr, "describe", url="rtsp://admin:4321@127.0.0.1/"), {"SV_PASS": "bad"}, 0),
        (
            _cli(dvr, "describe", url=bare),
            {"SV_USER": "admin", "SV_PASS": "bad"},
            ExitCode.LOGIN_REFUSED,
        ),
    ]
    for argv, env, expected in cases:
        proc = spawn(argv, env=env)
        assert proc.wait(20) == expected, (argv, proc.output)


def test_cli_wrong_password_exits_login_refused_with_reason(dvr: EmulatedDCP, spawn) -> None:
    argv = _cli(dvr, "describe", opts=("-v",), url="rtsp://admin:Secr3tPw@127.0.0.1/")
    code, output, _ = _run(spawn, argv)
    assert code == ExitCode.LOGIN_REFUSED
    assert REASON_WRONG_PASSWORD in output and "Traceback" not in output
    assert "Secr3tPw" not in output  # not even at debug level


def test_cli_nothing_listening_exits_unreachable(spawn) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, SVTOOL, "--dcp-port", str(port), "rtsp://a:b@127.0.0.1/", "describe"]
    code, output, lines = _run(spawn, argv)
    assert code == ExitCode.UNREACHABLE and len(lines) == 1 and "refused" in output, output


def test_cli_protocol_error_exits_protocol(spawn, scripted) -> None:
    server = scripted({"AUTHENTICATE": [AUTH_OK], "DESCRIBE": [reply("HEARTBEAT")]})
    argv = [sys.executable, SVTOOL, "--dcp-port", str(server.port), "rtsp://a:b@127.0.0.1/",
            "describe"]  # fmt: skip
    code, output, lines = _run(spawn, argv)
    assert code == ExitCode.PROTOCOL and len(lines) == 1
    assert "answered DESCRIBE with 'HEARTBEAT'" in output


def test_cli_timeout_exits_unreachable(spawn, mute_listener: int) -> None:
    argv = [sys.executable, SVTOOL, "--timeout", "0.5", "--dcp-port", str(mute_listener),
            "rtsp://a:b@127.0.0.1/", "authorize"]  # fmt: skip
    code, output, lines = _run(spawn, argv)
    assert code == ExitCode.UNREACHABLE and "timed out" in output and len(lines) == 1, output


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["rtsp://a:b@127.0.0.1/"], "required"),
        (["rtsp://a:b@127.0.0.1/", "bogus"], "invalid choice"),
        (["http://a:b@127.0.0.1/", "describe"], "rtsp://"),
        (["rtsp://127.0.0.1/", "describe"], "no username"),
        (["rtsp://admin@127.0.0.1/", "describe"], "no password"),
        (["rtsp://a:b@127.0.0.1:65535/", "describe"], "--dcp-port"),
        (["rtsp://" + "u" * 17 + ":b@127.0.0.1/", "describe"], "at most 16"),
        (["--timeout", "-1", "rtsp://a:b@h/", "describe"], "positive"),
        (["rtsp://a:b@h/", "authorize", "--heartbeat-interval", "0"], "positive"),
        (["rtsp://a:b@h/", "authorize", "--duration", "nan"], "finite"),
    ],
)
def test_cli_usage_errors_exit_usage(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.delenv("SV_USER", raising=False)
    monkeypatch.delenv("SV_PASS", raising=False)
    assert svtool.main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert svtool.main(["--help"]) == 0
    assert "SV_USER" in capsys.readouterr().out


def test_cli_authorize_keeps_token_past_silence_then_sigterm(quick_dvr: EmulatedDCP, spawn) -> None:
    start = time.monotonic()
    argv = _cli(quick_dvr, "authorize", "--heartbeat-interval", "0.2", opts=("-v",))
    proc = spawn(argv)
    token = proc.wait_line(TOKEN_LINE).group(0)
    assert quick_dvr.is_token_valid(token)
    wait_until(lambda: quick_dvr.heartbeats >= 8, what="8 heartbeats")  # 8 * 0.2 s > 1 s silence
    assert time.monotonic() - start > quick_dvr.silence_timeout
    assert quick_dvr.is_token_valid(token) and quick_dvr.silence_drops == 0
    assert proc.stop(signal.SIGTERM) == 0, proc.output
    assert not quick_dvr.is_token_valid(token)
    assert "4321" not in proc.output and "Traceback" not in proc.output
    assert sum(token in line for line in proc.lines) == 1  # printed, never logged


def test_cli_authorize_sigint_exits_0(dvr: EmulatedDCP, spawn) -> None:
    proc = spawn(_cli(dvr, "authorize", "--heartbeat-interval", "0.2"), ready=TOKEN_LINE)
    assert proc.stop(signal.SIGINT) == 0, proc.output
    assert not dvr.is_token_valid(proc.lines[0])
    assert proc.lines == [proc.lines[0]]


def test_cli_authorize_duration_ends_it(quick_dvr: EmulatedDCP, spawn) -> None:
    argv = _cli(quick_dvr, "authorize", "--duration", "1.5", "--heartbeat-interval", "0.3")
    proc = spawn(argv, ready=TOKEN_LINE)
    assert proc.wait(20) == 0, proc.output
    assert quick_dvr.heartbeats >= 3 and quick_dvr.silence_drops == 0
    wait_until(lambda: not quick_dvr.is_token_valid(proc.lines[0]), what="token invalidated")


def test_cli_authorize_lost_connection_exits_unreachable(dvr: EmulatedDCP, spawn) -> None:
    proc = spawn(_cli(dvr, "authorize", "--heartbeat-interval", "5"), ready=TOKEN_LINE)
    dvr.drop_connections()
    assert proc.wait(20) == ExitCode.UNREACHABLE
    assert "Traceback" not in proc.output and len(proc.lines) == 2, proc.output


# ---------------------------------------------------------------------------------------------
# The emulator's own lifecycle


def test_emulator_port_taken_leaves_nothing_open_and_stop_is_safe() -> None:
    with EmulatedDCP() as first:
        second = EmulatedDCP(port=first.port)
        with pytest.raises(OSError):
            second.start()
        second.stop()  # never started: harmless
        assert first.open_connections == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((first.host, first.port), timeout=2).close()


def test_emulator_drop_connections_invalidates_tokens_at_once(dvr: EmulatedDCP) -> None:
    with DCPClient(dvr.host, dvr.port) as client:
        client.authenticate("admin", "4321")
        token = client.describe()["authority"]
        dvr.drop_connections()
        assert not dvr.is_token_valid(token)
        wait_until(lambda: dvr.open_connections == 0, what="connections closed")
        with pytest.raises(OSError):
            client.heartbeat()
