"""A real RTSP camera on loopback, for tests: GStreamer's RTSP server (Debian's
``gir1.2-gst-rtsp-server-1.0`` through ``python3-gi``), run with the system Python.

``python3 tests/rtsp_camera.py PORT`` serves, live at 10 fps, 640x360:

- ``/video``: H.264 of a moving test picture;
- ``/av``: the same with AAC audio (a tick a second).

It prints ``ready`` once it listens, and serves until killed.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

VIDEO = (
    "videotestsrc is-live=true pattern=ball motion=sweep ! video/x-raw,width=640,height=360,framerate=10/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96"
)
AUDIO = "audiotestsrc is-live=true wave=ticks ! audioconvert ! audioresample ! avenc_aac ! rtpmp4apay name=pay1 pt=97"


def main() -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(sys.argv[1])
    mounts = server.get_mount_points()
    for path, launch in (("/video", VIDEO), ("/av", f"{VIDEO} {AUDIO}")):
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(f"( {launch} )")
        factory.set_shared(True)
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{sys.argv[1]}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
