"""The emulator is strict: wrong requests and PTCP misbehaviour become violations."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from _ptcp_support import EchoServer

import helpers
from p2p_emulator import Emulator

HDR = struct.Struct("!4sIIIII")


class RawClient:
    """A hand-driven UDP client: every byte is chosen by the test."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.cseq = 0
        self.sent = 0
        self.recv = 0
        self.lmid = 60_000

    def request(self, to: str, path: str, body: str | None = None) -> helpers.Reply:
        self.cseq += 1
        self.sock.sendto(helpers.build_request(path, self.cseq, body=body), self.emu.addr[to])
        while True:
            reply = helpers.parse_reply(self.sock.recv(65536))
            if not reply.provisional:
                return reply

    def ptcp(self, body: bytes = b"", *, lmid: int | None = None, pid: int | None = None) -> None:
        """One packet; by default with a repeated lmid and pid, as the app sends (2.7 (a))."""
        if pid is None:
            pid = 0x0002FFFF if body == b"\x00\x03\x01\x00" else 0xFFFF
        use = self.lmid if lmid is None else lmid
        packet = HDR.pack(b"PTCP", self.sent, self.recv, pid, use, 0) + body
        self.sent += len(body)
        self.sock.sendto(packet, self.emu.addr["agent"])

    def read_ptcp(self) -> bytes:
        """Next non-empty PTCP body from the agent (acknowledging it)."""
        while True:
            data = self.sock.recv(65536)
            if data[:4] != b"PTCP":
                continue
            body = data[HDR.size :]
            if body:
                self.recv += len(body)
                self.ptcp()
                return body

    def open_relay_session(self) -> None:
        relay = self.request("relay", "/relay/agent")
        token = relay.fields["Token"]
        assert self.request("agent", f"/relay/start/{token}", "<body><Client>:0</Client></body>").ok
        self.ptcp(b"\x00\x03\x01\x00")
        assert self.read_ptcp() == b"\x00\x03\x01\x00"
        self.ptcp(b"\x17" + bytes(11))
        sign = self.read_ptcp()[12:]
        self.ptcp(b"\x19" + bytes(11) + sign)
        assert self.read_ptcp()[0] == 0x1A
        self.ptcp(b"\x1b" + bytes(11))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def emu() -> Iterator[Emulator]:
    echo = EchoServer()
    emulator = Emulator(port_map={7: ("127.0.0.1", echo.port)}).start()
    try:
        yield emulator
    finally:
        emulator.close()
        echo.close()


@pytest.fixture
def client(emu) -> Iterator[RawClient]:
    raw = RawClient(emu)
    try:
        yield raw
    finally:
        raw.close()


def wait_for_violation(emu: Emulator, text: str) -> None:
    deadline = time.monotonic() + 5
    while not any(text in v for v in emu.violations):
        assert time.monotonic() < deadline, f"no violation {text!r}: {emu.violations}"
        time.sleep(0.02)  # polling the emulator's list


def test_correct_requests_raise_no_violation(emu, client) -> None:
    assert client.request("main", "/probe/p2psrv").ok
    reply = client.request("main", f"/online/p2psrv/{emu.serial}")
    assert reply.fields["US"] == f"127.0.0.1:{emu.addr['p2p'][1]}"
    assert client.request("main", "/online/p2psrv/OTHER").code == 404
    assert emu.violations == []


def test_bad_wsse_and_header_order_are_flagged(emu, client) -> None:
    client.sock.sendto(
        helpers.build_request("/probe/p2psrv", 1, cloud_key="wrong"), emu.addr["main"]
    )
    assert helpers.parse_reply(client.sock.recv(65536)).code == 401
    wait_for_violation(emu, "bad WSSE")
    lines = helpers.build_request("/probe/p2psrv", 2).split(b"\r\n")
    lines[1], lines[2] = lines[2], lines[1]
    client.sock.sendto(b"\r\n".join(lines), emu.addr["main"])
    client.sock.recv(65536)
    wait_for_violation(emu, "header order")


def test_lmid_from_2_31_up_makes_the_device_stop_consuming(emu, client) -> None:
    client.open_relay_session()  # every packet so far had the same lmid: no violation
    assert emu.violations == []
    client.ptcp(b"\x13" + bytes(11), lmid=2**31)
    wait_for_violation(emu, "lmid 2147483648 >= 2^31: the device stops consuming")
    client.ptcp(b"\x13" + bytes(11))
    with pytest.raises(TimeoutError):  # nothing is acknowledged any more
        client.sock.settimeout(0.5)
        client.read_ptcp()


def test_pid_outside_the_captured_band_and_realm_reuse_are_flagged(emu, client) -> None:
    client.open_relay_session()
    bind = b"\x11\x00\x00\x08" + (0x1234).to_bytes(4, "big") + bytes(4)
    bind += (7).to_bytes(4, "big") + b"\x7f\x00\x00\x01"
    client.ptcp(bind)
    assert client.read_ptcp()[12:] == b"CONN"
    assert emu.bind_lengths == [8]
    client.ptcp(bind)
    wait_for_violation(emu, "bind reuses realm")
    client.ptcp(b"\x13" + bytes(11), pid=0xFFFF - 5000)  # a packet counter after 5000 packets
    wait_for_violation(emu, "outside the captured band")


def test_data_length_field_is_checked(emu, client) -> None:
    client.open_relay_session()
    bind = b"\x11\x00\x00\x00" + (0x99).to_bytes(4, "big") + bytes(4)
    client.ptcp(bind + (7).to_bytes(4, "big") + b"\x7f\x00\x00\x01")
    assert client.read_ptcp()[12:] == b"CONN"
    client.ptcp(b"\x10\x00\x00\x09" + (0x99).to_bytes(4, "big") + bytes(4) + b"hello")
    wait_for_violation(emu, "data length field 9 != 5")
