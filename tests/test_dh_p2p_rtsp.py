"""Real RTSP clients (ffprobe, GStreamer rtspsrc) through dh_p2p.py and the emulated device."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from _p2p_support import dh_p2p_argv

from conftest import PlayResult, free_port, play
from p2p_emulator import Emulator

pytestmark = pytest.mark.real_peer


@pytest.fixture
def emulator() -> Iterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make(camera, **kw) -> Emulator:
        emu = Emulator(port_map={554: (camera.host, camera.port)}, seed=99, **kw).start()
        made.append(emu)
        return emu

    yield make
    for emu in made:
        emu.close()


def tunnel(spawn, emu: Emulator, *args: str):
    local = free_port()
    argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{local}:554", "-v", *args)
    proc = spawn(argv, ready=r"^ready:", timeout=40)
    assert any(line.startswith("RTSP: rtsp://") for line in proc.lines), proc.output
    return proc, local


def url(local: int, camera) -> str:
    auth = f"{camera.user}:{camera.password}@" if camera.user else ""
    return f"rtsp://{auth}127.0.0.1:{local}/cam/realmonitor?channel=1&subtype=0"


def play_together(target: str, clients: list[str]) -> list[PlayResult]:
    """Run several real clients at once over TCP; return their results in order."""
    results: list[PlayResult | BaseException | None] = [None] * len(clients)

    def run(i: int, client: str) -> None:
        try:
            results[i] = play(target, client, "tcp", seconds=4.0)
        except BaseException as exc:  # re-raised below, in the test thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def close_reasons(emu: Emulator) -> dict[str, str]:
    """Why the device ended each realm (run on the emulator thread)."""
    return {f"{r:08x}": why for s in emu.sessions.values() for r, why in s.close_reasons.items()}


def assert_played(result: PlayResult, proc=None, emu: Emulator | None = None) -> None:
    """At least two seconds decoded, no errors; on failure say which side closed what."""
    if result.frames >= 50 and not result.errors:
        return
    story = [result.output[-3000:]]
    if proc is not None:  # dh_p2p -v: local client port -> realm, and who closed each realm
        story.append("dh_p2p:\n" + "\n".join(proc.lines[-40:]))
    if emu is not None:
        story.append(f"device realms closed: {emu.call(lambda: close_reasons(emu))}")
    raise AssertionError("\n".join(story))


@pytest.mark.parametrize("mode", ["--direct", "--relay"])
def test_three_clients_at_once(spawn, emulator, rtsp_camera, mode: str) -> None:
    emu = emulator(rtsp_camera)
    proc, local = tunnel(spawn, emu, mode)
    for result in play_together(url(local, rtsp_camera), ["ffprobe", "gst", "ffprobe"]):
        assert_played(result, proc, emu)
    assert proc.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 10
    while emu.open_realms() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the device for the teardown to land
    assert emu.open_realms() == 0
    assert emu.violations == []


def test_auth_device_with_digest_camera(spawn, emulator, rtsp_camera_auth) -> None:
    emu = emulator(rtsp_camera_auth, auth=("admin", "admin123"))
    proc, local = tunnel(spawn, emu, "-u", "admin", "--password", "admin123")
    for result in play_together(url(local, rtsp_camera_auth), ["ffprobe", "gst", "ffprobe"]):
        assert_played(result, proc, emu)
    assert "admin123" not in proc.output
    assert emu.violations == []


def test_video_decodes_under_loss_and_reordering(spawn, emulator, rtsp_camera) -> None:
    emu = emulator(rtsp_camera, loss=0.02, reorder=0.02, duplicate=0.01)
    proc, local = tunnel(spawn, emu, "--direct")
    for result in play_together(url(local, rtsp_camera), ["ffprobe", "gst"]):
        assert_played(result, proc, emu)
    assert emu.impaired["lost"] and emu.impaired["reordered"], emu.impaired
    assert emu.violations == []


def test_new_client_plays_after_device_reboot(spawn, emulator, rtsp_camera) -> None:
    emu = emulator(rtsp_camera)
    proc, local = tunnel(spawn, emu, "--direct", "--peer-timeout", "3")
    target = url(local, rtsp_camera)
    assert_played(play(target, "ffprobe", "tcp", seconds=3.0))
    # reboot while a client is streaming: that client loses its stream (not asserted)
    watcher = threading.Thread(target=play, args=(target, "ffprobe", "tcp", 8.0), daemon=True)
    watcher.start()
    deadline = time.monotonic() + 20
    while emu.open_realms() == 0:
        assert time.monotonic() < deadline, "the streaming client never reached the device"
        time.sleep(0.05)  # polling the device for the client's realm
    emu.reboot(offline_for=1.0)
    proc.wait_line(r"reconnected", timeout=40)
    assert_played(play(target, "gst", "tcp", seconds=3.0))
    watcher.join(60)
    assert emu.violations == []
