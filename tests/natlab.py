#!/usr/bin/env python3
"""A NAT lab for dh_p2p.py: the client and the device each behind a NAT gateway.

Five network namespaces, all on this machine, none with a route out of it::

    {p}-inet   the "internet": 10.200.0.1 for the emulated cloud, relay and agent
      |  wire c: a TUN pair pumped by this module (delay per direction)
    {p}-gwc    client gateway: WAN 10.200.1.2, LAN 10.1.0.1/24, NAT as configured
      |  veth
    {p}-cli    client host 10.1.0.2 (dh_p2p.py and the RTSP client run here)

    {p}-inet
      |  wire d
    {p}-gwd    device gateway: WAN 10.200.2.2, LAN 10.2.0.1/24
      |  veth
    {p}-dev    device host 10.2.0.2 (the emulated device's sockets)

A gateway's NAT is ``eim`` (Linux masquerade, which keeps the source port: an
endpoint-independent mapping, as home routers have), ``symmetric``
(``masquerade random``: a new public port for every destination, as carrier-grade
NATs have) or ``none`` (routed; the LAN is reachable from the internet).  Either
way a gateway drops unsolicited datagrams to its own WAN address, so an early
punch never leaves a conntrack entry that would steal the port.

Delay: this machine's kernel has no netem, so each WAN leg is a pair of TUN
devices and a small user-space wire (:func:`run_wire`) that holds every packet
for the configured one-way delay.  Loss: an nftables rule in the gateway drops
N % of what crosses its WAN leg (both ways) and counts it (``lost_packets``).

Run as root.  ``natlab.py up`` brings a lab up and runs its wires until ^C, then
takes it down (``--emulator`` also starts the emulated cloud and device in it);
``natlab.py exec cli -- CMD`` runs a command on a lab host; ``natlab.py down``
removes a lab left behind.  Tests use :class:`Lab`.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import itertools
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

INET_IP = "10.200.0.1"  # where the emulated cloud, relay and agent listen
CLIENT_IP = "10.1.0.2"
DEVICE_IP = "10.2.0.2"
DEVICE_BESIDE_CLIENT_IP = "10.1.0.3"  # with device_on_client_lan
SIDES = {  # side -> (wire subnet third octet, LAN subnet second octet)
    "c": (1, 1),
    "d": (2, 2),
}
NAT_KINDS = ("eim", "symmetric", "none")
HOSTS = ("inet", "gwc", "cli", "gwd", "dev")

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000


class LabError(Exception):
    """The lab cannot be built here (not root, a tool missing) or a command failed."""


def missing_requirements() -> list[str]:
    """What this machine lacks for a lab (empty when it can build one)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


