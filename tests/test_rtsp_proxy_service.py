"""rtsp_proxy.py --config: two emulated DVRs in one process, /metrics shows their viewers."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path

import pytest
from _proxy_support import PROXY, dvr_factory, h264_small  # noqa: F401  (fixtures)
from _service_support import get, get_json, metric_samples, wait_until, write_config

from conftest import PlayResult, free_port, play

pytestmark = pytest.mark.real_peer


def test_two_dvrs_play_and_metrics_show_their_viewers(
    spawn, dvr_factory, h264_small, tmp_path: Path  # noqa: F811
) -> None:
    dvrs = [dvr_factory("tcp", h264=h264_small), dvr_factory("udp", h264=h264_small)]
    ports, health = [free_port() for _ in dvrs], free_port()
    secret = tmp_path / "secret"
    secret.write_text("4321\n")
    entries = [
        f'[[dvr]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nremote = "{dvr.address}"\n'
        f'username = "admin"\n{credential}\n'
        for name, port, dvr, credential in zip(
            ("shop", "yard"),
            ports,
            dvrs,
            ('password_env = "SHOP_PASS"', f'password_file = "{secret}"'),
            strict=True,
        )
    ]
    config = write_config(tmp_path / "dvrs.toml", f'health = "{health}"\n' + "".join(entries))
    proc = spawn(
        [sys.executable, PROXY, "--config", config],
        ready=r"^health: ",
        env={"SHOP_PASS": "4321", "SV_USER": "", "SV_PASS": ""},
    )
    assert get(health, "/readyz")[0] == 200
    assert get(health, "/livez")[0] == 200

    results: dict[str, PlayResult] = {}

    def watch(name: str, port: int) -> None:
        results[name] = play(f"rtsp://127.0.0.1:{port}/live.000", "ffprobe", "tcp", seconds=4.0)

    threads = [
        threading.Thread(target=watch, args=(name, port))
        for name, port in zip(("shop", "yard"), ports, strict=True)
    ]
    for thread in threads:
        thread.start()

    def both_watched() -> bool:
        samples = metric_samples(health)
        return all(samples[("rtsp_proxy_viewers", (("dvr", n),))] >= 1 for n in ("shop", "yard"))

    wait_until(both_watched, "/metrics shows a viewer on each DVR", story=lambda: proc.output)
    for thread in threads:
        thread.join(60)
    for name, result in results.items():
        assert result.frames >= 50 and not result.errors, (name, result.output[-2000:])
    assert len(results) == 2
    samples = metric_samples(health)
    for name in ("shop", "yard"):
        assert samples[("rtsp_proxy_frames_forwarded_total", (("dvr", name),))] >= 50
        assert samples[("rtsp_proxy_clients_dropped_total", (("dvr", name),))] == 0
    status = get_json(health, "/status")[1]
    assert set(status["dvrs"]) == {"shop", "yard"} and "4321" not in str(status)

    # SIGHUP: yard removed, gate added, shop untouched (its viewer keeps watching)
    gate_port = free_port()
    gate = (
        f'[[dvr]]\nname = "gate"\nlisten = "127.0.0.1:{gate_port}"\n'
        f'remote = "{dvrs[1].address}"\nusername = "admin"\npassword_file = "{secret}"\n'
    )
    shop_viewer = threading.Thread(target=watch, args=("shop", ports[0]))
    shop_viewer.start()
    wait_until(lambda: metric_samples(health)[("rtsp_proxy_viewers", (("dvr", "shop"),))] >= 1,
               "a viewer on shop")  # fmt: skip
    write_config(config, f'health = "{health}"\n' + entries[0] + gate)
    proc.popen.send_signal(signal.SIGHUP)
    proc.wait_line(r"^reloaded ")
    assert set(get_json(health, "/status")[1]["dvrs"]) == {"shop", "gate"}
    result = play(f"rtsp://127.0.0.1:{gate_port}/live.000", "ffprobe", "tcp", seconds=3.0)
    assert result.frames >= 50, result.output[-2000:]
    shop_viewer.join(60)
    assert results["shop"].frames >= 50 and not results["shop"].errors, results["shop"].output
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports[1]), timeout=10)
    # a file that cannot be read is reported and the running DVRs keep serving
    write_config(config, "[[dvr]\nthis is not toml")
    proc.popen.send_signal(signal.SIGHUP)
    proc.wait_line(r"keeping the running DVRs")
    assert set(get_json(health, "/status")[1]["dvrs"]) == {"shop", "gate"}
    result = play(f"rtsp://127.0.0.1:{gate_port}/live.000", "ffprobe", "tcp", seconds=2.0)
    assert result.frames >= 25, result.output[-2000:]
    # another health address takes a restart: said so, and the endpoints stay
    write_config(config, f'health = "{free_port()}"\n' + entries[0] + gate)
    proc.popen.send_signal(signal.SIGHUP)
    proc.wait_line(r"takes effect at the next start; serving " + str(health))
    proc.wait_line(r"^reloaded ")
    assert get(health, "/readyz")[0] == 200
    assert proc.stop(signal.SIGTERM) == 0
    assert "4321" not in proc.output


def test_a_wrong_dvr_entry_is_reported_and_the_other_serves(
    spawn, dvr_factory, h264_small, tmp_path: Path  # noqa: F811
) -> None:
    dvr = dvr_factory("tcp", h264=h264_small)
    port, health = free_port(), free_port()
    config = write_config(
        tmp_path / "dvrs.toml",
        f'health = "{health}"\n'
        f'[[dvr]]\nname = "ok"\nlisten = "{port}"\nremote = "{dvr.address}"\n'
        f'[[dvr]]\nname = "bad"\nlisten = "127.0.0.1:1"\nremote = "x"\nusername = "admin"\n',
    )
    proc = spawn([sys.executable, PROXY, "--config", config], ready=r"^health: ")
    status, body = get_json(health, "/readyz")
    assert status == 503 and list(body["not_ready"]) == ["bad"], body
    assert "password_env" in body["not_ready"]["bad"]
    url = f"rtsp://admin:4321@127.0.0.1:{port}/live.000"
    result = play(url, "ffprobe", "tcp", seconds=3.0)
    assert result.frames >= 50, result.output[-2000:]
    assert proc.stop(signal.SIGTERM) == 0
