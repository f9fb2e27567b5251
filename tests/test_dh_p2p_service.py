"""dh_p2p.py --config: many emulated devices in one process, health endpoints, SIGHUP."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _p2p_support import DH_P2P, dh_p2p_argv
from _service_support import get, get_json, metric_samples, wait_until, write_config

from conftest import free_port, play
from p2p_emulator import Emulator

pytestmark = pytest.mark.real_peer

PATH = "/cam/realmonitor?channel=1&subtype=0"


@pytest.fixture
def emulators(rtsp_camera) -> Iterator[list[Emulator]]:
    made = [
        Emulator(f"EMUSVC{n}0000", port_map={554: (rtsp_camera.host, rtsp_camera.port)}, seed=n)
        for n in range(3)
    ]
    for emu in made:
        emu.start()
    yield made
    for emu in made:
        emu.close()


def device_toml(name: str, serial: str, emu: Emulator, port: int, extra: str = "") -> str:
    return (
        f'[[device]]\nname = "{name}"\nserial = "{serial}"\n'
        f'forward = ["127.0.0.1:{port}:554"]\n'
        f'cloud = ["smartpss=127.0.0.1:{emu.cloud_port}", "dmss=127.0.0.1:{emu.dmss_port}"]\n'
        f"{extra}\n"
    )


def rtsp_options(sock: socket.socket, port: int, cseq: int) -> bytes:
    """One OPTIONS over a held connection; the camera's reply head."""
    sock.sendall(f"OPTIONS rtsp://127.0.0.1:{port}{PATH} RTSP/1.0\r\nCSeq: {cseq}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply


def frames(port: int) -> int:
    result = play(f"rtsp://127.0.0.1:{port}{PATH}", "ffprobe", "tcp", seconds=3.0)
    assert result.frames >= 50 and not result.errors, result.output[-2000:]
    return result.frames


def test_three_devices_one_unknown_then_fixed_by_sighup(
    spawn, emulators: list[Emulator], tmp_path: Path
) -> None:
    ports = [free_port() for _ in emulators]
    health = free_port()
    good = [device_toml(n, e.serial, e, p) for n, e, p in zip("ab", emulators, ports, strict=False)]
    config = write_config(
        tmp_path / "devices.toml",
        f'health = "{health}"\n' + "".join(good)
        + device_toml("c", "NOSUCHSERIAL", emulators[2], ports[2]),
    )
    argv = [sys.executable, DH_P2P, "--config", config, "-vv"]
    proc = spawn(argv, ready=r"^service: ", timeout=20)

    def only_c_missing() -> dict | None:
        status, body = get_json(health, "/readyz")
        return body if status == 503 and set(body["not_ready"]) == {"c"} else None

    body = wait_until(only_c_missing, "a and b up, c not ready")
    assert "offline" in body["not_ready"]["c"] or "unknown" in body["not_ready"]["c"], body
    assert get(health, "/livez")[0] == 200
    assert "INFO dh_p2p: [c] " in proc.output and "INFO dh_p2p: [a] " in proc.output  # log names
    for port in ports[:2]:
        frames(port)
    # the tunnel's own threads name their device too (ffprobe's realm ended)
    proc.wait_line(r"DEBUG ptcp: \[a\] realm [0-9a-f]{8}: local EOF")  # logged just after

    before = metric_samples(health)
    assert before[("dh_p2p_device_up", (("device", "a"),))] == 1
    assert before[("dh_p2p_device_up", (("device", "c"),))] == 0
    held = socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
    assert rtsp_options(held, ports[0], 1).startswith(b"RTSP/1.0 200"), "no answer through a"
    opened = [emu.sessions_opened for emu in emulators[:2]]

    # an invalid file on SIGHUP is reported and the running set kept
    write_config(config, "[[device]\nthis is not toml")
    proc.popen.send_signal(signal.SIGHUP)
    proc.wait_line(r"keeping the running devices")
    assert set(get_json(health, "/readyz")[1]["not_ready"]) == {"c"}

    fixed = device_toml("c", emulators[2].serial, emulators[2], ports[2])
    write_config(config, f'health = "{health}"\n' + "".join(good) + fixed)
    proc.popen.send_signal(signal.SIGHUP)
    wait_until(
        lambda: get(health, "/readyz")[0] == 200,
        "all three ready after SIGHUP",
        story=lambda: f"{get(health, '/readyz')}\n{proc.output}",
    )
    for port in ports:
        frames(port)
    assert rtsp_options(held, ports[0], 2).startswith(b"RTSP/1.0 200"), "a's realm was closed"
    assert [emu.sessions_opened for emu in emulators[:2]] == opened, "a or b was restarted"
    after = metric_samples(health)
    for name in "ab":
        key = ("dh_p2p_bytes_total", (("device", name), ("direction", "received")))
        assert after[key] > before[key], (name, before[key], after[key])
    assert after[("dh_p2p_reconnects_total", (("device", "a"),))] == 0

    # removing b closes its realm on the device (DISC) and its port; a is not disturbed
    through_b = socket.create_connection(("127.0.0.1", ports[1]), timeout=10)
    assert rtsp_options(through_b, ports[1], 1).startswith(b"RTSP/1.0 200")
    assert emulators[1].open_realms() == 1
    write_config(config, f'health = "{health}"\n' + good[0] + fixed)
    proc.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: emulators[1].open_realms() == 0, "b's realm closed on the device")
    assert through_b.recv(4096) == b""
    through_b.close()
    assert "b" not in get_json(health, "/status")[1]["devices"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports[1]), timeout=10)
    assert rtsp_options(held, ports[0], 3).startswith(b"RTSP/1.0 200"), "a was disturbed"
    # another health address takes a restart: said so, and the endpoints stay
    write_config(config, f'health = "{free_port()}"\n' + good[0] + fixed)
    proc.popen.send_signal(signal.SIGHUP)
    proc.wait_line(r"takes effect at the next start; serving " + str(health))
    assert get(health, "/livez")[0] == 200
    held.close()
    assert proc.stop(signal.SIGTERM) == 0
    wait_until(lambda: all(emu.open_realms() == 0 for emu in emulators), "realms closed on exit")


