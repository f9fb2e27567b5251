"""The exit codes of every command-line tool here (svtool.py, rtsp_proxy.py, dh_p2p.py,
ptcp.py): one table, so that a script wrapping any of them reads a code the same way.

Standard library only: the Samsung tools import it without the Dahua dependencies.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a tool's exit status means."""

    OK = 0
    ERROR = 1  # anything not below, e.g. a local port that cannot be opened
    USAGE = 2  # bad arguments or missing credentials; nothing was tried
    UNREACHABLE = 3  # the DVR or device is unreachable, silent, offline or unknown (serial)
    LOGIN_REFUSED = 4  # the DVR or device refused the credentials, or wants some
    PROTOCOL = 5  # the DVR, device or cloud answered what the protocol does not allow
    CLOUD_UNREACHABLE = 6  # the Dahua cloud did not answer or refused the service
    WRONG_APP = 7  # the device is bound to another app's cloud identity than the one asked for
    INTERRUPTED = 130  # ^C before a one-shot command finished


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.ERROR: "other error",
    ExitCode.USAGE: "usage",
    ExitCode.UNREACHABLE: "DVR/device unreachable, offline or unknown",
    ExitCode.LOGIN_REFUSED: "login refused or credentials needed",
    ExitCode.PROTOCOL: "protocol error",
    ExitCode.CLOUD_UNREACHABLE: "cloud unreachable",
    ExitCode.WRONG_APP: "device bound to another app's cloud (dh_p2p --app)",
    ExitCode.INTERRUPTED: "interrupted",
}

EPILOG = "Exit codes: " + ", ".join(f"{int(code)} {text}" for code, text in MEANINGS.items()) + "."
