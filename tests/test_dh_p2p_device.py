"""dh_p2p.py against a device that behaves as the 2025-2026 captures say (PROTOCOLS 2.7).

The emulated device checks every client header (lmid below 2^31, pid in the
captured band; a breach makes it stop consuming), asks for holes with 0x0a
instead of acknowledging past them, resends its own data after ~250 ms, and on
request stops granting binds or stops acknowledging altogether.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from _p2p_support import dh_p2p_argv
from _ptcp_support import BulkServer, EchoServer, TcpService, digest_of, stream_chunks

from conftest import free_port, play
from p2p_emulator import Emulator

DOWN, UP, ECHO = 9000, 9001, 9002  # device ports, mapped to local services


class HashSink(TcpService):
    """Reads until EOF and records ``<bytes> <sha256>``."""

    def serve(self, conn: socket.socket) -> str:
        digest, total = hashlib.sha256(), 0
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                return f"{total} {digest.hexdigest()}"
            digest.update(chunk)
            total += len(chunk)


@pytest.fixture
def device() -> Iterator[Callable[..., tuple[Emulator, dict]]]:
    made = []

    def make(size: int = 0, **kw) -> tuple[Emulator, dict]:
        services = {"down": BulkServer(seed=3, total=size), "up": HashSink(), "echo": EchoServer()}
        port_map = {
            DOWN: ("127.0.0.1", services["down"].port),
            UP: ("127.0.0.1", services["up"].port),
            ECHO: ("127.0.0.1", services["echo"].port),
        }
        port_map.update(kw.pop("port_map", {}))
        emu = Emulator(port_map=port_map, seed=11, **kw).start()
        made.append((emu, services))
        return emu, services

    yield make
    for emu, services in made:
        emu.close()
        for service in services.values():
            service.close()


def forward_all(spawn, emu: Emulator, *extra: str):
    """dh_p2p.py with one local port per device service; waits for ready."""
    ports = {name: free_port() for name in ("down", "up", "echo", "rtsp")}
    argv = dh_p2p_argv(
        emu.cloud_port, emu.serial, "-v",
        "-p", f"127.0.0.1:{ports['down']}:{DOWN}", "-p", f"127.0.0.1:{ports['up']}:{UP}",
        "-p", f"127.0.0.1:{ports['echo']}:{ECHO}", "-p", f"127.0.0.1:{ports['rtsp']}:554",
        *extra,
    )  # fmt: skip
    proc = spawn(argv, ready=r"^ready:", timeout=40)
    return proc, ports


def upload(port: int, size: int, seed: int = 5) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        for chunk in stream_chunks(seed, size):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the device side closes once it has read everything


def wait_ended(service: TcpService, count: int = 1, timeout: float = 60.0) -> list[str]:
    with service.changed:
        assert service.changed.wait_for(lambda: len(service.ended) >= count, timeout), (
            service.ended
        )
        return list(service.ended)


def echo_once(port: int, payload: bytes = b"ping " * 200) -> socket.socket:
    """Open a connection through the tunnel, check one echo, return it (still open)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = conn.recv(65536)
        assert chunk, "the tunnel closed the connection"
        got += chunk
    assert got == payload
    return conn


def test_big_download_and_upload_stay_in_the_captured_header_band(spawn, device) -> None:
    size_down, size_up = 400 * 1000 * 1000, 50 * 1000 * 1000
    emu, services = device(size_down)
    proc, ports = forward_all(spawn, emu)
    digest = hashlib.sha256()
    got = 0
    with socket.create_connection(("127.0.0.1", ports["down"]), timeout=60) as conn:
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
            got += len(chunk)
    assert got == size_down and digest.hexdigest() == digest_of(3, size_down)
    upload(ports["up"], size_up)
    assert wait_ended(services["up"]) == [f"{size_up} {digest_of(5, size_up)}"]
    # every client packet passed the device's header rules (lmid < 2^31, pid in band):
    # one breach would have stopped the device and the transfers with it
    assert emu.violations == [], emu.violations[:5]


def test_a_hole_is_asked_for_with_0x0a_and_filled(spawn, device) -> None:
    size = 5 * 1000 * 1000
    emu, services = device(hole_at=1_000_000)
    proc, ports = forward_all(spawn, emu)
    upload(ports["up"], size)
    assert wait_ended(services["up"]) == [f"{size} {digest_of(5, size)}"]
    stats = emu.header_stats()
    assert stats["nacks"] > 0 and stats["holes"] >= 1, stats
    assert proc.stop() == 0
    # the client counted the device's requests and answered them (its closing line)
    match = re.search(r"tunnel to .* closed: .* 0x0a (\d+) realms", proc.output)
    assert match and int(match.group(1)) > 0, proc.output[-2000:]
    assert emu.violations == []


def test_more_clients_than_max_realms_get_another_tunnel(spawn, device, rtsp_camera) -> None:
    emu, _ = device(port_map={554: (rtsp_camera.host, rtsp_camera.port)})
    proc, ports = forward_all(spawn, emu, "--max-realms", "8")
    url = f"rtsp://127.0.0.1:{ports['rtsp']}/cam/realmonitor?channel=1&subtype=0"
    results: list = [None] * 12

    def run(i: int) -> None:
        results[i] = play(url, "ffprobe", "tcp", seconds=5.0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        assert r is not None and r.frames >= 50 and not r.errors, (r, proc.output[-3000:])
    assert "extra tunnel open" in proc.output
    assert emu.call(lambda: emu.sessions_opened) >= 2  # two tunnels did the sign exchange
    assert emu.violations == []


def test_a_device_that_stops_granting_binds_still_serves_the_next_client(spawn, device) -> None:
    emu, _ = device(bind_limit=3)
    proc, ports = forward_all(spawn, emu)
    held = [echo_once(ports["echo"]) for _ in range(3)]  # the tunnel's three binds
    fourth = echo_once(ports["echo"])  # its bind is never answered: another tunnel serves it
    assert "takes no new realms" in proc.output and "extra tunnel open" in proc.output
    for conn in [*held, fourth]:
        conn.close()
    assert emu.violations == []


def test_a_device_whose_recv_freezes_is_left_for_a_new_tunnel(
    spawn, device, rtsp_camera
) -> None:
    emu, _ = device(port_map={554: (rtsp_camera.host, rtsp_camera.port)})
    proc, ports = forward_all(spawn, emu)
    conn = echo_once(ports["echo"])
    emu.freeze()
    conn.sendall(b"this is never acknowledged")
    # the stall rule gives up after 20 s without progress; a handshake follows: the
    # tunnel is rebuilt within 30 s
    proc.wait_line(r"^reconnected", timeout=30)
    conn.close()
    assert "acknowledged nothing" in proc.output
    result = play(f"rtsp://127.0.0.1:{ports['rtsp']}/cam/realmonitor?channel=1&subtype=0")
    assert result.frames >= 50 and not result.errors, result.output[-2000:]
