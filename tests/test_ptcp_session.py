"""PTCP sans-IO Session: counters, acks, realms, timers and reliability over a simulated link.

Everything here runs on a fake clock: no sockets, no sleeps.
"""

from __future__ import annotations

import heapq
import random

import pytest
from _ptcp_support import connect_pair, shuttle
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load_vectors
from ptcp import (
    ACK_DELAY,
    LMID_MASK,
    MASK32,
    REALM_HEAD_LEN,
    Bind,
    BindRequested,
    Command,
    CommandReceived,
    Data,
    DataReceived,
    Heartbeat,
    HeartbeatReceived,
    Packet,
    PeerDead,
    PTCPError,
    RealmClosed,
    RealmConnected,
    ResendRequest,
    Session,
    Status,
    Syn,
    SynReceived,
    TunnelUnavailable,
    decode_packet,
    encode_packet,
)

VECTORS = load_vectors()["ptcp"]
REALM = VECTORS["realm"]


class FixedRealms(random.Random):
    """An rng whose first getrandbits answers are scripted (to hit the vector's realm)."""

    def __init__(self, *values: int) -> None:
        super().__init__(1)
        self.values = list(values)

    def getrandbits(self, k: int) -> int:
        return self.values.pop(0) if self.values else super().getrandbits(k)


def pkt(sent=0, recv=0, lmid=0, rmid=0, body=None, pid=0xFFFF) -> bytes:
    return encode_packet(Packet(sent, recv, pid, lmid, rmid, body))


def decoded(session: Session) -> list[Packet]:
    return [decode_packet(d) for d in session.datagrams_to_send()]


# -- wire behaviour --------------------------------------------------------


def test_client_handshake_reproduces_vectors():
    # the golden vectors follow the older public tools' pid/lmid counters and BIND
    s = Session(now=0.0, rng=FixedRealms(REALM), ids="counter", bind_length=0)
    s.send_syn(0.0)
    assert s.datagrams_to_send() == [bytes.fromhex(VECTORS["syn_hex"])]
    s.receive_datagram(pkt(0, 0, 0, 0, Syn(), pid=0x0002FFFF), 0.0)  # device SYN
    assert s.events() == [SynReceived()]
    assert s.datagrams_to_send() == [bytes.fromhex(VECTORS["ack_hex"])]
    s.receive_datagram(pkt(4, 4, 1, 1), 0.0)  # device acks our SYN
    assert s.datagrams_to_send() == []  # empty packets are not answered
    assert s.open_realm(554, 0.0) == REALM
    assert s.datagrams_to_send() == [bytes.fromhex(VECTORS["bind_554_hex"])]


def test_every_nonempty_packet_is_acked_with_updated_counters():
    s = Session(now=0.0, ids="counter")
    s.receive_datagram(pkt(0, 0, 7, 0, Heartbeat()), 0.0)
    (ack,) = decoded(s)
    assert ack.body is None and ack.recv == 12 and ack.rmid == 7 and ack.sent == 0
    s.receive_datagram(pkt(12, 0, 8, 0, Heartbeat()), 0.0)
    (ack2,) = decoded(s)
    assert ack2.recv == 24 and ack2.rmid == 8 and ack2.lmid == ack.lmid + 1
    assert s.events() == [HeartbeatReceived(), HeartbeatReceived()]


