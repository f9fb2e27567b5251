"""UDP segmentation offload in the PTCP driver (issue 8): runs out, runs in, one packet each.

PTCPTunnel sends a run of datagrams with one UDP_SEGMENT sendmsg and reads
coalesced runs with UDP_GRO.  What a peer that reads one datagram at a time (a
real device) gets must not change: every datagram one PTCP packet.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys

import pytest
from _ptcp_support import EchoServer, Pair, echo_roundtrip
from hypothesis import given
from hypothesis import strategies as st

from ptcp import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    HEADER_LEN,
    Bind,
    Data,
    Heartbeat,
    PTCPError,
    Status,
    Syn,
    decode_packet,
    gso_runs,
    split_gro,
)

MB = 1024 * 1024
SOL_UDP, UDP_GRO = 17, 104
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux UDP GSO")


def sized(*sizes: int) -> list[bytes]:
    return [bytes([i % 251]) * n for i, n in enumerate(sizes)]


def test_equal_datagrams_make_one_run_and_a_shorter_one_ends_it() -> None:
    assert gso_runs(sized(1316, 1316, 1316, 500, 1316)) == [(0, 4), (4, 5)]
    assert gso_runs(sized(24, 24, 24)) == [(0, 3)]


def test_a_longer_datagram_starts_a_new_run() -> None:
    assert gso_runs(sized(24, 24, 1316, 1316, 36, 24)) == [(0, 2), (2, 5), (5, 6)]
    assert gso_runs(sized(40)) == [(0, 1)]
    assert gso_runs([]) == []


def test_runs_respect_the_kernel_limits() -> None:
    acks = sized(*[24] * 150)
    assert gso_runs(acks) == [(0, 64), (64, 128), (128, 150)]
    full = sized(*[1316] * 100)
    runs = gso_runs(full)
    assert runs[0] == (0, GSO_MAX_BYTES // 1316)
    assert all(sum(len(d) for d in full[i:j]) <= GSO_MAX_BYTES for i, j in runs)


@given(st.lists(st.sampled_from([24, 28, 36, 40, 44, 1316, 1000, 60000]), max_size=300))
def test_runs_cover_everything_in_order_within_the_rules(sizes: list[int]) -> None:
    datagrams = sized(*sizes)
    runs = gso_runs(datagrams)
    assert [k for i, j in runs for k in range(i, j)] == list(range(len(sizes)))
    for i, j in runs:
        run = sizes[i:j]
        assert 1 <= len(run) <= GSO_MAX_SEGMENTS
        assert len(run) == 1 or sum(run) <= GSO_MAX_BYTES
        assert all(s == run[0] for s in run[:-1]) and run[-1] <= run[0]
    for (i, j), (k, _) in zip(runs, runs[1:], strict=False):
        # greedy: the next datagram could not have joined the run before it
        prev, nxt = sizes[i:j], sizes[k]
        assert (
            len(prev) == GSO_MAX_SEGMENTS
            or prev[-1] < prev[0]
            or nxt > prev[0]
            or sum(prev) + nxt > GSO_MAX_BYTES
        )


def gro_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    return [(SOL_UDP, UDP_GRO, struct.pack("=i", size))]


def test_split_gro_cuts_a_coalesced_run_at_the_segment_size() -> None:
    run = b"".join(sized(1316, 1316, 1316, 77))
    parts = split_gro(run, gro_cmsg(1316))
    assert [len(p) for p in parts] == [1316, 1316, 1316, 77]
    assert b"".join(parts) == run


def test_split_gro_leaves_single_datagrams_alone() -> None:
    one = b"PTCP" + bytes(20)
    assert split_gro(one, []) == [one]
    assert split_gro(one, gro_cmsg(24)) == [one]  # the kernel reports a lone datagram too
    assert split_gro(one, [(0, 1, b"\x01\x00\x00\x00")]) == [one]  # some other cmsg
    assert split_gro(one, [(SOL_UDP, UDP_GRO, b"\x01")]) == [one]  # cut short: ignored


def one_packet(datagram: bytes) -> str | None:
    """Why ``datagram`` is not exactly one PTCP packet, or None when it is."""
    try:
        packet = decode_packet(datagram)
    except PTCPError as exc:
        return str(exc)
    single = Data | Bind | Status | Syn | Heartbeat  # what a run could never decode as
    if len(datagram) == HEADER_LEN or isinstance(packet.body, single):
        return None
    return f"{len(datagram)} bytes that decode as {packet.body!r}"


def echo_through_pair(seed: int, total: int, *, inspect=None, **pair_options) -> Pair:
    """Echo ``total`` bytes through a client/device Pair (closed again); check the echo."""
    server = EchoServer()
    pair = Pair({7: server.port}, **pair_options)
    if inspect is not None:
        pair.relay.inspect = inspect
    try:
        _, port = pair.client.listen(7)
        sent, got = echo_roundtrip(port, seed=seed, total=total)
    finally:
        pair.close()
        server.close()
    assert sent == got
    return pair


@linux_only
def test_a_peer_reading_one_by_one_gets_one_packet_per_datagram() -> None:
    """Through a relay that reads like a device: runs went out, single packets arrived."""
    seen: list[int] = []
    wrong: list[str] = []

    def inspect(datagram: bytes) -> None:
        seen.append(len(datagram))
        why = one_packet(datagram)
        if why is not None:
            wrong.append(why)

    relay = {"loss": 0.0, "dup": 0.0, "reorder": 0.0}
    pair = echo_through_pair(3, 8 * MB, relay=relay, inspect=inspect)
    assert wrong == []
    assert pair.client.stats.gso_sends > 0 and pair.device.stats.gso_sends > 0
    assert seen.count(HEADER_LEN) > 1000 and max(seen) == HEADER_LEN + 12 + 1280


@linux_only
def test_runs_from_a_gso_peer_are_read_as_runs_and_split() -> None:
    pair = echo_through_pair(4, 8 * MB)
    for tunnel in (pair.client, pair.device):
        assert tunnel.stats.gro_runs > 0
        assert tunnel.stats.datagrams_in > 2 * tunnel.stats.batches
        assert tunnel.stats.stray == 0


class RefusingSocket(socket.socket):
    """A socket whose kernel refuses UDP_SEGMENT (an old kernel, or a route through xfrm)."""

    refused = 0

    def sendmsg(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        type(self).refused += 1
        raise OSError(errno.EIO, "no segmentation offload here")


def test_a_refused_gso_send_is_resent_one_by_one_and_not_tried_again(caplog) -> None:
    caplog.set_level(logging.INFO, logger="ptcp")
    pair = echo_through_pair(5, 4 * MB, sock_type=RefusingSocket)
    assert RefusingSocket.refused <= 1
    assert pair.client.stats.gso_sends == 0
    if sys.platform.startswith("linux"):
        assert RefusingSocket.refused == 1
        assert "segmentation offload refused" in caplog.text


def test_gso_off_sends_and_reads_one_datagram_per_call() -> None:
    pair = echo_through_pair(6, 4 * MB, tunnel={"gso": False})
    for tunnel in (pair.client, pair.device):
        assert tunnel.stats.gso_sends == 0 and tunnel.stats.gro_runs == 0
        assert tunnel.stats.datagrams_in > 1000


def test_gro_is_switched_off_when_the_socket_goes_back_to_its_owner() -> None:
    """dh_p2p keeps the socket for the next handshake, which reads plain datagrams."""
    from ptcp import PTCPTunnel, Session

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        tunnel = PTCPTunnel(sock, ("127.0.0.1", 9), Session(now=0.0), own_socket=False)
        if sys.platform.startswith("linux"):
            assert sock.getsockopt(SOL_UDP, UDP_GRO) == 1
        tunnel.start()
        tunnel.close(timeout=0)
        assert sock.fileno() >= 0
        if sys.platform.startswith("linux"):
            assert sock.getsockopt(SOL_UDP, UDP_GRO) == 0
