"""Bad command-line values: one line on stderr and exit code 2, for every tool.

Issue 13 found tracebacks (exit 1) and values accepted that fail later
(``--timeout nan`` at the first client). Each case below runs the tool's
``main`` in this process: argparse stops before any socket is opened.
"""

from __future__ import annotations

import pytest

import dh_p2p
import ptcp
import rtsp_proxy
import svtool

PROXY = ["127.0.0.1:0", "127.0.0.1:554"]
SVTOOL = ["rtsp://127.0.0.1/"]
DH = ["SERIAL"]

CASES = [
    # the probes of issue 13
    ("dh_p2p", [*DH, "--cloud", "127.0.0.1:99999"]),
    ("ptcp", ["serve", "--bind", "127.0.0.1:99999"]),
    ("ptcp", ["serve", "--bind", "127.0.0.1:-5"]),
    ("ptcp", ["--window", "10", "serve"]),
    ("ptcp", ["--max-data", "0", "serve"]),
    ("svtool", ["--timeout", "1e300", *SVTOOL, "describe"]),
    ("rtsp_proxy", [*PROXY, "--timeout", "nan"]),
    ("rtsp_proxy", [*PROXY, "--dcp-port", "70000"]),
    ("dh_p2p", [*DH, "--timeout", "-1"]),
    # ports, in options and inside HOST:PORT values
    ("rtsp_proxy", ["127.0.0.1:70000", "127.0.0.1:554"]),
    ("rtsp_proxy", ["127.0.0.1:0", "127.0.0.1:0"]),
    ("rtsp_proxy", ["127.0.0.1:0", "127.0.0.1:\u00b2"]),
    ("svtool", ["--dcp-port", "0", *SVTOOL, "describe"]),
    ("ptcp", ["connect", "--peer", "127.0.0.1:0"]),
    ("ptcp", ["connect", "--peer", "127.0.0.1:1", "--forward", "0:99999"]),
    ("ptcp", ["serve", "--map", "554=127.0.0.1:70000"]),
    ("ptcp", ["serve", "--peer", "127.0.0.1:65536"]),
    ("dh_p2p", [*DH, "-p", "1554:70000"]),
    ("dh_p2p", [*DH, "-p", "\u00b2:554"]),
    ("dh_p2p", [*DH, "--cloud", "127.0.0.1:0"]),
    # timeouts: finite and positive
    ("svtool", ["--timeout", "nan", *SVTOOL, "describe"]),
    ("svtool", ["--timeout", "-1", *SVTOOL, "describe"]),
    ("svtool", [*SVTOOL, "authorize", "--duration", "inf"]),
    ("rtsp_proxy", [*PROXY, "--client-stall", "0"]),
    ("rtsp_proxy", [*PROXY, "--linger", "-1"]),
    ("rtsp_proxy", [*PROXY, "--header-timeout", "1e300"]),
    ("rtsp_proxy", [*PROXY, "--idle-timeout", "nan"]),
    ("rtsp_proxy", [*PROXY, "--login-backoff", "-1"]),
    ("ptcp", ["--heartbeat", "nan", "serve"]),
    ("ptcp", ["--dead-after", "0", "serve"]),
    ("ptcp", ["connect", "--peer", "127.0.0.1:1", "--timeout", "1e300"]),
    ("dh_p2p", [*DH, "--peer-timeout", "inf"]),
    # sizes and counts
    ("ptcp", ["--max-data", "16777216", "serve"]),
    ("ptcp", ["--window", "99999999999", "serve"]),
    ("ptcp", ["--queue", "-1", "serve"]),
    ("rtsp_proxy", [*PROXY, "--client-buffer", "1000"]),
    ("rtsp_proxy", [*PROXY, "--max-clients", "0"]),
    ("rtsp_proxy", [*PROXY, "--max-client-sessions", "1.5"]),
    ("rtsp_proxy", [*PROXY, "--dvr-clock", "0"]),
    ("dh_p2p", [*DH, "--retries", "-1"]),
    # password files
    ("svtool", ["--password-file", "/nonexistent/pw", *SVTOOL, "describe"]),
    ("rtsp_proxy", [*PROXY, "--username", "u", "--password-file", "/nonexistent/pw"]),
    ("dh_p2p", [*DH, "-u", "admin", "--password-file", "/nonexistent/pw"]),
]

MAINS = {
    "svtool": svtool.main,
    "rtsp_proxy": rtsp_proxy.main,
    "ptcp": ptcp.main,
    "dh_p2p": dh_p2p.main,
}


@pytest.mark.parametrize(("tool", "argv"), CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_value_is_one_line_and_exit_2(capsys, monkeypatch, tool: str, argv: list[str]) -> None:
    for name in ("SV_USER", "SV_PASS", "DH_P2P_USERNAME", "DH_P2P_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    try:
        code = MAINS[tool](argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "error" in lines[0], err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("tool", ["svtool", "rtsp_proxy", "dh_p2p"])
def test_password_file_gives_the_first_line(tmp_path, monkeypatch, tool: str) -> None:
    path = tmp_path / "pw"
    path.write_text("s3cret: with spaces \nsecond line\n")
    seen: list[str | None] = []

    def record(password: str | None) -> None:
        seen.append(password)
        raise _Stop

    if tool == "svtool":
        monkeypatch.setattr(svtool, "_describe", lambda _h, _p, _u, pw, _t: record(pw))
        argv = ["--username", "admin", "--password-file", str(path), *SVTOOL, "describe"]
    elif tool == "rtsp_proxy":
        monkeypatch.setattr(rtsp_proxy, "ProxyServer", lambda *_a, **kw: record(kw["password"]))
        argv = [*PROXY, "--username", "admin", "--password-file", str(path)]
    else:
        monkeypatch.setattr(dh_p2p, "Client", lambda args, _cloud: record(args.password))
        argv = [*DH, "-u", "admin", "--password-file", str(path)]
    with pytest.raises(_Stop):
        MAINS[tool](argv)
    assert seen == ["s3cret: with spaces "]


@pytest.mark.parametrize("tool", ["svtool", "rtsp_proxy", "dh_p2p"])
def test_password_and_password_file_together_are_a_usage_error(
    tmp_path, capsys, monkeypatch, tool: str
) -> None:
    path = tmp_path / "pw"
    path.write_text("from the file\n")
    both = ["--password", "on the line", "--password-file", str(path)]
    argv = {
        "svtool": ["--username", "admin", *both, *SVTOOL, "describe"],
        "rtsp_proxy": [*PROXY, "--username", "admin", *both],
        "dh_p2p": [*DH, "-u", "admin", *both],
    }[tool]
    try:
        code = MAINS[tool](argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert "not both" in capsys.readouterr().err


def test_dh_p2p_password_from_the_environment(monkeypatch) -> None:
    seen: list[str | None] = []

    def record(args, _cloud) -> None:
        seen.append(args.password)
        raise _Stop

    monkeypatch.setattr(dh_p2p, "Client", record)
    monkeypatch.setenv("DH_P2P_PASSWORD", "from the environment")
    with pytest.raises(_Stop):
        dh_p2p.main([*DH, "-u", "admin"])
    with pytest.raises(_Stop):
        dh_p2p.main([*DH, "-u", "admin", "--password", "given"])
    assert seen == ["from the environment", "given"]


class _Stop(Exception):
    """Ends main() once the password was seen."""