def test_pid_counts_down_wraps_in_16_bits_and_lmid_increases():
    a, b = Session(now=0.0, ids="counter"), Session(now=0.0, ids="counter")
    realm = connect_pair(a, b)
    seen = []
    for _ in range(70000 // 100):
        a.send(realm, bytes(100), 0.0)
        for d in a.datagrams_to_send():
            p = decode_packet(d)
            seen.append(p)
            b.receive_datagram(d, 0.0)
        for d in b.datagrams_to_send():
            a.receive_datagram(d, 0.0)
    datas = [p for p in seen if p.body is not None]
    assert all(0 <= p.pid <= 0xFFFF for p in datas)
    pids = [p.pid for p in datas]
    # consecutive non-empty packets: pid decreases by one modulo 2^16, never repeats soon
    assert all((x - y) & 0xFFFF == 1 for x, y in zip(pids, pids[1:], strict=False))
    assert len(set(pids[-65536:])) == len(pids[-65536:])
    lmids = [p.lmid for p in seen]
    assert lmids == sorted(lmids) and len(set(lmids)) == len(lmids)


def test_stray_datagrams_raise_and_change_nothing():
    s = Session(now=0.0)
    for raw in (b"HTTP/1.1 200 OK\r\n\r\n", b"\xfe\xff" * 30, b"PTCP"):
        with pytest.raises(PTCPError):
            s.receive_datagram(raw, 0.0)
    assert s.datagrams_to_send() == [] and s.events() == [] and s.recv == 0


def test_out_of_order_and_duplicates_delivered_once_in_order():
    s = Session(now=0.0, rng=FixedRealms(REALM))
    realm = s.open_realm(554, 0.0)
    s.receive_datagram(pkt(0, 0, 0, 0, Status(realm, True)), 0.0)
    assert s.events() == [RealmConnected(realm)]
    s.datagrams_to_send()
    chunks = [Data(realm, bytes([i]) * (i + 1)) for i in range(5)]
    offsets, off = [], 16
    for c in chunks:
        offsets.append(off)
        off += 12 + len(c.data)
    order = [3, 1, 1, 4, 0, 2, 0, 3]
    acks = []
    for lmid, i in enumerate(order, start=1):
        s.receive_datagram(pkt(offsets[i], 0, lmid, 0, chunks[i]), 0.0)
        acks.extend(p.recv for p in decoded(s))
    data = b"".join(e.data for e in s.events() if isinstance(e, DataReceived))
    assert data == b"".join(c.data for c in chunks)
    # only contiguous bytes are acknowledged; every packet, even a duplicate, got an ack
    assert acks == [16, 16, 16, 16, offsets[2], off, off, off]
    assert s.stats.duplicates == 2


def test_retransmission_after_rto_with_backoff_and_fresh_ids():
    s = Session(now=0.0, initial_rto=1.0, heartbeat_interval=None)
    s.send_syn(0.0)
    (first,) = decoded(s)
    assert s.next_deadline() == pytest.approx(1.0)
    s.handle_timers(0.99)
    assert decoded(s) == []
    s.handle_timers(1.0)
    (again,) = decoded(s)
    # lmid is a millisecond clock (PROTOCOLS 2.7 (a)): the resend goes out 1 s later
    assert again.sent == first.sent and again.body == Syn() and again.lmid == first.lmid + 1000
    assert s.next_deadline() == pytest.approx(3.0)  # backed off to 2 s
    s.handle_timers(3.0)
    (third,) = decoded(s)
    assert third.lmid == again.lmid + 2000
    assert s.next_deadline() == pytest.approx(7.0)
    s.receive_datagram(pkt(0, 4, 0, third.lmid), 7.5)
    s.handle_timers(30.0)
    assert decoded(s) == [] and s.unacked_bytes == 0


@pytest.mark.parametrize("ids", ["capture", "counter"])
def test_retransmission_gets_a_fresh_lmid_and_pid(ids: str):
    a, b = Session(now=0.0, ids=ids), Session(now=0.0, ids=ids)
    realm = connect_pair(a, b)
    a.send(realm, b"x" * 10, 0.0)
    (orig,) = decoded(a)
    a.handle_timers(a.next_deadline())
    (re,) = decoded(a)
    assert re.sent == orig.sent and re.body == orig.body and re.lmid > orig.lmid
    # counter: one less per packet sent; capture: nothing received since the last packet
    assert re.pid == ((orig.pid - 1) & 0xFFFF if ids == "counter" else 0xFFFF)


def test_rto_follows_measured_round_trips():
    a, b = Session(now=0.0, min_rto=0.001), Session(now=0.0, ack_every=1)
    realm = connect_pair(a, b)
    t = 1.0
    for _ in range(50):
        a.send(realm, b"ping", t)
        for d in a.datagrams_to_send():
            b.receive_datagram(d, t + 0.010)
        for d in b.datagrams_to_send():
            a.receive_datagram(d, t + 0.020)
        b.events()
        t += 1.0
    assert a.srtt == pytest.approx(0.020, rel=0.05)
    assert 0.020 <= a.rto < 0.1


def test_send_window_is_bounded_and_reopens_on_ack():
    a, b = Session(now=0.0, window_bytes=64 * 1024), Session(now=0.0)
    realm = connect_pair(a, b)
    took = a.send(realm, bytes(1 << 20), 0.0)
    assert 0 < took <= 64 * 1024
    assert a.send(realm, b"more", 0.0) == 0
    assert a.send_space == 0
    shuttle(a, b, 0.1)
    assert a.send_space > 0 and a.unacked_bytes < 64 * 1024


def test_data_bodies_are_at_most_max_data():
    for max_data in (1280, 500):
        a, b = Session(now=0.0, max_data=max_data), Session(now=0.0)
        realm = connect_pair(a, b)
        a.send(realm, bytes(10_000), 0.0)
        sizes = [len(p.body.data) for p in decoded(a) if isinstance(p.body, Data)]
        assert max(sizes) == max_data and sum(sizes) <= 10_000


def test_heartbeats_and_peer_dead():
    s = Session(now=0.0, heartbeat_interval=5.0, dead_after=12.0)
    assert s.next_deadline() == 5.0
    s.handle_timers(5.0)
    (hb,) = decoded(s)
    assert hb.body == Heartbeat()
    s.receive_datagram(pkt(0, 12, 0, hb.lmid), 6.0)  # peer acks: alive at t=6
    s.handle_timers(10.0)
    assert [p.body for p in decoded(s)] == [Heartbeat()]
    s.handle_timers(17.9)
    assert s.events() == [] and not s.dead
    assert s.next_deadline() <= 18.0
    s.handle_timers(18.0)
    assert s.events() == [PeerDead(12.0)] and s.dead
    assert s.next_deadline() is None


def test_command_and_syn_events_share_the_stream():
    a, b = Session(now=0.0), Session(now=0.0)
    a.send_syn(0.0)
    a.send_command(0x17, b"", 0.0)
    shuttle(a, b, 0.0)
    assert b.events() == [SynReceived(), CommandReceived(0x17, b"")]
    b.send_command(0x1A, b"sign-bytes", 0.0)
    shuttle(a, b, 0.0)
    assert a.events() == [CommandReceived(0x1A, b"sign-bytes")]
    assert a.sent == 4 + 12 and b.recv == 16 and a.recv == 22 and a.unacked_bytes == 0


# -- realms ----------------------------------------------------------------


def test_realm_refused_by_disc():
    a, b = Session(now=0.0), Session(now=0.0)
    realm = a.open_realm(80, 0.0)
    shuttle(a, b, 0.0)
    (req,) = b.events()
    b.refuse(req.realm, 0.0)
    shuttle(a, b, 0.0)
    assert a.events() == [RealmClosed(realm, "refused")]
    assert a.realm_state(realm) is None and b.realm_state(realm) is None
    with pytest.raises(PTCPError):
        a.send(realm, b"x", 0.0)


def test_realm_open_timeout_sends_disc():
    a = Session(now=0.0, open_timeout=3.0)
    realm = a.open_realm(554, 0.0)
    a.datagrams_to_send()
    a.receive_datagram(pkt(0, 20, 0, 0), 0.5)  # bind acked, no answer
    a.handle_timers(2.9)
    assert a.events() == []
    a.handle_timers(3.0)
    assert a.events() == [RealmClosed(realm, "timeout")]
    assert Status(realm, False) in [p.body for p in decoded(a)]


def test_close_realm_and_peer_answer():
    a, b = Session(now=0.0), Session(now=0.0)
    realm = connect_pair(a, b)
    a.close_realm(realm, 1.0)
    shuttle(a, b, 1.0)
    assert b.events() == [RealmClosed(realm, "peer")]
    assert a.events() == [RealmClosed(realm, "local")]
    assert a.realms == {} and b.realms == {}
    assert a.unacked_bytes == 0 and b.unacked_bytes == 0


def test_disc_for_unknown_realm_is_not_answered():
    s = Session(now=0.0)
    s.receive_datagram(pkt(0, 0, 0, 0, Status(1234, False)), 0.0)
    assert [p.body for p in decoded(s)] == [None]
    assert s.events() == []


def test_data_for_unknown_or_closed_realm_is_ignored():
    a, b = Session(now=0.0), Session(now=0.0)
    realm = connect_pair(a, b)
    b.receive_datagram(pkt(b.recv, 0, 99, 0, Data(realm ^ 1, b"zz")), 0.0)
    assert b.events() == [] and b.stats.ignored == 1


def test_realm_ids_are_fresh_and_never_collide_with_live_ones():
    s = Session(now=0.0, rng=FixedRealms(5, 5, 0, 5, 6))
    assert s.open_realm(1, 0.0) == 5
    assert s.open_realm(1, 0.0) == 6  # 5 is live, 0 is never used
    s2 = Session(now=0.0)
    realms = {s2.open_realm(554, 0.0) for _ in range(200)}
    assert len(realms) == 200 and 0 not in realms


def test_bind_for_live_realm_is_ignored():
    s = Session(now=0.0)
    s.receive_datagram(pkt(0, 0, 0, 0, Bind(42, 554)), 0.0)
    s.receive_datagram(pkt(20, 0, 1, 0, Bind(42, 80)), 0.0)
    assert s.events() == [BindRequested(42, 554, "127.0.0.1")]


# -- a peer that behaves like the public tools -------------------------------


class PublicToolPeer:
    """Counts every body byte it receives, acks each packet, never retransmits."""

    def __init__(self) -> None:
        self.sent = self.recv = self.count = self.lmid = self.rmid = 0
        self.out: list[bytes] = []
        self.got: list[Packet] = []

    def send(self, body) -> None:
        from ptcp import encode_body

        raw = encode_body(body)
        pid = 0x0002FFFF if isinstance(body, Syn) else 0xFFFF - self.count
        self.out.append(pkt(self.sent, self.recv, self.lmid, self.rmid, body, pid=pid))
        self.sent += len(raw)
        self.lmid += 1
        if raw and not isinstance(body, Syn):
            self.count += 1

    def receive(self, raw: bytes) -> None:
        p = decode_packet(raw)
        self.rmid = p.lmid
        if p.body is not None:
            self.recv += len(raw) - 24
            self.got.append(p)
            self.send(None)


def test_works_with_a_public_tool_peer():
    s = Session(now=0.0)
    peer = PublicToolPeer()
    s.send_syn(0.0)

    def pump(t: float) -> None:
        while True:
            out, peer.out = peer.out, []
            mine = s.datagrams_to_send()
            if not out and not mine:
                return
            for d in mine:
                peer.receive(d)
            for d in out:
                s.receive_datagram(d, t)

    pump(0.0)
    peer.send(Syn())
    pump(0.0)
    realm = s.open_realm(554, 0.0)
    pump(0.0)
    peer.send(Status(realm, True))
    pump(0.0)
    assert RealmConnected(realm) in s.events()
    payload = random.Random(3).randbytes(300_000)
    pos = 0
    t = 0.0
    while pos < len(payload):
        pos += s.send(realm, memoryview(payload)[pos : pos + 50_000], t)
        pump(t)
        t += 0.001
    for i in range(0, 200_000, 1000):
        peer.send(Data(realm, payload[i : i + 1000]))
    pump(t)
    got = b"".join(p.body.data for p in peer.got if isinstance(p.body, Data))
    assert got == payload
    back = b"".join(e.data for e in s.events() if isinstance(e, DataReceived))
    assert back == payload[:200_000]
    assert s.stats.retransmits == 0 and s.unacked_bytes == 0


# -- reliability over a bad link ------------------------------------------------


class Link:
    """Both directions of a lossy, reordering, duplicating datagram link on a fake clock."""

    def __init__(
        self, seed: int, loss=0.05, dup=0.02, reorder=0.05, delay=0.010, jitter=0.002
    ) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder, self.delay, self.jitter = (
            loss,
            dup,
            reorder,
            delay,
            jitter,
        )
        self.heap: list[tuple[float, int, int, bytes]] = []
        self.seq = 0
        self.carried = 0

    def carry(self, now: float, dst: int, datagrams: list[bytes]) -> None:
        rnd = self.rng.random
        for d in datagrams:
            self.carried += 1
            if rnd() < self.loss:
                continue
            copies = 2 if rnd() < self.dup else 1
            for _ in range(copies):
                extra = rnd() * self.jitter
                if rnd() < self.reorder:
                    extra += rnd() * 4 * self.delay  # overtaken by later packets
                self.seq += 1
                heapq.heappush(self.heap, (now + self.delay + extra, self.seq, dst, d))


def run_bulk(a: Session, b: Session, realm: int, link: Link, size: int, seed: int, t0=0.0):
    """Move ``size`` random bytes each way on one realm; return (sent, received) per side."""
    rng = random.Random(seed)
    src = [rng.randbytes(size), rng.randbytes(size)]
    got: list[list[bytes]] = [[], []]
    pos = [0, 0]
    sides = (a, b)
    now = t0
    heap = link.heap
    while True:
        for i, s in enumerate(sides):
            if pos[i] < size and s.send_space:
                pos[i] += s.send(realm, memoryview(src[i])[pos[i] : pos[i] + 262144], now)
            out = s.datagrams_to_send()
            if out:
                link.carry(now, 1 - i, out)
            for ev in s.events():
                if type(ev) is DataReceived:
                    got[i].append(ev.data)
                else:
                    assert not isinstance(ev, (PeerDead, RealmClosed)), ev
        if (
            pos == [size, size]
            and not a.unacked_bytes
            and not b.unacked_bytes
            and not heap
        ):
            break
        deadlines = [t for t in (a.next_deadline(), b.next_deadline()) if t is not None]
        nxt = min(deadlines)
        if heap and heap[0][0] < nxt:
            nxt = heap[0][0]
        now = max(now, nxt)
        while heap and heap[0][0] <= now:
            _, _, dst, d = heapq.heappop(heap)
            sides[dst].receive_datagram(d, now)
        for s in sides:
            s.handle_timers(now)
            deadline = s.next_deadline()
            assert deadline is None or deadline > now  # no timer left due: no busy loop
    return src, [b"".join(g) for g in got], now


def test_twenty_megabytes_each_way_over_a_lossy_reordering_duplicating_link():
    a = Session(now=0.0, rng=random.Random(1))
    b = Session(now=0.0, rng=random.Random(2))
    realm = connect_pair(a, b)
    link = Link(seed=7)
    size = 20 * 1024 * 1024
    src, got, end = run_bulk(a, b, realm, link, size, seed=11)
    assert got[1] == src[0]  # a -> b
    assert got[0] == src[1]  # b -> a
    for s in (a, b):
        assert s.stats.retransmits > 0 and s.stats.out_of_order > 0 and s.stats.duplicates > 0
    assert not a.dead and not b.dead


def test_counters_wrap_at_two_to_the_32():
    start_a, start_b = MASK32 - 300_000, MASK32 - 5
    a = Session(now=0.0, initial_sent=start_a, initial_recv=start_b, initial_lmid=MASK32 - 2)
    b = Session(now=0.0, initial_sent=start_b, initial_recv=start_a)
    realm = connect_pair(a, b)
    seen = []
    link = Link(seed=3, loss=0.02)
    orig_carry = link.carry

    def spy(now, dst, datagrams):
        seen.extend(decode_packet(d) for d in datagrams)
        orig_carry(now, dst, datagrams)

    link.carry = spy
    src, got, _ = run_bulk(a, b, realm, link, 2 * 1024 * 1024, seed=5)
    assert got[1] == src[0] and got[0] == src[1]
    # both stream offsets really crossed the wrap
    assert a.sent < start_a and b.sent < start_b and a.recv == b.sent and b.recv == a.sent
    assert any(p.sent > start_a for p in seen) and any(p.sent < 1_000_000 for p in seen)
    assert a.stats.timeouts < 50 and b.stats.timeouts < 50  # no stall at the wrap


def test_lossless_link_needs_no_retransmission():
    a, b = Session(now=0.0), Session(now=0.0)
    realm = connect_pair(a, b)
    link = Link(seed=1, loss=0.0, dup=0.0, reorder=0.0, jitter=0.0)
    src, got, _ = run_bulk(a, b, realm, link, 4 * 1024 * 1024, seed=2)
    assert got[1] == src[0] and got[0] == src[1]
    assert a.stats.retransmits == 0 and b.stats.retransmits == 0


def test_command_payload_vector_via_session():
    a = Session(now=0.0)
    a.send_command(0x17, b"", 0.0)
    (raw,) = a.datagrams_to_send()
    assert raw[24:] == bytes.fromhex(VECTORS["sign_request_body_hex"])
    p = decode_packet(raw)
    assert p.body == Command(0x17, b"") and p.pid == 0xFFFF


def test_three_duplicate_acks_trigger_fast_retransmit_before_the_timer():
    a, b = Session(now=0.0, heartbeat_interval=None), Session(now=0.0, heartbeat_interval=None)
    realm = connect_pair(a, b)
    a.send(realm, bytes(1280 * 6), 1.0)
    out = a.datagrams_to_send()
    assert len(out) == 6
    lost = decode_packet(out[1])
    for d in out[:1] + out[2:]:
        b.receive_datagram(d, 1.01)
    acks = b.datagrams_to_send()
    # the first packet's ack waits for a second one; every packet past the hole is
    # answered at once: an ack that advances, then three duplicates
    assert [decode_packet(d).recv for d in acks] == [lost.sent] * 4
    for d in acks:
        a.receive_datagram(d, 1.02)
    (re,) = decoded(a)
    assert re.sent == lost.sent and re.body == lost.body
    assert a.stats.fast_retransmits == 1 and a.stats.timeouts == 0
    b.receive_datagram(encode_packet(re), 1.03)
    got = b"".join(e.data for e in b.events() if isinstance(e, DataReceived))
    assert got == bytes(1280 * 6)


def test_out_of_order_buffer_is_bounded():
    a = Session(now=0.0, heartbeat_interval=None)
    b = Session(now=0.0, heartbeat_interval=None, max_out_of_order=3, max_ahead=6 * 1292)
    realm = connect_pair(a, b)
    a._cwnd = 1 << 20  # let everything out at once for this test
    a.send(realm, bytes(range(256)) * 50, 1.0)
    out = a.datagrams_to_send()
    assert len(out) == 10
    for d in out[1:]:
        b.receive_datagram(d, 1.0)
    assert len(b._ooo) == 3 and b.stats.dropped_ahead == 6
    b.receive_datagram(out[0], 1.0)
    assert b.recv == decode_packet(out[4]).sent  # 0 and the 3 held ones delivered
    # the sender recovers the dropped ones by itself
    _, got, _ = run_bulk(a, b, realm, Link(seed=4, loss=0, dup=0), 0, seed=0, t0=2.0)
    assert got[1] == bytes(range(256)) * 50
    assert b.recv == a.sent and a.unacked_bytes == 0


def test_ack_beyond_what_was_sent_is_dropped_and_answered():
    s = Session(now=0.0, heartbeat_interval=None)
    s.send_syn(0.0)
    s.send_command(0x17, b"", 0.0)
    s.datagrams_to_send()
    s.receive_datagram(pkt(0, 16 + 16, 0, 1), 0.1)  # acknowledges 16 bytes never sent
    (answer,) = decoded(s)  # RFC 9293 3.10.7.4: a current ack, nothing else
    assert answer.body is None and answer.recv == 0 and answer.sent == s.sent
    assert s.unacked_bytes == 16 and s.stats.ack_beyond == 1
    assert s.next_deadline() == pytest.approx(1.0)  # the retransmission timer still runs


def test_forged_ack_does_not_stop_a_transfer_that_lost_a_segment():
    # The probe: one pure ACK far beyond what was sent, while a segment is lost.
    a = Session(now=0.0, heartbeat_interval=None)
    b = Session(now=0.0, heartbeat_interval=None)
    realm = connect_pair(a, b)
    a.send(realm, bytes(range(256)) * 40, 1.0)  # 10240 bytes, 8 segments
    out = a.datagrams_to_send()
    assert len(out) == 8
    for d in out[:1] + out[2:]:  # the second segment is lost
        b.receive_datagram(d, 1.0)
    b.datagrams_to_send()  # its duplicate acks are lost too
    a.receive_datagram(pkt(b.sent, (a.sent + (1 << 20)) & MASK32, b.lmid, a.lmid), 1.01)
    assert a.stats.ack_beyond == 1 and a.unacked_bytes == 10240 + 8 * 12
    got = b"".join(e.data for e in b.events() if isinstance(e, DataReceived))
    now = 1.01
    while a.unacked_bytes:
        now = a.next_deadline()
        a.handle_timers(now)
        shuttle(a, b, now)
        got += b"".join(e.data for e in b.events() if isinstance(e, DataReceived))
        assert now < 30, "the transfer stalled"
    assert got == bytes(range(256)) * 40


def test_data_far_outside_the_receive_window_is_not_data():
    a, b = Session(now=0.0, heartbeat_interval=None), Session(now=0.0, heartbeat_interval=None)
    realm = connect_pair(a, b)
    a.send(realm, b"real", 1.0)
    (real,) = a.datagrams_to_send()
    far = (b.recv + HALF_WINDOW) & MASK32
    for off in (far, (b.recv - HALF_WINDOW) & MASK32):
        b.receive_datagram(pkt(off, b.sent, 999, 0, Data(realm, b"forged")), 1.0)
        (answer,) = decoded(b)
        assert answer.body is None and answer.recv == decode_packet(real).sent
    assert b.stats.out_of_window == 2 and b.events() == [] and b.rmid != 999
    b.receive_datagram(real, 1.0)
    assert b.events() == [DataReceived(realm, b"real")]


HALF_WINDOW = 0x40000000  # far beyond any max_ahead, on either side


def test_old_acks_and_old_lmids_are_harmless():
    a, b = Session(now=0.0), Session(now=0.0)
    realm = connect_pair(a, b)
    rmid = a.rmid
    # stale: acknowledges nothing new and carries an older lmid
    a.receive_datagram(pkt(b.sent, 0, (rmid - 5) & MASK32, 0), 0.0)
    assert a.rmid == rmid and a.unacked_bytes == 0
    a.send(realm, b"abc", 0.0)
    shuttle(a, b, 0.0)
    assert DataReceived(realm, b"abc") in b.events()


def test_dead_session_refuses_new_work():
    s = Session(now=0.0, dead_after=1.0)
    s.handle_timers(1.0)
    assert s.dead
    with pytest.raises(PTCPError):
        s.open_realm(554, 1.0)
    s.receive_datagram(pkt(0, 0, 0, 0, Heartbeat()), 2.0)
    assert s.events() == [PeerDead(1.0)] and s.datagrams_to_send() == []


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    loss=st.floats(0, 0.25),
    dup=st.floats(0, 0.2),
    reorder=st.floats(0, 0.5),
    size=st.integers(0, 100_000),
    max_data=st.integers(32, 1400),
    start=st.integers(0, MASK32),
)
def test_any_link_any_start_delivers_byte_exact(seed, loss, dup, reorder, size, max_data, start):
    # up to 25% loss each way can back the timer off past 20 s of no progress: the
    # stall rule is a liveness policy for real devices, not what this test is about
    opts = {"max_data": max_data, "window_bytes": 64 * 1024 + max_data, "stall_after": None}
    a = Session(now=0.0, initial_sent=start, initial_recv=start ^ 0x5555, **opts)
    b = Session(now=0.0, initial_sent=start ^ 0x5555, initial_recv=start, **opts)
    realm = connect_pair(a, b)
    link = Link(seed=seed, loss=loss, dup=dup, reorder=reorder)
    src, got, _ = run_bulk(a, b, realm, link, size, seed=seed)
    assert got[1] == src[0] and got[0] == src[1]


