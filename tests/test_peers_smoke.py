"""The real RTSP peers and the camera fixture work, before anything of ours sits between them."""

from __future__ import annotations

import pytest

from conftest import play

pytestmark = pytest.mark.real_peer


@pytest.mark.parametrize(
    ("client", "transport"),
    [("ffprobe", "tcp"), ("ffprobe", "udp"), ("gst", "tcp"), ("ffmpeg", "tcp")],
)
def test_clients_decode_the_camera_directly(rtsp_camera, client, transport):
    result = play(rtsp_camera.url(), client, transport, seconds=3)
    assert result.frames >= 50, result.output
    assert not result.errors, result.output


def test_camera_with_digest_credentials(rtsp_camera_auth):
    good = play(rtsp_camera_auth.url(), "ffprobe", "tcp", seconds=2.5)
    assert good.frames >= 50 and not good.errors, good.output
    refused = play(rtsp_camera_auth.url(credentials=False), "ffprobe", "tcp", seconds=1)
    assert refused.frames == 0
    assert "401" in refused.output


def test_error_lines_are_reported(rtsp_camera):
    """The helper must notice a failing client, or every test built on it would pass blindly."""
    result = play(f"rtsp://127.0.0.1:{rtsp_camera.port}/no/such/path", "ffprobe", "tcp", seconds=1)
    assert result.frames == 0
    assert result.errors, result.output
