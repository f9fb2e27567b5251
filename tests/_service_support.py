"""Support for the service-mode tests: config files, the health endpoints, polling."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path -> (status, body); a 503 is an answer, not an error."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def get_json(port: int, path: str) -> tuple[int, dict]:
    status, body = get(port, path)
    return status, json.loads(body)


def metric_samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed with prometheus_client: (sample name, sorted labels) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout: float = 40.0,
    story: Callable[[], str] | None = None,
) -> object:
    """Poll ``condition`` until it returns something true; fail with ``what`` (and
    ``story()``, what the test knows about why)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}\n{story() if story else ''}")
        time.sleep(0.1)  # polling interval of a condition, not a readiness guess


def write_config(path: Path, text: str) -> Path:
    """Write the file whole, then rename, as a config generator would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