def test_send_waits_for_room_for_a_full_body():
    a, b = Session(now=0.0, window_bytes=10 * 1292 + 100), Session(now=0.0)
    realm = connect_pair(a, b)
    assert a.send(realm, bytes(10 * 1280), 0.0) == 10 * 1280
    assert a.send_space == 100
    assert a.send(realm, bytes(5000), 0.0) == 0  # no sliver bodies
    assert a.send(realm, bytes(50), 0.0) == 50  # but a small write that fits goes


def test_delayed_ack_answers_a_batch_once_but_gaps_at_once():
    a = Session(now=0.0, heartbeat_interval=None)
    b = Session(now=0.0, heartbeat_interval=None, delayed_ack=True)
    realm = connect_pair(a, b)
    a._cwnd = 1 << 20
    a.send(realm, bytes(1280 * 8), 1.0)
    out = a.datagrams_to_send()
    for d in out[:4]:
        b.receive_datagram(d, 1.0)
    (ack,) = decoded(b)  # one acknowledgement for four packets
    assert ack.body is None and ack.recv == decode_packet(out[4]).sent
    b.receive_datagram(out[6], 1.0)  # a gap: answered at once
    b.receive_datagram(out[5], 1.0)
    gap = decode_packet(out[4]).sent
    assert [p.recv for p in decode_out(b._out)] == [gap, gap]  # queued before any flush
    b.receive_datagram(out[4], 1.0)  # fills the gap: answered at once too
    b.receive_datagram(out[7], 1.0)  # in order again: waits for the flush
    assert [p.recv for p in decoded(b)] == [gap, gap, decode_packet(out[7]).sent, a.sent]


