"""dh_p2p.py end to end against the loopback emulator (tests/p2p_emulator.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from _p2p_support import (
    CHANNEL_TITLES,
    DigestHTTPServer,
    PatternServer,
    dh_p2p_argv,
    pattern,
    recv_exactly,
)
from _ptcp_support import EchoServer

import helpers
from conftest import free_port
from helpers import ExitCode
from p2p_emulator import Emulator

ECHO_PORT = 9000  # device-side port numbers the emulator maps to local services
BULK_PORT = 9001
BULK_SIZE = 20 * 1000 * 1000


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until true (a readiness check, not a guess)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, object]]:
    echo = EchoServer()
    bulk = PatternServer(BULK_SIZE)
    http = DigestHTTPServer("admin", "admin123")
    try:
        yield {"echo": echo, "bulk": bulk, "http": http}
    finally:
        echo.close()
        bulk.close()
        http.close()


@pytest.fixture
def emulator(services) -> Iterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make(**kw) -> Emulator:
        port_map = {
            ECHO_PORT: ("127.0.0.1", services["echo"].port),
            BULK_PORT: ("127.0.0.1", services["bulk"].port),
            80: ("127.0.0.1", services["http"].port),
        }
        port_map.update(kw.pop("port_map", {}))
        emu = Emulator(port_map=port_map, seed=1234, **kw).start()
        made.append(emu)
        return emu

    yield make
    for emu in made:
        emu.close()


def echo_roundtrip(port: int, size: int = 300_000) -> None:
    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        sender = threading.Thread(target=conn.sendall, args=(data,))
        sender.start()
        got = recv_exactly(conn, size)
        sender.join()
    assert got == data


def start(spawn, emu: Emulator, *args: str, forwards: list[str] | None = None, timeout=30):
    ports = {}
    argv_forwards: list[str] = []
    for remote in forwards or [str(ECHO_PORT)]:
        local = free_port()
        ports[int(remote)] = local
        argv_forwards += ["-p", f"127.0.0.1:{local}:{remote}"]
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, *argv_forwards, *args)
    proc = spawn(argv, ready=r"^ready:", timeout=timeout)
    return proc, ports


@pytest.mark.parametrize(
    ("options", "args", "path"),
    [
        ({}, ["--direct"], "direct"),
        ({}, ["--relay"], "relay"),
        ({"relay_only": True}, [], "relay"),
        ({}, [], "direct"),
        ({"auth": ("admin", "admin123")}, ["-u", "admin", "--password", "admin123"], "direct"),
        ({"auth": ("admin", "admin123")}, ["--relay", "-u", "admin", "-vv"], "relay"),
    ],
    ids=["direct", "relay", "auto-relay-only", "auto-direct", "auth-direct", "auth-relay"],
)
def test_echo_through_tunnel(spawn, emulator, options, args, path) -> None:
    emu = emulator(**options)
    env = {"DH_P2P_PASSWORD": "admin123"} if "--password" not in args and "-u" in args else None
    local = free_port()
    argv = dh_p2p_argv(
        emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{local}:{ECHO_PORT}", *args
    )
    proc = spawn(argv, ready=r"^ready:", env=env, timeout=40)
    assert f"ready: {path} tunnel" in proc.output
    errors: list[BaseException] = []

    def run() -> None:
        try:
            echo_roundtrip(local)
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    clients = [threading.Thread(target=run) for _ in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    assert not errors, errors
    assert emu.binds.count(ECHO_PORT) == 3
    assert proc.stop(signal.SIGTERM) == 0
    wait_until(lambda: emu.open_realms() == 0, what="all realms closed on the device")
    if path == "relay":
        assert emu.unbound, "relay teardown must send /relay/unbind/{token}"
    if path == "direct":
        assert set(emu.punched_addrs) == {emu.addr["device"], emu.addr["lan"]}
    assert emu.violations == []
    # no secret at any log level (one case runs with -vv)
    secrets = ["admin123", helpers.DEFAULT_CLOUD_KEY, *emu.relay_tokens]
    if "auth" in options:
        secrets.append(helpers.device_key("admin", "admin123", emu.randsalt).decode())
    for secret in secrets:
        assert secret not in proc.output


def test_sigterm_closes_open_realms(spawn, emulator) -> None:
    emu = emulator()
    proc, ports = start(spawn, emu, "--direct")
    conns = [socket.create_connection(("127.0.0.1", ports[ECHO_PORT])) for _ in range(3)]
    try:
        for conn in conns:
            conn.sendall(b"ping")
            assert recv_exactly(conn, 4) == b"ping"
        assert emu.open_realms() == 3
        assert proc.stop(signal.SIGTERM) == 0
        wait_until(lambda: emu.open_realms() == 0, what="realms closed by SIGTERM")
        for conn in conns:
            conn.settimeout(5)
            assert conn.recv(10) == b""  # the local client sees the tunnel close
    finally:
        for conn in conns:
            conn.close()
    assert emu.violations == []


def test_sigint_also_exits_zero(spawn, emulator) -> None:
    emu = emulator()
    proc, ports = start(spawn, emu, "--relay")
    echo_roundtrip(ports[ECHO_PORT], 1000)
    assert proc.stop(signal.SIGINT) == 0
    assert emu.violations == []


def test_bulk_20mb_with_loss_reorder_duplication(spawn, emulator) -> None:
    emu = emulator(loss=0.02, reorder=0.02, duplicate=0.02, stray=True)
    proc, ports = start(spawn, emu, "--direct", forwards=[str(BULK_PORT), str(ECHO_PORT)])
    with socket.create_connection(("127.0.0.1", ports[BULK_PORT]), timeout=60) as conn:
        got = recv_exactly(conn, BULK_SIZE + 1)
    assert len(got) == BULK_SIZE
    assert hashlib.sha256(got).digest() == hashlib.sha256(pattern(BULK_SIZE)).digest()
    echo_roundtrip(ports[ECHO_PORT], 2_000_000)
    sent = emu.impaired["sent"]
    assert sent > BULK_SIZE // 1280  # the data really crossed the impaired path
    for what in ("lost", "reordered", "duplicated"):
        assert 0.01 * sent < emu.impaired[what] < 0.03 * sent, emu.impaired
    assert emu.violations == []


def test_stray_datagrams_are_tolerated(spawn, emulator) -> None:
    emu = emulator(stray=True)
    proc, ports = start(spawn, emu, "--direct")
    for _ in range(3):
        echo_roundtrip(ports[ECHO_PORT], 100_000)
    assert emu.violations == []


@pytest.mark.parametrize("mode", ["--direct", "--relay"])
def test_device_reboot_reconnects(spawn, emulator, mode: str) -> None:
    emu = emulator()
    proc, ports = start(spawn, emu, mode, "--peer-timeout", "3")
    echo_roundtrip(ports[ECHO_PORT], 10_000)
    with socket.create_connection(("127.0.0.1", ports[ECHO_PORT]), timeout=30) as old:
        old.sendall(b"x")
        assert recv_exactly(old, 1) == b"x"
        emu.reboot(offline_for=1.0)
        proc.wait_line(r"reconnected", timeout=40)
        assert old.recv(10) == b""  # the realm died with the old session
    echo_roundtrip(ports[ECHO_PORT], 100_000)
    assert proc.popen.poll() is None
    if mode == "--relay":
        assert emu.unbound, "the dead relay session must be unbound"
    assert emu.violations == []


def test_sigterm_during_handshake_exits_zero(spawn) -> None:
    port = free_port("udp")  # nothing answers: the handshake keeps retrying
    argv = dh_p2p_argv(port, "SN", "-p", f"{free_port()}:{ECHO_PORT}", "-vv")
    proc = spawn(argv, ready=r"-> probe")
    assert proc.stop(signal.SIGTERM) == 0


def test_unknown_serial_clear_message(spawn, emulator) -> None:
    emu = emulator()
    argv = dh_p2p_argv(emu.cloud_port, "NOSUCHSERIAL", "-p", f"{free_port()}:{ECHO_PORT}")
    argv += ["--retries", "1"]
    proc = spawn(argv)
    assert proc.wait(30) == ExitCode.UNREACHABLE
    assert proc.lines == [
        "dh_p2p: device NOSUCHSERIAL is unknown to the SmartPSS and the DMSS cloud: "
        "unknown serial, or bound to another cloud (or offline)"
    ]
    asked = {name for name, path in emu.requests if path == "/online/p2psrv/NOSUCHSERIAL"}
    assert asked == {"main", "dmss"}  # --app auto tried both identities
    assert emu.violations == []


def test_auth_device_without_credentials(spawn, emulator) -> None:
    emu = emulator(auth=("admin", "admin123"))
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"{free_port()}:{ECHO_PORT}")
    proc = spawn(argv, env={"DH_P2P_USERNAME": "", "DH_P2P_PASSWORD": ""})
    assert proc.wait(30) == ExitCode.LOGIN_REFUSED
    assert len(proc.lines) == 1, proc.output
    assert proc.lines[0].startswith("dh_p2p: the device wants its own login")
    assert "pass -u USER and --password PASS" in proc.lines[0]
    assert emu.violations == []


def test_auth_device_wrong_password(spawn, emulator) -> None:
    emu = emulator(auth=("admin", "admin123"))
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"{free_port()}:{ECHO_PORT}")
    proc = spawn(argv + ["-u", "admin", "--password", "wrong"])
    assert proc.wait(30) == ExitCode.LOGIN_REFUSED
    assert "refused the credentials" in proc.output
    assert "wrong" not in proc.output.replace("refused", "")


def test_cloud_unreachable(spawn) -> None:
    port = free_port("udp")
    argv = dh_p2p_argv(port, "SN", "-p", f"{free_port()}:{ECHO_PORT}")
    proc = spawn(argv + ["--timeout", "1.5", "--retries", "0"])
    assert proc.wait(30) == ExitCode.CLOUD_UNREACHABLE
    assert proc.lines == [f"dh_p2p: no answer from the cloud at 127.0.0.1:{port}"]


def test_channels_lists_titles_and_urls(spawn, emulator, services) -> None:
    emu = emulator(auth=("admin", "admin123"))
    http_local = free_port()
    argv = dh_p2p_argv(
        emu.cloud_port,
        emu.serial,
        "-p",
        f"127.0.0.1:{free_port()}:554",
        "-p",
        f"127.0.0.1:{http_local}:80",
        "-u",
        "admin",
        "--password",
        "admin123",
        "--channels",
    )
    proc = spawn(argv, ready=r"^ready:", timeout=40)
    proc.wait_line(r"^channels: 2$", timeout=30)
    out = proc.output
    for number, title in enumerate(CHANNEL_TITLES, 1):
        assert f"channel {number}: {title}" in out
        assert f"/cam/realmonitor?channel={number}&subtype=0" in out
        assert f"/cam/realmonitor?channel={number}&subtype=1" in out
    assert any("ChannelTitle" in p for p in services["http"].paths)
    assert "admin123" not in out
    assert emu.violations == []


def test_cloud_credentials_from_environment(spawn, emulator) -> None:
    emu = emulator()
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"{free_port()}:{ECHO_PORT}")
    proc = spawn(argv + ["--retries", "0"], env={"DH_P2P_CLOUD_KEY": "not-the-key"})
    assert proc.wait(30) == ExitCode.CLOUD_UNREACHABLE
    assert "cloud refused /probe/p2psrv (401)" in proc.output
    assert any("bad WSSE" in v for v in emu.violations)
    assert "not-the-key" not in proc.output
