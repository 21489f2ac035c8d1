"""Pictures through PyAV (no image library needed): JPEG snapshots with the MJPEG encoder,
and scaling with FFmpeg's area filter."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import VideoFrame


def encode_jpeg(frame: VideoFrame, quality: int = 5) -> bytes:
    """``frame`` as JPEG bytes. ``quality`` is MJPEG's qscale: 2 (best) .. 31 (smallest).
    Costs a few milliseconds at 720p: call it off the event loop."""
    return rgb_to_jpeg(frame.rgb(), quality)


def rgb_to_jpeg(rgb: npt.NDArray[np.uint8], quality: int = 5) -> bytes:
    """An ``(height, width, 3)`` RGB array as JPEG bytes (odd sizes lose their last row/column)."""
    height, width = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height = width, height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    encoder.options = {"qscale": str(quality)}
    encoder.flags |= av.codec.context.Flags.qscale
    encoder.global_quality = quality * 118  # FF_QP2LAMBDA
    image = av.VideoFrame.from_ndarray(rgb[:height, :width], format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*encoder.encode(image), *encoder.encode(None)])


def scale_image(image: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    """A luma plane (h, w) or an RGB image (h, w, 3) resampled to ``width`` x ``height``
    with FFmpeg's area filter."""
    fmt = "gray" if image.ndim == 2 else "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=fmt)
    return np.asarray(frame.reformat(width=width, height=height, interpolation="AREA").to_ndarray(), np.uint8)
