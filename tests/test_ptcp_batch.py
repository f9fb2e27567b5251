"""Session.receive_datagrams (the driver's batch path) behaves as receive_datagram one by one.

A bulk sender reads its peer's per-packet acks in batches; the batch path only
counts an ack that a later one in the same batch supersedes.  Fake clock, no sockets.
"""

from __future__ import annotations

import copy
import random

from _ptcp_support import connect_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from ptcp import HEADER, MAGIC, Session


def masked(datagrams: list[bytes]) -> list[bytes]:
    """Datagrams without their rmid: packets pushed after a batch echo its last lmid."""
    return [d[:20] + d[24:] for d in datagrams]


def state(s: Session) -> tuple:
    """What a Session shows from outside (the datagrams and events are compared too)."""
    return (
        s.sent,
        s.recv,
        s.rmid,
        s.unacked_bytes,
        s.send_space,
        s.rto,
        s.next_deadline(),
        s.stats.packets_in,
        s.stats.fast_retransmits,
        s.stats.retransmits,
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), window=st.sampled_from([8192, 65536, 1 << 20]))
def test_batched_acks_match_one_by_one(seed: int, window: int) -> None:
    rng = random.Random(seed)
    a = Session(now=0.0, rng=random.Random(7), window_bytes=window)
    b = Session(now=0.0, ack_every=1)  # answers every packet, as a device does
    realm = connect_pair(a, b)
    batched = copy.deepcopy(a)
    data = rng.randbytes(300_000)
    pos = 0
    now = 0.0
    out: list[bytes] = []  # what the last acks let out
    for _ in range(10_000):
        if pos >= len(data) and not a.unacked_bytes:
            break
        now += 0.001
        took = a.send(realm, data[pos : pos + 20_000], now) if pos < len(data) else 0
        assert batched.send(realm, data[pos : pos + 20_000], now) == took
        pos += took
        more = a.datagrams_to_send()
        assert masked(batched.datagrams_to_send()) == masked(more)
        out += more
        for d in out:
            b.receive_datagram(d, now)
        acks = b.datagrams_to_send()
        assert len(acks) == len(out), "every data packet is answered"
        now += 0.001
        for d in acks:
            a.receive_datagram(d, now)
        i = 0
        while i < len(acks):  # random batch sizes, as recvfrom happens to return them
            n = rng.randint(1, 40)
            assert batched.receive_datagrams(acks[i : i + n], now) == 0
            i += n
        assert state(batched) == state(a)
        assert batched.events() == a.events()
        out = a.datagrams_to_send()
        assert masked(batched.datagrams_to_send()) == masked(out)
    assert not a.unacked_bytes, "the transfer did not finish"
    assert b"".join(e.data for e in b.events() if hasattr(e, "data")) == data


def test_duplicate_acks_in_one_batch_still_trigger_fast_retransmit() -> None:
    a, b = Session(now=0.0, rng=random.Random(7)), Session(now=0.0, ack_every=1)
    realm = connect_pair(a, b)
    one_by_one = copy.deepcopy(a)
    a.send(realm, bytes(20 * 1280), 1.0)
    out = a.datagrams_to_send()
    assert one_by_one.send(realm, bytes(20 * 1280), 1.0) and one_by_one.datagrams_to_send() == out
    b.receive_datagram(out[0], 1.0)  # the second packet is lost; the rest arrive
    for d in out[2:6]:
        b.receive_datagram(d, 1.0)
    acks = b.datagrams_to_send()
    assert len(acks) == 5 and len(set(HEADER.unpack_from(x)[2] for x in acks[1:])) == 1
    assert a.receive_datagrams(acks, 1.01) == 0
    for d in acks:
        one_by_one.receive_datagram(d, 1.01)
    assert a.stats.fast_retransmits == one_by_one.stats.fast_retransmits == 1
    assert state(a) == state(one_by_one)
    assert a.datagrams_to_send() == one_by_one.datagrams_to_send()


def test_batch_counts_what_is_not_ptcp() -> None:
    a, b = Session(now=0.0, rng=random.Random(7)), Session(now=0.0)
    connect_pair(a, b)
    ack = HEADER.pack(MAGIC, b.sent, a.sent, 0xFFFF, b.lmid, a.lmid)
    assert a.receive_datagrams([b"junk", ack, b"PTCX" + bytes(20), ack], 2.0) == 2
