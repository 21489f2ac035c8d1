"""A real RTSP camera on loopback, for tests: GStreamer's RTSP server (Debian's
``gir1.2-gst-rtsp-server-1.0`` through ``python3-gi``), run with the system Python.

``python3 stream_rt/testing/rtsp_camera.py PORT [--scene ON_S OFF_S] [--size WxH] [--file MP4 N]``
serves, live at 10 fps, 640x360 unless ``--size`` says otherwise:

- ``/video``: H.264 of a moving test picture;
- ``/av``: the same with AAC audio (a tick a second);
- ``/scene`` (with ``--scene``): a still grey picture in which a white ball (~3 % of the
  picture) appears and moves for ``ON_S`` seconds every ``ON_S + OFF_S``; for each change the camera prints
  ``appeared T`` or ``left T``, T being the wall-clock time (``time.time()``) at which
  the first frame showing it was captured;
- ``/file0`` ... ``/file<N-1>`` (with ``--file``): the H.264 video of MP4, played once
  at its own pace from when a client connects, sent as it is (no encoding here, so N
  cameras cost this process little).

It prints ``ready`` once it listens, and serves until killed.
"""

import argparse
import sys
import time

import gi  # type: ignore[import-not-found]  # python3-gi: the system Python's, not the venv's

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # type: ignore[import-not-found]  # noqa: E402

ENCODE = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96"
AUDIO = "audiotestsrc is-live=true wave=ticks ! audioconvert ! audioresample ! avenc_aac ! rtpmp4apay name=pay1 pt=97"
GREY, WHITE = 0xFF808080, 0xFFFFFFFF


class Scene:
    """Shows and hides the ball of every ``/scene`` pipeline on the schedule. The colour is
    changed as a frame leaves the source, so the next frame is the first to show it; when
    that one leaves (a live source sends each frame at its capture time) the change is
    printed with the time."""

    def __init__(self, on_s: float, off_s: float) -> None:
        self.on_s, self.off_s = on_s, off_s
        self.shown = False
        self.next_change = 0.0
        self.to_tell = False

    def attach(self, factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        source = media.get_element().get_by_name("scene")  # a new media starts without the ball
        self.shown, self.to_tell, self.next_change = False, False, time.time() + self.off_s
        source.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, self._frame, source)

    def _frame(self, pad: Gst.Pad, info: Gst.PadProbeInfo, source: Gst.Element) -> Gst.PadProbeReturn:
        now = time.time()
        if self.to_tell:  # the first frame drawn since the change
            self.to_tell = False
            print(f"{'appeared' if self.shown else 'left'} {now:.6f}", flush=True)
        if now >= self.next_change:
            self.shown = not self.shown
            source.set_property("foreground-color", WHITE if self.shown else GREY)
            self.next_change = now + (self.on_s if self.shown else self.off_s)
            self.to_tell = True
        return Gst.PadProbeReturn.OK


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port")
    parser.add_argument("--scene", nargs=2, type=float, metavar=("ON_S", "OFF_S"))
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--file", nargs=2, metavar=("MP4", "N"))
    args = parser.parse_args()
    width, height = args.size.split("x")
    caps = f"video/x-raw,width={width},height={height},framerate=10/1"
    video = f"videotestsrc is-live=true pattern=ball motion=sweep ! {caps} ! {ENCODE}"
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(args.port)
    mounts = server.get_mount_points()
    for path, launch in (("/video", video), ("/av", f"{video} {AUDIO}")):
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(f"( {launch} )")
        factory.set_shared(True)
        mounts.add_factory(path, factory)
    if args.scene:
        scene = Scene(*args.scene)
        # Drawn at half size and scaled up: a ball of ~3 % of the picture, a person's size.
        half = f"video/x-raw,width={int(width) // 2},height={int(height) // 2},framerate=10/1"
        still = (
            f"videotestsrc name=scene is-live=true pattern=ball motion=wavy background-color={GREY} "
            f"foreground-color={GREY} ! {half} ! videoscale ! {caps} ! {ENCODE}"
        )
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(f"( {still} )")
        factory.set_shared(True)
        factory.connect("media-configure", scene.attach)
        mounts.add_factory("/scene", factory)
    if args.file:
        for index in range(int(args.file[1])):
            factory = GstRtspServer.RTSPMediaFactory()
            factory.set_launch(
                f"( filesrc location={args.file[0]} ! qtdemux ! h264parse "
                "! rtph264pay name=pay0 pt=96 config-interval=1 )"
            )
            mounts.add_factory(f"/file{index}", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
