"""dh_p2p.py against a rogue on the network: punches and PTCP from strangers.

A rogue that learns our UDP port (here it reads it off the emulated cloud)
floods it with punch datagrams and PTCP during the handshake.  The tunnel must
still go to the device the cloud named, and carry the device's bytes only.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest
from _p2p_support import PatternServer, dh_p2p_argv, recv_exactly

import helpers
from conftest import free_port
from p2p_emulator import Emulator

SIZE = 200_000


class Rogue:
    """Sends punches (its own Identify, random transactions) and PTCP to whatever
    client the emulated cloud has seen, until stopped; counts what it sent."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.005)
        self.sent = 0
        self.received = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for client in list(self.emu.channels):
                fake_id = os.urandom(8)
                request = helpers.build_punch_request(fake_id, self.emu.device_pub)
                success = helpers.StunMessage(
                    helpers.STUN_BINDING_SUCCESS,
                    os.urandom(4),
                    os.urandom(12),
                    {helpers.ATTR_ICE_CONTROLLED: fake_id, helpers.ATTR_ADDRESS: client},
                )
                syn = b"\x00\x02\xff\xff" + bytes(8) + b"\x00\x03\x01\x00"
                ptcp_junk = b"PTCP" + bytes(8) + syn
                for data in (request.to_wire(), success.to_wire(), ptcp_junk):
                    try:
                        self.sock.sendto(data, client)
                        self.sent += 1
                    except OSError:
                        pass
            try:
                self.sock.recv(65536)
                self.received += 1  # what a hijacked client would send its "device"
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("run", range(10))
def test_rogue_punches_never_become_the_tunnel_peer(spawn, run: int) -> None:
    service = PatternServer(SIZE, seed=run)
    emu = Emulator(port_map={9000: ("127.0.0.1", service.port)}, seed=run).start()
    rogue = Rogue(emu)
    try:
        local = free_port()
        argv = dh_p2p_argv(emu.cloud_port, emu.serial, "-p", f"127.0.0.1:{local}:9000", "-v")
        proc = spawn(argv, ready=r"^ready:", timeout=40)
        assert "ready: direct tunnel" in proc.output, proc.output
        with socket.create_connection(("127.0.0.1", local), timeout=20) as conn:
            got = recv_exactly(conn, SIZE)
        same = hashlib.sha256(got).digest() == hashlib.sha256(service.data).digest()
        assert same, (proc.output, emu.violations)
        assert rogue.sent > 0
        assert rogue.received == 0, "the client talked to the rogue"
        assert "ignoring punch that is not from the device" in proc.output
        assert emu.violations == []
    finally:
        rogue.close()
        emu.close()
        service.close()
