"""Command-line value types shared by svtool.py, rtsp_proxy.py, ptcp.py and dh_p2p.py.

Each ``type=`` function turns one option value into what the tool needs or
raises ``argparse.ArgumentTypeError``, so that a bad value ends in argparse's
one-line usage error and exit code 2, never in a traceback later on.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import NoReturn

MAX_SECONDS = 1_000_000.0  # about 11 days; longer is a typo, and overflows socket timeouts


class UsageError(ValueError):
    """A command-line value that cannot be used (the tools exit with code 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, then exit code 2."""

    def error(self, message: str) -> NoReturn:
        first = message.splitlines()[0] if message else "bad arguments"
        self.exit(2, f"{self.prog}: error: {first} (see --help)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SECONDS:.0f} seconds: {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0, at most MAX_SECONDS."""
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds, 0 to MAX_SECONDS."""
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _ascii_int(text: str) -> int | None:
    digits = text[1:] if text[:1] == "-" else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 20):
        return None
    return int(text)


def integer_in(low: int, high: int, what: str = "number") -> Callable[[str], int]:
    """A type for an integer of ASCII digits from ``low`` to ``high``."""

    def parse(text: str) -> int:
        value = _ascii_int(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low}-{high}: {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


port_number = integer_in(1, 65535, "port")


def split_port(text: str, lowest: int = 1) -> int:
    """The port of a ``HOST:PORT`` value: ASCII digits, ``lowest``-65535."""
    value = _ascii_int(text)
    if value is None or not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be {lowest}-65535, not {text!r}")
    return value


def host_port(default_host: str, lowest_port: int = 1) -> Callable[[str], tuple[str, int]]:
    """A type for ``HOST:PORT`` or ``PORT`` (then on ``default_host``)."""

    def parse(text: str) -> tuple[str, int]:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = default_host, text
        return (host.strip("[]") or default_host), split_port(port, lowest_port)

    parse.__name__ = "HOST:PORT"
    return parse


def read_password_file(path: str) -> str:
    """The first line of ``path`` without its line end (a password kept out of ``ps``)."""
    try:
        with open(path, encoding="utf-8") as file:
            line = file.readline()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"cannot read the password file {path!r}: {reason}") from None
    return line.rstrip("\r\n")


def password_from(option: str | None, path: str | None, env_name: str = "") -> str | None:
    """The password of ``--password``, else of ``--password-file``, else of ``env_name``.

    Raises UsageError when both options are given or the file cannot be read.
    """
    if option is not None and path is not None:
        raise UsageError("give --password or --password-file, not both")
    if path is not None:
        return read_password_file(path)
    if option is not None or not env_name:
        return option
    return os.environ.get(env_name)