def decode_out(raws: list[bytes]) -> list[Packet]:
    return [decode_packet(r) for r in raws]


def test_delayed_ack_sessions_over_a_lossy_link():
    a = Session(now=0.0, delayed_ack=True)
    b = Session(now=0.0, delayed_ack=True)
    realm = connect_pair(a, b)
    src, got, _ = run_bulk(a, b, realm, Link(seed=9), 3 * 1024 * 1024, seed=9)
    assert got[1] == src[0] and got[0] == src[1]


# -- pid and lmid as the official app makes them (PROTOCOLS 2.7 (a)) ----------------


def test_lmid_is_a_10_ms_clock_starting_well_above_zero_and_below_2_31():
    s = Session(now=100.0, heartbeat_interval=None)
    s.send_syn(100.0)
    (syn,) = decoded(s)
    assert syn.lmid == 60_000 and syn.pid == 0x0002FFFF
    s.receive_datagram(pkt(0, 4, 5, syn.lmid, Heartbeat()), 100.0234)
    (ack,) = decoded(s)
    assert ack.lmid == 60_020  # rounded down to 10 ms: packets in one tick share it
    s.receive_datagram(pkt(12, 4, 6, syn.lmid, Heartbeat()), 100.0239)
    assert decoded(s)[0].lmid == 60_020
    late = Session(now=0.0, heartbeat_interval=None, initial_lmid=0x7FFFFFF0)
    late.handle_timers(1.0)
    late.send_syn(1.0)
    assert decoded(late)[0].lmid < 2**31  # masked below 2^31, never above


