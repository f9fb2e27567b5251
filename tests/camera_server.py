"""A real camera-side RTSP server for tests: GStreamer's gst-rtsp-server.

Serves a live H.264 test pattern (640x360, 25 fps, one keyframe a second) at
``/cam/realmonitor`` (any query string, as Dahua URLs carry one), optionally
behind digest credentials. Run it with Debian's ``/usr/bin/python3``, which has
``gi``; a venv usually does not.

Prints ``listening rtsp://HOST:PORT/cam/realmonitor`` once the port is bound,
then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

PIPELINE = (
    "( videotestsrc is-live=true pattern=ball "
    "! video/x-raw,width=640,height=360,framerate=25/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=25 bitrate=1500 "
    "! video/x-h264,profile=constrained-baseline "
    "! rtph264pay name=pay0 pt=96 config-interval=1 )"
)


def build_server(host: str, port: int, user: str | None, password: str | None):
    server = GstRtspServer.RTSPServer()
    server.set_address(host)
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    # One pipeline per client: a shared one is seeked by every PLAY with a Range,
    # which disturbs the other viewers (and can abort gst-rtsp-server 1.22).
    factory.set_shared(False)
    if user is not None:
        auth = GstRtspServer.RTSPAuth()
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_digest(user, password or "", token)
        server.set_auth(auth)
        factory.add_role_from_structure(
            Gst.Structure.new_from_string(
                f"viewer, {GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS}=(boolean)true, "
                f"{GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT}=(boolean)true"
            )
        )
    server.get_mount_points().add_factory("/cam/realmonitor", factory)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--user")
    parser.add_argument("--password")
    args = parser.parse_args(argv)

    Gst.init(None)
    server = build_server(args.host, args.port, args.user, args.password)
    if server.attach(None) == 0:
        print(f"error: cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    print(
        f"listening rtsp://{args.host}:{server.get_bound_port()}/cam/realmonitor",
        flush=True,
    )
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
