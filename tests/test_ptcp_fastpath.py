"""The Session's hot paths (issue 8) behave as the general code, byte for byte.

``receive_datagrams`` takes in-order data packets without the general path and
joins a realm's consecutive data into one DataReceived; data segments keep
views of the caller's bytes.  Fake clock, no sockets.
"""

from __future__ import annotations

import copy
import random

import pytest
from _ptcp_support import connect_pair, shuttle
from hypothesis import given, settings
from hypothesis import strategies as st

from ptcp import ACK_DELAY, HEADER_LEN, DataReceived, Session, _after, decode_packet


def split_events(events: list) -> tuple[dict[int, bytes], list]:
    """Per-realm data (joined) and the other events, in order."""
    data: dict[int, bytes] = {}
    others = []
    for ev in events:
        if isinstance(ev, DataReceived):
            data[ev.realm] = data.get(ev.realm, b"") + ev.data
        else:
            others.append(ev)
    return data, others


def two_realms(a: Session, b: Session) -> tuple[int, int]:
    """Handshake, then two realms from a to b (ports 554 and 80); events cleared."""
    first = connect_pair(a, b)
    second = a.open_realm(80, 0.0)
    shuttle(a, b, 0.0)
    b.accept(second, 0.0)
    shuttle(a, b, 0.0)
    a.events()
    b.events()
    return first, second


def receiver_state(s: Session) -> tuple:
    return (
        s.recv, s.rmid, s.lmid, s.pid, s.realms, s.next_deadline(),
        s.stats.packets_in, s.stats.packets_out, s.stats.out_of_order, s.stats.duplicates,
        s.stats.ignored,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.02, 0.1]),
    dup=st.sampled_from([0.0, 0.05]),
    swap=st.sampled_from([0.0, 0.05]),
    delayed_ack=st.booleans(),
    ack_every=st.integers(1, 3),
)
def test_batched_data_matches_one_by_one(
    seed: int, loss: float, dup: float, swap: float, delayed_ack: bool, ack_every: int
) -> None:
    rng = random.Random(seed)
    a = Session(now=0.0, rng=random.Random(seed), window_bytes=1 << 20)
    b = Session(now=0.0, delayed_ack=delayed_ack, ack_every=ack_every, rng=random.Random(1))
    first, second = two_realms(a, b)
    one = copy.deepcopy(b)  # fed one datagram at a time
    wire: list[bytes] = []
    for _ in range(rng.randint(5, 40)):
        realm = rng.choice([first, second])
        a.send(realm, rng.randbytes(rng.randint(1, 9000)), 0.0)
        if rng.random() < 0.05:
            a.send_heartbeat(0.0)
        wire += a.datagrams_to_send()
        a._cwnd = 1 << 30  # let everything out: the receiver is under test
    if rng.random() < 0.5:
        a.close_realm(second, 0.0)
        wire += a.datagrams_to_send()
    # the network: loss, duplicates, neighbours swapped, and a stray datagram
    net: list[bytes] = []
    for d in wire:
        if rng.random() < loss:
            continue
        net.append(d)
        if rng.random() < dup:
            net.append(d)
    for i in range(len(net) - 1):
        if rng.random() < swap:
            net[i], net[i + 1] = net[i + 1], net[i]
    net.insert(rng.randint(0, len(net)), b"HTTP/1.1 200 OK\r\n\r\n")
    now, i = 1.0, 0
    bad_batched = bad_one = 0
    out_batched: list[bytes] = []
    out_one: list[bytes] = []
    close_at = rng.randint(0, len(net)) if rng.random() < 0.3 else -1
    while i < len(net):
        if i >= close_at >= 0:  # our side closes a realm while its data is on the way
            b.close_realm(second, now)
            one.close_realm(second, now)
            close_at = -1
        k = rng.randint(1, 64)
        bad_batched += b.receive_datagrams(net[i : i + k], now)
        for d in net[i : i + k]:
            try:
                one.receive_datagram(d, now)
            except Exception:  # noqa: BLE001 - PTCPError, counted like the batch does
                bad_one += 1
        if rng.random() < 0.2:  # a pause: an owed acknowledgement goes by the backstop
            now += ACK_DELAY
            b.handle_timers(now)
            one.handle_timers(now)
        out_batched += b.datagrams_to_send()
        out_one += one.datagrams_to_send()
        assert receiver_state(b) == receiver_state(one)
        i += k
        now += 0.001
    assert out_batched == out_one
    assert bad_batched == bad_one == 1
    assert split_events(b.events()) == split_events(one.events())


def test_consecutive_data_of_a_realm_is_one_event_and_realms_stay_apart() -> None:
    a = Session(now=0.0, rng=random.Random(1))
    b = Session(now=0.0)
    first, second = two_realms(a, b)
    a.send(first, b"x" * 3000, 0.0)  # three packets
    a.send(second, b"y" * 100, 0.0)
    a.send(first, b"z" * 10, 0.0)
    wire = a.datagrams_to_send()
    assert len(wire) == 5
    b.receive_datagrams(wire, 0.0)
    assert b.events() == [
        DataReceived(first, b"x" * 3000),
        DataReceived(second, b"y" * 100),
        DataReceived(first, b"z" * 10),
    ]
    acks = b.datagrams_to_send()
    # still one ack per pair of packets (PROTOCOLS 2.7 (b)), the fifth one owed
    assert [len(d) for d in acks] == [HEADER_LEN] * 2
    assert b.next_deadline() == pytest.approx(ACK_DELAY)


@pytest.mark.parametrize("wrap", [bytearray, lambda b: memoryview(b).toreadonly()])
def test_sent_data_is_copied_when_the_caller_may_change_it(wrap) -> None:
    a = Session(now=0.0, rng=random.Random(2), min_rto=0.2, initial_rto=0.2)
    b = Session(now=0.0, ack_every=1)
    realm = connect_pair(a, b)
    buf = bytearray(b"A" * 2000)
    assert a.send(realm, wrap(buf) if wrap is not bytearray else buf, 0.0) == 2000
    first = a.datagrams_to_send()
    buf[:] = b"B" * 2000  # the caller reuses its buffer
    a.handle_timers(1.0)  # nothing acknowledged: the first packet goes again
    again = a.datagrams_to_send()
    assert decode_packet(again[0]).body.data == decode_packet(first[0]).body.data == b"A" * 1280
    for d in again:
        b.receive_datagram(d, 1.0)
    shuttle(a, b, 1.0)
    assert not a.unacked_bytes
    assert b"".join(e.data for e in b.events() if isinstance(e, DataReceived)) == b"A" * 2000
    ro = b"C" * 1500
    view = memoryview(ro)
    assert a.send(realm, view[:1400], 1.0) == 1400  # a read-only view is kept, not copied
    packets = [decode_packet(d).body for d in a.datagrams_to_send()]
    assert [len(p.data) for p in packets if p] == [1280, 120]


def test_parts_left_after_a_partial_scatter_send() -> None:
    parts = [b"abc", b"de", b"fgh"]
    assert _after(parts, 0) == parts
    assert _after(parts, 2) == [b"c", b"de", b"fgh"]
    assert _after(parts, 3) == [b"de", b"fgh"]
    assert _after(parts, 6) == [b"gh"]
    assert _after(parts, 8) == []
    assert parts == [b"abc", b"de", b"fgh"]  # the caller's list is left alone
