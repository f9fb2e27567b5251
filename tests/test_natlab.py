"""dh_p2p.py on real networks: the NAT lab (tests/natlab.py), default flags only.

The client host and the device host each sit behind a NAT gateway; the cloud
lives in an "internet" namespace.  dh_p2p.py and the RTSP clients run on the
client host with nothing but ``--cloud`` and ``-p``, as a user would run them
(PROTOCOLS 2.8).  Needs root, iproute2, nftables and conntrack: skipped without
them, failed under REQUIRE_REAL_PEERS=1.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from _p2p_support import DH_P2P, PatternServer
from natlab import CLIENT_IP, INET_IP, Lab, LabConfig, socket_in_netns
from natlab import missing_requirements as lab_missing

from conftest import Proc, free_port, play, require_gi, require_tool
from p2p_emulator import Emulator

pytestmark = pytest.mark.real_peer


def require_lab() -> None:
    missing = lab_missing()
    if not missing:
        return
    reason = "the NAT lab needs " + ", ".join(missing)
    if os.environ.get("REQUIRE_REAL_PEERS") == "1":
        pytest.fail(f"REQUIRE_REAL_PEERS=1 but {reason}")
    pytest.skip(reason)


class LabRig:
    """A lab with the emulated cloud and device in it."""

    def __init__(self, lab: Lab, emu: Emulator) -> None:
        self.lab, self.emu = lab, emu

    def dh_p2p(self, spawn: Callable[..., Proc], *extra: str, remote: int = 554):
        """dh_p2p.py on the client host with default flags; waits for ``ready:``."""
        local = free_port()
        argv = self.lab.cmd(
            "cli", sys.executable, DH_P2P, "--cloud", f"smartpss={INET_IP}:{self.emu.cloud_port}",
            "--cloud", f"dmss={INET_IP}:{self.emu.dmss_port}",
            "-p", f"127.0.0.1:{local}:{remote}", "-v", *extra, self.emu.serial,
        )  # fmt: skip
        proc = spawn(argv, ready=r"^ready:", timeout=60)
        return proc, local

    def play(self, local: int, client: str, seconds: float = 4.0):
        url = f"rtsp://127.0.0.1:{local}/cam/realmonitor?channel=1&subtype=0"
        return play(url, client, "tcp", seconds=seconds, wrap=self.lab.cmd("cli"))


@pytest.fixture
def lab_rig() -> Iterator[Callable[..., LabRig]]:
    made: list[tuple[Lab, Emulator]] = []

    def make(port_map: dict[int, tuple[str, int]], **config) -> LabRig:
        require_lab()
        lab = Lab(LabConfig(prefix=f"t{os.getpid() % 100000}", **config)).up()
        try:
            emu = Emulator(
                port_map=port_map,
                seed=5,
                cloud_at=(lab.ns("inet"), INET_IP),
                device_at=(lab.ns("dev"), lab.device_ip),
            ).start()
        except BaseException:
            lab.down()
            raise
        made.append((lab, emu))
        assert emu.registered.wait(10), "the device never reached the cloud through its NAT"
        return LabRig(lab, emu)

    yield make
    for lab, emu in made:
        emu.close()
        lab.down()


def assert_video(result, proc: Proc, rig: LabRig) -> None:
    if result.frames >= 50 and not result.errors:
        return
    raise AssertionError(
        f"{result.frames} frames, errors {result.errors}\n{result.output[-2000:]}\n"
        f"dh_p2p:\n{proc.output[-4000:]}\nviolations: {rig.emu.violations}"
    )


@pytest.fixture
def camera_map(rtsp_camera) -> dict[int, tuple[str, int]]:
    require_gi()
    require_tool("ffprobe")
    return {554: (rtsp_camera.host, rtsp_camera.port)}


def test_direct_through_two_port_keeping_nats(spawn, lab_rig, camera_map) -> None:
    rig = lab_rig(camera_map, client_nat="eim", device_nat="eim")
    proc, local = rig.dh_p2p(spawn)
    assert "ready: direct tunnel" in proc.output, proc.output
    for client in ("ffprobe", "gst"):
        assert_video(rig.play(local, client), proc, rig)
    emu = rig.emu
    # the device carried the stream, not the relay agent
    assert emu.realm_bytes["device"] > 20_000 and emu.realm_bytes["agent"] == 0, emu.realm_bytes
    # the device saw our real addresses, behind our NAT: a LAN address, then the NAT's
    channel = next(iter(emu.channels.values()))
    assert channel.client_local[-1][0] == CLIENT_IP, channel.client_local
    assert channel.client_addr[0] == "10.200.1.2", channel.client_addr
    assert emu.violations == []


def test_symmetric_client_nat_falls_back_to_relay(spawn, lab_rig, camera_map) -> None:
    rig = lab_rig(camera_map, client_nat="symmetric", device_nat="eim")
    proc, local = rig.dh_p2p(spawn)
    assert "ready: relay tunnel" in proc.output, proc.output
    assert_video(rig.play(local, "ffprobe"), proc, rig)
    emu = rig.emu
    assert emu.realm_bytes["agent"] > 20_000 and emu.realm_bytes["device"] == 0, emu.realm_bytes
    assert emu.violations == []


def _download(rig: LabRig, local: int, size: int) -> tuple[int, str]:
    """Read everything from the forwarded port on the client host: (bytes, sha256)."""
    conn = socket_in_netns(rig.lab.ns("cli"), socket.SOCK_STREAM)
    with conn:
        conn.settimeout(120)
        conn.connect(("127.0.0.1", local))
        digest = hashlib.sha256()
        got = 0
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
    return got, digest.hexdigest()


def test_20_mb_byte_exact_with_loss_on_the_client_leg(spawn, lab_rig) -> None:
    size = 20 * 1000 * 1000
    pattern = PatternServer(size, seed=12)
    try:
        rig = lab_rig({9000: ("127.0.0.1", pattern.port)}, client_loss=2)
        proc, local = rig.dh_p2p(spawn, remote=9000)
        got, digest = _download(rig, local, size)
        assert got == size, proc.output[-3000:]
        assert digest == hashlib.sha256(pattern.data).hexdigest()
        assert rig.lab.lost_packets("c") > 100  # the loss really happened
        assert rig.emu.violations == []
    finally:
        pattern.close()


def test_device_nat_remaps_mid_stream(spawn, lab_rig, camera_map) -> None:
    rig = lab_rig(camera_map)
    emu = rig.emu
    proc, local = rig.dh_p2p(spawn)
    assert "ready: direct tunnel" in proc.output, proc.output
    old_pub = emu.device_pub
    # a client holds a realm open while the device's gateway forgets its mappings
    holder = socket_in_netns(rig.lab.ns("cli"), socket.SOCK_STREAM)
    with holder:
        holder.connect(("127.0.0.1", local))
        deadline = time.monotonic() + 20
        while emu.open_realms() == 0:
            assert time.monotonic() < deadline, proc.output
            time.sleep(0.05)  # polling the device for the realm to open
        inner_port = emu.addr["device"][1]
        rig.lab.remap("d", inner_port, public_port=20000 + inner_port % 10000)
        proc.wait_line(r"^reconnected", timeout=60)
    assert emu.device_pub != old_pub and emu.device_pub[1] == 20000 + inner_port % 10000
    assert_video(rig.play(local, "ffprobe"), proc, rig)
    assert emu.violations == []


def test_device_on_the_clients_lan_is_found_by_local_addr(spawn, lab_rig, camera_map) -> None:
    """Client and device behind one NAT that does not hairpin: the public addresses
    lead nowhere, the LAN addresses the two sides announced (LocalAddr) do."""
    rig = lab_rig(camera_map, device_on_client_lan=True)
    proc, local = rig.dh_p2p(spawn)
    assert "ready: direct tunnel" in proc.output, proc.output
    assert_video(rig.play(local, "ffprobe"), proc, rig)
    emu = rig.emu
    assert emu.device_pub[0] == "10.200.1.2"  # the device is seen behind the client's NAT
    channel = next(iter(emu.channels.values()))
    assert channel.client_local[-1][0] == CLIENT_IP  # what the device was told
    assert emu.realm_bytes["device"] > 20_000 and emu.realm_bytes["agent"] == 0
    assert emu.violations == []