def _run(*cmd: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def socket_in_netns(netns: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A new IPv4 socket that lives in network namespace ``netns`` (by name).

    Only the calling thread can change namespace, so a short-lived thread
    enters it and makes the socket; the socket keeps its namespace for life.
    """
    box: dict[str, object] = {}

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{netns}", "rb") as handle:
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            box["sock"] = socket.socket(socket.AF_INET, kind)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=make, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["sock"]  # type: ignore[return-value]


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


# --------------------------------------------------------------------------
# The wire: delay in user space


def run_wire(links: list[tuple[int, int, float]], stop: threading.Event | None = None) -> None:
    """Pump packets between TUN fds: each link is (fd_a, fd_b, one-way delay s).

    Packets keep their order per direction.  Returns when ``stop`` is set (or
    runs until the process is signalled).
    """
    peer: dict[int, tuple[int, float]] = {}
    for a, b, delay in links:
        peer[a] = (b, delay)
        peer[b] = (a, delay)
    queue: list[tuple[float, int, int, bytes]] = []
    order = itertools.count()
    fds = list(peer)
    while stop is None or not stop.is_set():
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, packet = heapq.heappop(queue)
            try:
                os.write(out, packet)
            except OSError:
                pass  # the link is going down, or its queue is full: a lost packet
        timeout = min(0.2, max(0.0, queue[0][0] - now)) if queue else 0.2
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except OSError:
            return
        now = time.monotonic()
        for fd in ready:
            out, delay = peer[fd]
            for _ in range(256):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    return  # the device is gone (the lab was taken down)
                if delay <= 0 and not queue:
                    try:
                        os.write(out, packet)
                    except OSError:
                        pass
                else:
                    heapq.heappush(queue, (now + delay, next(order), out, packet))


# --------------------------------------------------------------------------
# The lab


@dataclass
class LabConfig:
    """Shape of a lab: NAT kind, one-way delay (ms) and loss (%) per gateway."""

    prefix: str = "dhlab"
    client_nat: str = "eim"
    device_nat: str = "eim"
    client_delay_ms: float = 0.0
    device_delay_ms: float = 0.0
    client_loss: int = 0
    device_loss: int = 0
    device_on_client_lan: bool = False  # the device host sits beside the client, behind gwc

    def __post_init__(self) -> None:
        for nat in (self.client_nat, self.device_nat):
            if nat not in NAT_KINDS:
                raise ValueError(f"NAT kind must be one of {NAT_KINDS}, not {nat!r}")
        for loss in (self.client_loss, self.device_loss):
            if not 0 <= loss <= 100:
                raise ValueError("loss is a percentage, 0 to 100")
        if len(self.prefix) > 8 or not self.prefix.isalnum():
            raise ValueError("prefix: at most 8 letters and digits")


class Lab:
    """Namespaces, links, NAT rules and the wires of one lab (see the module doc)."""

    def __init__(self, config: LabConfig | None = None) -> None:
        self.config = config or LabConfig()
        self._wire: subprocess.Popen | None = None

    @property
    def device_ip(self) -> str:
        """The device host's address: on its own LAN, or beside the client."""
        return DEVICE_BESIDE_CLIENT_IP if self.config.device_on_client_lan else DEVICE_IP

    def ns(self, host: str) -> str:
        """Namespace name of a lab host: inet, gwc, cli, gwd or dev."""
        if host not in HOSTS:
            raise ValueError(f"lab hosts are {HOSTS}, not {host!r}")
        return f"{self.config.prefix}-{host}"

    def cmd(self, host: str, *argv: str) -> list[str]:
        """argv prefixed to run on a lab host."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def _ip(self, host: str, *args: str) -> None:
        _run("ip", "-n", self.ns(host), *args)

    # -- up / down ----------------------------------------------------------

    def up(self) -> Lab:
        """Build the lab and start its wires (in a child process)."""
        missing = missing_requirements()
        if missing:
            raise LabError("the NAT lab needs " + ", ".join(missing))
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        cfg = self.config
        for host in HOSTS:
            _run("ip", "netns", "add", self.ns(host))
            self._ip(host, "link", "set", "lo", "up")
        self._ip("inet", "addr", "add", f"{INET_IP}/32", "dev", "lo")
        fds: list[int] = []
        links: list[tuple[int, int, float]] = []
        for side, (wire_net, lan_net) in SIDES.items():
            gw = f"gw{side}"
            hosts = [("cli", f"10.{lan_net}.0.2")] if side == "c" else [("dev", DEVICE_IP)]
            if cfg.device_on_client_lan:
                if side == "d":
                    continue  # no device gateway: the device is on the client's LAN
                hosts.append(("dev", DEVICE_BESIDE_CLIENT_IP))
            gw_wan, inet_end = f"10.200.{wire_net}.2", f"10.200.{wire_net}.1"
            lan_gw = f"10.{lan_net}.0.1"
            # the WAN leg: two TUN devices, joined by the wire
            names = (f"{cfg.prefix}{side}w", f"{cfg.prefix}{side}i")
            pair = [_open_tun(name) for name in names]
            fds += pair
            delay = (cfg.client_delay_ms if side == "c" else cfg.device_delay_ms) / 1000.0
            links.append((pair[0], pair[1], delay))
            for name, where, new, local, remote in (
                (names[0], gw, "wan", gw_wan, inet_end),
                (names[1], "inet", f"to{gw}", inet_end, gw_wan),
            ):
                _run("ip", "link", "set", name, "netns", self.ns(where))
                self._ip(where, "link", "set", name, "name", new)
                self._ip(where, "addr", "add", local, "peer", f"{remote}/32", "dev", new)
                self._ip(where, "link", "set", new, "up")
            # the LAN: a bridge in the gateway, a veth to each host on it
            self._ip(gw, "link", "add", "lan", "type", "bridge")
            self._ip(gw, "addr", "add", f"{lan_gw}/24", "dev", "lan")
            self._ip(gw, "link", "set", "lan", "up")
            for host, ip in hosts:
                _run(
                    "ip", "link", "add", f"to{host}", "netns", self.ns(gw), "type", "veth",
                    "peer", "name", "eth0", "netns", self.ns(host),
                )  # fmt: skip
                self._ip(gw, "link", "set", f"to{host}", "master", "lan", "up")
                self._ip(host, "addr", "add", f"{ip}/24", "dev", "eth0")
                self._ip(host, "link", "set", "eth0", "up")
                self._ip(host, "route", "add", "default", "via", lan_gw)
            self._ip(gw, "route", "add", "default", "via", inet_end, "dev", "wan")
            _run(*self.cmd(gw, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"))
            nat = cfg.client_nat if side == "c" else cfg.device_nat
            loss = cfg.client_loss if side == "c" else cfg.device_loss
            if nat == "none":  # the LAN is public: the internet routes to it
                self._ip("inet", "route", "add", f"10.{lan_net}.0.0/24", "via", gw_wan)
            _run(*self.cmd(gw, "nft", "-f", "-"), stdin=_gateway_rules(nat, loss))
        _run(*self.cmd("inet", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"))
        self._wire = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_wire", json.dumps(links)],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            text=True,
        )
        for fd in fds:
            os.close(fd)
        ready = self._wire.stdout.readline() if self._wire.stdout else ""
        if ready.strip() != "wire ready":
            raise LabError(f"the wire did not start ({ready!r})")

    def down(self) -> None:
        """Stop the wires and delete the namespaces (also those of an earlier run)."""
        if self._wire is not None:
            self._wire.terminate()
            try:
                self._wire.wait(5)
            except subprocess.TimeoutExpired:
                self._wire.kill()
                self._wire.wait()
            self._wire = None
        existing = _run("ip", "netns", "list", check=False)
        names = {line.split()[0] for line in existing.splitlines() if line.strip()}
        for host in HOSTS:
            if self.ns(host) in names:
                _run("ip", "netns", "delete", self.ns(host), check=False)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- changes while running -------------------------------------------------

    def lost_packets(self, side: str) -> int:
        """Packets the loss rule of gateway ``side`` ("c" or "d") dropped so far."""
        out = _run(*self.cmd(f"gw{side}", "nft", "-j", "list", "counter", "inet", "lab", "lost"))
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError("no loss counter in the gateway")

    def remap(self, side: str, inner_port: int, public_port: int) -> None:
        """Give the LAN host's UDP port ``inner_port`` a new public port on gateway
        ``side``, as a NAT does when it re-creates a mapping: later datagrams leave
        from ``public_port`` and every existing mapping of that gateway is gone."""
        gw = f"gw{side}"
        lan_host = f"10.{SIDES[side][1]}.0.2"
        wan = f"10.200.{SIDES[side][0]}.2"
        rule = (
            f"insert rule ip labnat post ip saddr {lan_host} udp sport {inner_port} "
            f"oifname wan snat to {wan}:{public_port}"
        )
        _run(*self.cmd(gw, "nft", rule))
        _run(*self.cmd(gw, "conntrack", "-F"), check=False)  # exit 1 when already empty

    def mappings(self, side: str) -> str:
        """The gateway's conntrack table, for failure messages."""
        return _run(*self.cmd(f"gw{side}", "conntrack", "-L"), check=False)


def _gateway_rules(nat: str, loss: int) -> str:
    """nftables ruleset of a gateway: NAT on the WAN leg, counted loss, no
    unsolicited datagrams to the gateway itself."""
    lines = [
        "table inet lab {",
        "  counter lost { }",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        '    iifname "wan" ct state new drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
    ]
    if loss:
        for direction in ("iifname", "oifname"):
            rule = f'"wan" numgen random mod 100 < {loss} counter name lost drop'
            lines.append(f"    {direction} {rule}")
    lines += ["  }", "}"]
    if nat != "none":
        flags = " random" if nat == "symmetric" else ""
        lines += [
            "table ip labnat {",
            "  chain post {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "wan" masquerade{flags}',
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """``up`` / ``down`` / ``exec`` (and the internal ``_wire``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_wire"]:  # the child that Lab.up starts
        links = [tuple(link) for link in json.loads(argv[1])]
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("wire ready", flush=True)
        run_wire(links)  # type: ignore[arg-type]
        return 0
    parser = argparse.ArgumentParser(
        prog="natlab.py",
        description="A NAT lab for dh_p2p.py in network namespaces (needs root).",
        epilog="Example: natlab.py up --client-nat symmetric --delay-ms 15 --emulator, then in "
        "another terminal: natlab.py exec cli -- .venv/bin/python dh_p2p.py --cloud "
        f"{INET_IP}:PORT -p 1554:554 SERIAL",
    )
    parser.add_argument("--prefix", default="dhlab", help="namespace name prefix")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a lab and keep it until ^C")
    up.add_argument("--client-nat", choices=NAT_KINDS, default="eim")
    up.add_argument("--device-nat", choices=NAT_KINDS, default="eim")
    up.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per WAN leg")
    up.add_argument("--loss", type=int, default=0, help="%% loss on each WAN leg")
    up.add_argument(
        "--device-beside-client",
        action="store_true",
        help="the device host on the client's LAN, behind the same gateway",
    )
    up.add_argument(
        "--emulator",
        action="store_true",
        help="also run the emulated cloud (in inet) and device (in dev)",
    )
    up.add_argument("--map", action="append", default=[], help="with --emulator: PORT=HOST:PORT")
    sub.add_parser("down", help="remove a lab left behind")
    ex = sub.add_parser("exec", help="run a command on a lab host")
    ex.add_argument("host", choices=HOSTS)
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    lab = Lab(LabConfig(prefix=args.prefix)) if args.command != "up" else None
    if args.command == "down":
        assert lab is not None
        lab.down()
        return 0
    if args.command == "exec":
        assert lab is not None
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return subprocess.call(lab.cmd(args.host, *command))
    config = LabConfig(
        prefix=args.prefix,
        client_nat=args.client_nat,
        device_nat=args.device_nat,
        client_delay_ms=args.delay_ms,
        device_delay_ms=args.delay_ms,
        client_loss=args.loss,
        device_loss=args.loss,
        device_on_client_lan=args.device_beside_client,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        lab = Lab(config).up()
    except LabError as exc:
        print(f"natlab: {exc}", file=sys.stderr)
        return 1
    emulator = None
    try:
        print(
            f"lab up: client host {lab.ns('cli')} ({CLIENT_IP}), device host {lab.ns('dev')} "
            f"({DEVICE_IP}), internet {lab.ns('inet')} ({INET_IP})",
            flush=True,
        )
        if args.emulator:
            from p2p_emulator import Emulator, parse_port_map

            emulator = Emulator(
                port_map=parse_port_map(args.map),
                cloud_at=(lab.ns("inet"), INET_IP),
                device_at=(lab.ns("dev"), lab.device_ip),
            ).start()
            print(
                f"emulator: serial {emulator.serial}: --cloud smartpss={INET_IP}:"
                f"{emulator.cloud_port} --cloud dmss={INET_IP}:{emulator.dmss_port}",
                flush=True,
            )
        stop.wait()
    finally:
        if emulator is not None:
            emulator.close()
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