def test_rmid_follows_a_peer_clock_that_wraps_below_2_31() -> None:
    s = Session(now=0.0, heartbeat_interval=None)
    top = LMID_MASK - 15  # 24.8 days of a millisecond clock kept below 2^31
    sent = 0
    for lmid in (top, top + 10, 4, 14):  # the clock wrapped between the second and third
        s.receive_datagram(pkt(sent, 0, lmid, 0, Heartbeat()), 0.0)
        sent += 12
        assert s.rmid == lmid
    s.receive_datagram(pkt(sent, 0, top + 10, 0, Heartbeat()), 0.0)  # a late one from before
    assert s.rmid == 14


def test_pid_is_ffff_less_the_bytes_received_since_our_last_packet():
    s = Session(now=0.0, heartbeat_interval=None)
    realm_data = Data(7, b"v" * 1000)
    s.receive_datagram(pkt(0, 0, 1, 0, Heartbeat()), 0.0)
    (ack,) = decoded(s)
    assert ack.pid == 0xFFFF - 12
    # three packets read in one batch are acknowledged one by one: each ack
    # carries the bytes it acknowledges, not the whole batch
    # packets read in one batch are acknowledged pair by pair: each ack carries
    # the bytes it acknowledges, not the whole batch; the fifth waits for the backstop
    batch = [pkt(12 + i * 1012, 0, 2 + i, 0, realm_data) for i in range(5)]
    s.receive_datagrams(batch, 0.1)
    acks = decoded(s)
    assert [a.pid for a in acks] == [0xFFFF - 2024] * 2
    s.handle_timers(0.1 + ACK_DELAY)
    (late,) = decoded(s)
    assert late.pid == 0xFFFF - 1012 and late.recv == 12 + 5 * 1012
    s.send_heartbeat(0.2)
    (hb,) = decoded(s)
    assert hb.pid == 0xFFFF  # nothing received since the last ack


