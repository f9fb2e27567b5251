"""Service mode, sans-IO: config entries, cloud selection, metrics text, health routes."""

from __future__ import annotations

import json
import tomllib

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dh_p2p
import helpers
import ptcp
import rtsp_proxy
from helpers import ConfigError

ENV = {"GARAGE_PASS": "s3cret"}

EXAMPLE = """
health = "127.0.0.1:9780"

[[device]]
name = "garage"
serial = "ABC123"
forward = ["127.0.0.1:1554:554", "8080:80"]
app = "auto"
cloud = ["smartpss=127.0.0.1:5000"]
mode = "auto"
username = "admin"
password_env = "GARAGE_PASS"
on_demand = false
idle_close = 60

[[dvr]]
name = "shop"
listen = "127.0.0.1:8554"
remote = "192.168.1.50:554"
username = "admin"
password_env = "SHOP_PASS"
"""


def parse(text: str, env: dict[str, str] | None = None) -> dh_p2p.ServiceConfig:
    return dh_p2p.parse_service_config(tomllib.loads(text), ENV if env is None else env)


def test_the_issue_example_parses() -> None:
    config = parse(EXAMPLE)
    assert config.errors == {} and config.health == "127.0.0.1:9780"
    (garage,) = config.devices
    assert garage.name == "garage" and garage.serial == "ABC123"
    assert [(f.bind, f.local, f.remote) for f in garage.forwards] == [
        ("127.0.0.1", 1554, 554),
        ("127.0.0.1", 8080, 80),
    ]
    assert garage.clouds == ("smartpss=127.0.0.1:5000",) and garage.app == "auto"
    assert (garage.username, garage.password) == ("admin", "s3cret")
    assert "s3cret" not in repr(garage)
    assert not garage.on_demand and garage.idle_close == 60


def test_name_defaults_to_the_serial_and_password_file_is_read(tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("fromfile\n")
    config = parse(
        f'[[device]]\nserial = "X1"\nforward = ["1554:554"]\nusername = "admin"\n'
        f'password_file = "{secret}"\n'
    )
    assert config.devices[0].name == "X1" and config.devices[0].password == "fromfile"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('forward = ["1554:554"]', "serial"),
        ('serial = "S"', "forward"),
        ('serial = "S"\nforward = ["nope"]', "forward"),
        ('serial = "S"\nforward = ["1:1"]\nmode = "sideways"', "mode"),
        ('serial = "S"\nforward = ["1:1"]\napp = "other"', "app"),
        ('serial = "S"\nforward = ["1:1"]\ncloud = ["imou=h:1"]', "unknown app"),
        ('serial = "S"\nforward = ["1:1"]\ncloud = ["h:x"]', "cloud"),
        ('serial = "S"\nforward = ["1:1"]\nusername = "u"', "password_env"),
        ('serial = "S"\nforward = ["1:1"]\nusername = "u"\npassword = "p"', "inline"),
        ('serial = "S"\nforward = ["1:1"]\nusername = "u"\npassword_env = "UNSET"', "not set"),
        ('serial = "S"\nforward = ["1:1"]\non_demand = "yes"', "on_demand"),
        ('serial = "S"\nforward = ["1:1"]\nidle_close = -1', "idle_close"),
        ('serial = "S"\nforward = ["1:1"]\nseriall = "S"', "unknown key"),
    ],
)
def test_a_wrong_entry_is_reported_and_the_others_kept(entry: str, message: str) -> None:
    good = '[[device]]\nname = "ok"\nserial = "OK1"\nforward = ["1554:554"]\n'
    config = parse(good + "[[device]]\nname = \"bad\"\n" + entry + "\n")
    assert [d.name for d in config.devices] == ["ok"]
    assert list(config.errors) == ["bad"]
    assert message in config.errors["bad"]
    assert "'bad'" in config.errors["bad"]


def test_duplicate_names_and_local_ports_are_errors_of_the_later_entry() -> None:
    config = parse(
        '[[device]]\nname = "a"\nserial = "A"\nforward = ["1554:554"]\n'
        '[[device]]\nname = "a"\nserial = "B"\nforward = ["1555:554"]\n'
        '[[device]]\nname = "c"\nserial = "C"\nforward = ["127.0.0.1:1554:554"]\n'
    )
    assert [d.serial for d in config.devices] == ["A"]
    assert set(config.errors) == {"a", "c"}


@pytest.mark.parametrize("text", ['health = "x:y"', "health = true", "other = 1", "device = 3"])
def test_a_wrong_file_raises_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse(text)