def test_on_demand_device_opens_on_first_client_and_closes_when_idle(
    spawn, emulators: list[Emulator], tmp_path: Path
) -> None:
    emu = emulators[0]
    port, health = free_port(), free_port()
    config = write_config(
        tmp_path / "devices.toml",
        device_toml("door", emu.serial, emu, port, "on_demand = true\nidle_close = 1"),
    )
    argv = [sys.executable, DH_P2P, "--config", config, "--health", str(health)]
    proc = spawn(argv, ready=r"^service: ")
    status, body = get_json(health, "/status")
    door = body["devices"]["door"]
    assert door["on_demand"] and door["tunnels"] == 0 and door["state"] == "idle", door
    assert get(health, "/readyz")[0] == 200  # on-demand devices do not hold readiness back
    assert emu.sessions_opened == 0

    frames(port)  # through a cold tunnel: the connection is held while it opens
    assert emu.sessions_opened > 0  # (auto mode opens a direct and a relay session)

    def closed() -> bool:
        door = get_json(health, "/status")[1]["devices"]["door"]
        return door["tunnels"] == 0 and door["state"] == "idle"

    wait_until(closed, "the on-demand tunnel closes after idle_close")
    wait_until(lambda: emu.open_realms() == 0, "the device's realms closed")
    assert proc.stop(signal.SIGTERM) == 0


def test_health_without_config_for_the_command_lines_device(
    spawn, emulators: list[Emulator]
) -> None:
    emu = emulators[0]
    port, health = free_port(), free_port()
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"{port}:554", "--health", str(health))
    spawn(argv, ready=r"^ready:", timeout=40)
    wait_until(lambda: get(health, "/readyz")[0] == 200, "ready once the tunnel is up")
    samples = metric_samples(health)
    assert samples[("dh_p2p_device_up", (("device", emu.serial),))] == 1
    frames(port)
    received = ("dh_p2p_bytes_total", (("device", emu.serial), ("direction", "received")))
    assert metric_samples(health)[received] > samples[received]