# -- binds: one at a time, retirement, max realms (PROTOCOLS 2.7 (b)) -------------


def bind_realms(s: Session) -> list[int]:
    """The realms of the BINDs ``s`` sends now."""
    return [p.body.realm for p in decoded(s) if isinstance(p.body, Bind)]


def device_status(s: Session, sent: int, realm: int, connected: bool, now: float) -> int:
    """The device answers ``realm``'s BIND; returns its next sent."""
    s.receive_datagram(pkt(sent, s.sent, 2, 0, Status(realm, connected)), now)
    return s.recv


def test_binds_go_out_one_at_a_time() -> None:
    s = Session(now=0.0, heartbeat_interval=None, rng=FixedRealms(1, 2, 3))
    assert [s.open_realm(554, 0.0) for _ in range(3)] == [1, 2, 3]
    assert bind_realms(s) == [1]  # 2 and 3 wait for the answer to 1
    sent = device_status(s, 0, 1, True, 0.1)
    assert s.events() == [RealmConnected(1)] and bind_realms(s) == [2]
    device_status(s, sent, 2, False, 0.2)  # a refusal is an answer too
    assert s.events() == [RealmClosed(2, "refused")] and bind_realms(s) == [3]


def test_an_unanswered_bind_retires_the_session_and_ends_the_waiting_ones() -> None:
    s = Session(
        now=0.0,
        heartbeat_interval=None,
        initial_rto=5.0,  # no retransmission of the BIND within this test
        bind_timeout=2.0,
        rng=FixedRealms(1, 2, 3),
    )
    for _ in range(3):
        s.open_realm(554, 0.0)
    assert bind_realms(s) == [1] and s.can_open
    assert s.next_deadline() == pytest.approx(2.0)  # bind_timeout, not open_timeout
    s.handle_timers(2.0)
    events = s.events()
    assert RealmClosed(1, "timeout") in events
    assert [e for e in events if e.reason == "retired"] == [
        RealmClosed(2, "retired"),
        RealmClosed(3, "retired"),
    ]
    assert s.retired and not s.can_open and bind_realms(s) == []
    with pytest.raises(TunnelUnavailable):
        s.open_realm(554, 2.0)


