"""A tiny pcap writer for tests: classic libpcap files of IPv4/UDP datagrams.

Packets are built by hand (IPv4 header with checksum, UDP header with checksum over the
pseudo header) and written either as LINKTYPE_RAW (bare IPv4) or LINKTYPE_ETHERNET.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
PCAP_MAGIC = 0xA1B2C3D4
IPPROTO_UDP = 17

Addr = tuple[str, int]


@dataclass(frozen=True)
class Datagram:
    """One UDP datagram seen on the wire at time ``ts`` (seconds since the epoch)."""

    ts: float
    src: Addr
    dst: Addr
    payload: bytes


def inet_checksum(data: bytes) -> int:
    """RFC 1071 one's complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_ipv4(src: Addr, dst: Addr, payload: bytes, *, ident: int = 0, ttl: int = 64) -> bytes:
    """An IPv4 packet carrying one UDP datagram, lengths and checksums filled in."""
    if len(payload) > 65535 - 28:
        raise ValueError("UDP payload too large for IPv4")
    sip = ipaddress.IPv4Address(src[0]).packed
    dip = ipaddress.IPv4Address(dst[0]).packed
    ulen = 8 + len(payload)
    pseudo = sip + dip + struct.pack("!BBH", 0, IPPROTO_UDP, ulen)
    udp_nocsum = struct.pack("!HHHH", src[1], dst[1], ulen, 0) + payload
    ucsum = inet_checksum(pseudo + udp_nocsum) or 0xFFFF
    udp = struct.pack("!HHHH", src[1], dst[1], ulen, ucsum) + payload
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ident & 0xFFFF, 0x4000, ttl, IPPROTO_UDP, 0, sip, dip
    )
    hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + udp


def ethernet(ip_packet: bytes) -> bytes:
    """Wrap an IPv4 packet in an Ethernet II frame with locally administered MACs."""
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + ip_packet


class PcapWriter:
    """Writes a classic pcap file (microsecond timestamps, host byte order)."""

    def __init__(self, out: BinaryIO, linktype: int = LINKTYPE_RAW, snaplen: int = 65535) -> None:
        self.out = out
        self.linktype = linktype
        self.snaplen = snaplen
        self._ident = 0
        out.write(struct.pack("=IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype))

    def write_packet(self, ts: float, packet: bytes) -> None:
        """Write one link-layer packet record."""
        sec = int(ts)
        usec = int(round((ts - sec) * 1_000_000))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        cap = packet[: self.snaplen]
        self.out.write(struct.pack("=IIII", sec, usec, len(cap), len(packet)) + cap)

    def write_datagram(self, dgram: Datagram) -> None:
        """Write one UDP datagram as an IPv4 packet in this file's link type."""
        self._ident += 1
        ip = udp_ipv4(dgram.src, dgram.dst, dgram.payload, ident=self._ident)
        self.write_packet(dgram.ts, ethernet(ip) if self.linktype == LINKTYPE_ETHERNET else ip)


def write_udp_pcap(
    path: str | Path, datagrams: Iterable[Datagram], linktype: int = LINKTYPE_RAW
) -> Path:
    """Write ``datagrams`` to a new pcap file at ``path`` and return the path."""
    path = Path(path)
    with path.open("wb") as f:
        w = PcapWriter(f, linktype)
        for d in datagrams:
            w.write_datagram(d)
    return path