def test_load_toml_says_what_is_wrong(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[device]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        helpers.load_toml(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        helpers.load_toml(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    ("entries", "app"),
    [([], "auto"), (["h:1"], "dmss"), (["dmss=h:1", "smartpss=h:2"], "auto"), (["host"], "auto")],
)
def test_cloud_entries_are_cloud_options(entries: list[str], app: str) -> None:
    assert dh_p2p.check_clouds(entries, app, "here") == tuple(entries)
    args = dh_p2p.build_parser().parse_args([*(f"--cloud={e}" for e in entries), "--app", app, "S"])
    identities, _ = dh_p2p.plan_identities(args)  # the same options on the command line
    assert identities


@pytest.mark.parametrize(
    ("entries", "app", "why"),
    [(["icsee=h:1"], "auto", "unknown app"), (["dmss=h:1"], "smartpss", "is for dmss"),
     (["h:x"], "auto", "cloud"), ([5], "auto", "strings")],
)
def test_bad_cloud_entries(entries: list, app: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        dh_p2p.check_clouds(entries, app, "here")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("9780", ("127.0.0.1", 9780)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:80", ("::1", 80))],
)
def test_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert helpers.parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["", "host", "h:0", "h:65536", "h:-1", ":80x"])
def test_bad_listen_address(text: str) -> None:
    with pytest.raises(ConfigError):
        helpers.parse_listen_address(text)


def snapshot(**over: object) -> dict:
    base = {
        "up": True,
        "handshake_seconds": 0.25,
        "reconnects": 2,
        "realms": 3,
        "bytes_sent": 10,
        "bytes_received": 123456789012,
        "retransmissions": 4,
        "resend_requests": 5,
        "round_trip_seconds": None,
    }
    return {**base, **over}


def test_device_metrics_parse_with_prometheus_client() -> None:
    text = helpers.render_metrics(
        dh_p2p.device_metrics({'gar"age': snapshot(), "door": snapshot(up=False, realms=0)})
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("dh_p2p_device_up", "dh_p2p_bytes", "dh_p2p_reconnects", "dh_p2p_realms_open"):
        assert name in families, text
        assert f"# HELP {name}" in text and f"# TYPE {name}" in text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert values[("dh_p2p_bytes_total", (("device", 'gar"age'), ("direction", "received")))] == (
        123456789012
    )
    assert values[("dh_p2p_device_up", (("device", "door"),))] == 0
    assert values[("dh_p2p_reconnects_total", (("device", "door"),))] == 2
    assert not any(k[0] == "dh_p2p_round_trip_seconds" for k in values)  # unknown: no sample


class FakeSource(helpers.HealthSource):
    def __init__(self, missing: dict[str, str]) -> None:
        self.missing = missing

    def not_ready(self) -> dict[str, str]:
        return self.missing

    def status(self) -> dict:
        return {"devices": {"a": {"up": True}}}


def test_health_routes() -> None:
    status, ctype, body = helpers.health_response(FakeSource({"c": "offline"}), "/readyz")
    assert status == 503 and ctype == "application/json"
    assert json.loads(body)["not_ready"] == {"c": "offline"}
    assert helpers.health_response(FakeSource({}), "/readyz")[0] == 200
    assert helpers.health_response(FakeSource({}), "/livez")[0] == 200
    assert helpers.health_response(FakeSource({}), "/nothing")[0] == 404
    status, _, body = helpers.health_response(FakeSource({}), "/status?x=1")
    assert status == 200 and json.loads(body)["devices"]["a"]["up"] is True
    status, ctype, body = helpers.health_response(FakeSource({}), "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4") and body == b"\n"


def test_the_issue_example_parses_for_the_proxy() -> None:
    config = rtsp_proxy.parse_proxy_config(tomllib.loads(EXAMPLE), {"SHOP_PASS": "pw"})
    assert config.errors == {}
    (shop,) = config.dvrs
    assert shop.listen == ("127.0.0.1", 8554) and shop.remote == ("192.168.1.50", 554)
    assert (shop.username, shop.password) == ("admin", "pw") and "pw" not in repr(shop)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('remote = "h"', "listen"),
        ('listen = "1"', "remote"),
        ('listen = "1"\nremote = ":554"', "host"),
        ('listen = "1"\nremote = "h"\nusername = "u"', "password_env"),
        ('listen = "x"\nremote = "h"', "listen"),
        ('listen = "1"\nremote = "h"\nport = 1', "unknown key"),
    ],
)
def test_a_wrong_dvr_entry_is_reported(entry: str, message: str) -> None:
    text = '[[dvr]]\nname = "ok"\nlisten = "2"\nremote = "h"\n[[dvr]]\nname = "bad"\n' + entry
    config = rtsp_proxy.parse_proxy_config(tomllib.loads(text), {})
    assert [d.name for d in config.dvrs] == ["ok"] and list(config.errors) == ["bad"]
    assert message in config.errors["bad"]


def test_proxy_metrics_parse_with_prometheus_client() -> None:
    snap = {"viewers": 2, "clients": 3, "dvr_sessions": 1, "frames_forwarded": 9,
            "clients_dropped": 0}
    text = helpers.render_metrics(rtsp_proxy.proxy_metrics({"shop": snap}))
    values = {
        (s.name, tuple(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert values[("rtsp_proxy_viewers", (("dvr", "shop"),))] == 2
    assert values[("rtsp_proxy_frames_forwarded_total", (("dvr", "shop"),))] == 9


class FakeTunnel:
    """What DeviceClient reads of a PTCPTunnel: health() and session.recv."""

    def __init__(self, sent: int, recv: int) -> None:
        self.sent, self.retransmits = sent, 0
        self.session = type("S", (), {"recv": recv})()

    def health(self):
        return ptcp.TunnelHealth(self.sent, 0, 0, 0, 0, self.retransmits, 0, 0)


def test_device_counters_add_across_the_32_bit_wrap() -> None:
    parser = dh_p2p.build_parser()
    args = parser.parse_args(["--config", "x"])
    config = dh_p2p.parse_service_config(
        tomllib.loads('[[device]]\nserial = "S"\nforward = ["1554:554"]\n'), {}
    ).devices[0]
    client = dh_p2p.DeviceClient(dh_p2p.device_namespace(args, config), ("h", 1), config)
    tunnel = FakeTunnel(sent=0xFFFF_FF00, recv=0xFFFF_FFF0)
    client._last[tunnel] = client._readings(tunnel)
    tunnel.sent, tunnel.session.recv, tunnel.retransmits = 0x100, 0x10, 3
    client.sample_counters()
    assert client.totals == {"sent": 0x200, "received": 0x20, "retransmits": 3,
                             "resend_requests": 0}
    tunnel.sent += 5
    client.sample_counters()
    assert client.totals["sent"] == 0x205
    assert client.snapshot()["bytes_sent"] == 0x205 and client.snapshot()["up"] is False