def test_without_bind_timeout_a_timed_out_bind_lets_the_next_go() -> None:
    s = Session(now=0.0, heartbeat_interval=None, initial_rto=5.0, rng=FixedRealms(1, 2))
    s.open_realm(554, 0.0, timeout=3.0)
    s.open_realm(554, 0.0, timeout=3.0)
    assert bind_realms(s) == [1]
    s.handle_timers(3.0)
    assert s.events() == [RealmClosed(1, "timeout")]
    assert not s.retired and bind_realms(s) == [2]


def test_a_waiting_bind_closed_locally_never_goes_out() -> None:
    s = Session(now=0.0, heartbeat_interval=None, rng=FixedRealms(1, 2, 3))
    for _ in range(3):
        s.open_realm(554, 0.0)
    decoded(s)
    s.close_realm(2, 0.1)
    assert s.events() == [RealmClosed(2, "local")] and decoded(s) == []
    device_status(s, 0, 1, True, 0.2)
    assert bind_realms(s) == [3]


def test_max_realms_bounds_the_realms_alive_at_once() -> None:
    s = Session(now=0.0, heartbeat_interval=None, max_realms=2, rng=FixedRealms(1, 2, 3))
    s.open_realm(554, 0.0)
    s.open_realm(554, 0.0)
    assert not s.can_open
    with pytest.raises(TunnelUnavailable):
        s.open_realm(554, 0.0)
    device_status(s, 0, 1, False, 0.1)  # refused: one place free again
    assert s.can_open and s.open_realm(554, 0.2) == 3


