#!/usr/bin/env python3
"""Benchmark the PTCP tunnel on loopback (a script, not a test).

Starts ``ptcp.py serve`` (device side) and ``ptcp.py connect`` (client side) as
two processes, with TCP services in this process, and prints:

* download / upload throughput through one realm (MB/s),
* CPU seconds per GB moved, summed over both tunnel processes,
* round-trip latency of small echoed messages (p50 / p99, ms),
* raw loopback UDP throughput of two Python processes with the same datagram
  size, and the tunnel's share of it.

Usage: .venv/bin/python tests/bench_ptcp.py [--mb 200] [--pings 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _ptcp_support import BulkServer, EchoServer  # noqa: E402

import ptcp  # noqa: E402

MB = 1_000_000
TICK = os.sysconf("SC_CLK_TCK")
DATAGRAM = ptcp.HEADER_LEN + 12 + ptcp.DEFAULT_MAX_DATA


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Sink:
    """Accepts one connection at a time and counts bytes; `done` fires at `expect` bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.expect = 0
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            got = 0
            buf = bytearray(1 << 18)
            with conn:
                while True:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    got += n
                    if got >= self.expect:
                        self.done.set()


def start(argv: list[str], pattern: str) -> tuple[subprocess.Popen, re.Match]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return proc, m
    raise RuntimeError(f"{argv} ended before printing {pattern!r}")


def wait_line(proc: subprocess.Popen, pattern: str) -> re.Match:
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return m
    raise RuntimeError(f"no line {pattern!r}")


def tunnel_bench(total: int, pings: int, extra: list[str]) -> dict[str, float]:
    bulk = BulkServer(seed=1, total=total)
    sink = Sink()
    echo = EchoServer()
    py = sys.executable
    maps = [f"--map=9=127.0.0.1:{bulk.port}", f"--map=10=127.0.0.1:{sink.port}"]
    maps.append(f"--map=7=127.0.0.1:{echo.port}")
    serve, m = start(
        [py, str(REPO / "ptcp.py"), *extra, "serve", *maps], r"udp 127\.0\.0\.1:(\d+)"
    )
    fw = ["--forward=0:9", "--forward=0:10", "--forward=0:7"]
    conn, _ = start(
        [py, str(REPO / "ptcp.py"), *extra, "connect", f"--peer=127.0.0.1:{m.group(1)}", *fw],
        r"udp 127",
    )
    local = {}
    for _ in fw:
        fm = wait_line(conn, r"127\.0\.0\.1:(\d+) -> remote port (\d+)")
        local[int(fm.group(2))] = int(fm.group(1))
    pids = (serve.pid, conn.pid)
    out: dict[str, float] = {}
    try:
        # download: the far service sends, the local client reads
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", local[9])) as s:
            buf = bytearray(1 << 18)
            got = 0
            while True:
                n = s.recv_into(buf)
                if not n:
                    break
                got += n
        dt = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        assert got == total, (got, total)
        out["download_MBps"] = total / dt / MB
        out["download_cpu_s_per_GB"] = cpu / (total / 1e9)
        # upload: the local client sends, the far service counts
        sink.expect = total
        block = os.urandom(1 << 18)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", local[10])) as s:
            sent = 0
            while sent < total:
                s.sendall(block[: min(len(block), total - sent)])
                sent += min(len(block), total - sent)
            if not sink.done.wait(300):
                raise RuntimeError("upload did not complete")
        dt = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        out["upload_MBps"] = total / dt / MB
        out["upload_cpu_s_per_GB"] = cpu / (total / 1e9)
        # latency: 64-byte messages echoed by the far service
        with socket.create_connection(("127.0.0.1", local[7])) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = b"x" * 64
            rtts = []
            for _ in range(pings):
                t = time.perf_counter()
                s.sendall(msg)
                got = 0
                while got < len(msg):
                    got += len(s.recv(4096))
                rtts.append((time.perf_counter() - t) * 1000)
        q = statistics.quantiles(rtts, n=100)
        out["rtt_p50_ms"] = statistics.median(rtts)
        out["rtt_p99_ms"] = q[98]
    finally:
        for p in (conn, serve):
            p.terminate()
            p.wait(10)
        bulk.close()
        echo.close()
    return out


def raw_receiver(seconds: float) -> None:
    """Child process: count datagrams for `seconds` after the first, print bytes and time."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    s.recv(65536)
    got, t0 = 0, time.perf_counter()
    s.settimeout(1.0)
    while time.perf_counter() - t0 < seconds:
        try:
            got += len(s.recv(65536))
        except TimeoutError:
            break
    print(got, time.perf_counter() - t0, flush=True)


def raw_sender(port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    d = bytes(DATAGRAM)
    end = time.perf_counter() + seconds + 0.5
    addr = ("127.0.0.1", port)
    while time.perf_counter() < end:
        for _ in range(1000):
            s.sendto(d, addr)


def raw_bench(seconds: float = 3.0) -> float:
    py, me = sys.executable, str(Path(__file__).resolve())
    rx = subprocess.Popen(
        [py, me, "--raw-rx", str(seconds)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert rx.stdout is not None
    port = int(rx.stdout.readline())
    tx = subprocess.Popen([py, me, "--raw-tx", str(port), str(seconds)])
    got, dt = rx.stdout.readline().split()
    rx.wait(10)
    tx.wait(20)
    return int(got) / float(dt) / MB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=200, help="megabytes per throughput run")
    p.add_argument("--pings", type=int, default=2000, help="latency samples")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--delayed-ack",
        action="store_true",
        help="run the tunnel with --delayed-ack (not the PROTOCOLS 2.5 default)",
    )
    p.add_argument("--raw-rx", type=float, help=argparse.SUPPRESS)
    p.add_argument("--raw-tx", nargs=2, type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_rx is not None:
        raw_receiver(args.raw_rx)
        return 0
    if args.raw_tx is not None:
        raw_sender(int(args.raw_tx[0]), args.raw_tx[1])
        return 0
    raw = raw_bench()
    res = tunnel_bench(args.mb * MB, args.pings, ["--delayed-ack"] if args.delayed_ack else [])
    res["raw_udp_MBps"] = raw
    res["download_share_of_raw"] = res["download_MBps"] / raw
    res["upload_share_of_raw"] = res["upload_MBps"] / raw
    mode = "one ack per batch (--delayed-ack)" if args.delayed_ack else "one ack per packet"
    print(f"acks: {mode}")
    print(f"raw loopback UDP ({DATAGRAM}-byte datagrams, Python): {raw:8.1f} MB/s")
    for way in ("download", "upload"):
        print(
            f"tunnel {way:8s}: {res[way + '_MBps']:8.1f} MB/s "
            f"({100 * res[way + '_share_of_raw']:.0f}% of raw), "
            f"{res[way + '_cpu_s_per_GB']:.1f} CPU s/GB (both ends)"
        )
    print(f"round trip (64 B echo): p50 {res['rtt_p50_ms']:.3f} ms, p99 {res['rtt_p99_ms']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