# -- acknowledgement rate (PROTOCOLS 2.7 (b)) ------------------------------------


def paired(**options: object) -> Session:
    """A client session whose realm will be 7."""
    return Session(now=0.0, heartbeat_interval=None, rng=FixedRealms(7), **options)


def open_device_realm(s: Session, realm: int = 7) -> int:
    """``s`` binds ``realm``; the device grants it. Returns the device's next sent."""
    assert s.open_realm(554, 0.0) == realm
    s.datagrams_to_send()
    s.receive_datagram(pkt(0, s.sent, 1, 0, Status(realm, True)), 0.0)
    s.datagrams_to_send()
    return s.recv


def device_data(s: Session, sent: int, count: int, now: float, size: int = 1000) -> int:
    """``count`` in-order data packets from the device; returns the next sent."""
    for _ in range(count):
        s.receive_datagram(pkt(sent, s.sent, 2, 0, Data(7, b"d" * size)), now)
        sent += REALM_HEAD_LEN + size
    return sent


def test_in_order_data_is_acknowledged_every_second_packet() -> None:
    s = paired()
    sent = device_data(s, open_device_realm(s), 1, 1.0)
    assert s.datagrams_to_send() == []  # owed, not yet sent
    assert s.next_deadline() == pytest.approx(1.0 + ACK_DELAY)
    sent = device_data(s, sent, 1, 1.005)
    (ack,) = decoded(s)
    assert ack.body is None and ack.recv == sent and ack.pid == 0xFFFF - 2024
    sent = device_data(s, sent, 3, 1.01)
    assert [a.recv for a in decoded(s)] == [sent - 1012]  # the third waits for a partner
    s.handle_timers(1.01 + ACK_DELAY / 2)
    assert s.datagrams_to_send() == []
    s.handle_timers(1.01 + ACK_DELAY)  # the backstop
    (late,) = decoded(s)
    assert late.recv == sent and late.pid == 0xFFFF - 1012
    s.handle_timers(2.0)
    assert s.datagrams_to_send() == []  # nothing owed: no further ack


def test_an_owed_ack_rides_on_our_next_packet() -> None:
    s = paired()
    sent = device_data(s, open_device_realm(s), 1, 1.0)
    s.send(7, b"GET / HTTP/1.0\r\n\r\n", 1.001)
    (data,) = decoded(s)
    assert data.recv == sent and isinstance(data.body, Data)
    s.handle_timers(1.0 + ACK_DELAY)
    assert s.datagrams_to_send() == []  # already acknowledged by the data packet


def test_other_bodies_holes_and_duplicates_are_answered_at_once() -> None:
    s = paired()
    sent = open_device_realm(s)
    s.receive_datagram(pkt(sent, s.sent, 2, 0, Heartbeat()), 1.0)
    assert [a.recv for a in decoded(s)] == [sent + 12]
    sent += 12
    s.receive_datagram(pkt(sent + 1012, s.sent, 3, 0, Data(7, b"d" * 1000)), 1.0)  # a hole
    assert [a.recv for a in decoded(s)] == [sent]
    s.receive_datagram(pkt(sent - 12, s.sent, 4, 0, Heartbeat()), 1.0)  # a duplicate
    assert [a.recv for a in decoded(s)] == [sent]


def test_ack_every_one_answers_each_data_packet_as_the_older_tools_do() -> None:
    s = paired(ack_every=1)
    sent = device_data(s, open_device_realm(s), 3, 1.0)
    assert [a.recv for a in decoded(s)] == [sent - 2024, sent - 1012, sent]
    with pytest.raises(ValueError):
        Session(now=0.0, ack_every=4)  # three bodies already reach the pid band


# -- 0x0a: the device's retransmission request (PROTOCOLS 2.7 (b)) ---------------


@pytest.mark.parametrize(
    "fields",
    [
        bytes.fromhex("00085300000000003a00"),  # the one captured sample (11-byte body)
        bytes.fromhex("00000800000053000000000000003a"),  # the README template's layout
        b"",  # a bare type byte
    ],
)
def test_resend_request_resends_unacked_and_is_not_counted(fields: bytes) -> None:
    a, b = Session(now=0.0, heartbeat_interval=None), Session(now=0.0)
    realm = connect_pair(a, b)
    a.send(realm, b"1" * 100, 1.0)
    a.send(realm, b"2" * 100, 1.0)
    first, second = decoded(a)
    recv_before = a.recv
    nack = encode_packet(Packet(b.sent, first.sent, 0xFFFF, 7, 0, ResendRequest(fields)))
    a.receive_datagram(nack, 1.01)
    again = decoded(a)
    assert [(p.sent, p.body) for p in again] == [(p.sent, p.body) for p in (first, second)]
    assert a.recv == recv_before  # out of band: our recv does not move
    a.receive_datagram(nack, 1.05)  # every ~10 ms while the hole lasts: rate-limited
    assert decoded(a) == []
    a.receive_datagram(nack, 1.12)
    assert len(decoded(a)) == 2
    assert (a.stats.resend_requests, a.stats.resend_answers) == (3, 2)
    # the peer's next real data packet carries the same sent as its request
    b_data = encode_packet(Packet(b.sent, first.sent, 0xFFFF, 8, 0, Data(realm, b"ok")))
    a.receive_datagram(b_data, 1.2)
    assert DataReceived(realm, b"ok") in a.events()
