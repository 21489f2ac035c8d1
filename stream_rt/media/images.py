"""Pictures, through PyAV and numpy alone (no image library needed): the home of every
image helper the other floors use, depending on nothing of stream_rt's own.

- luma: :func:`y_plane` reads a decoded frame's Y plane without copying, :func:`rgb_luma`
  computes it from RGB;
- decode: :func:`decode_image` (JPEG, PNG... bytes, size checked before decoding, see
  :data:`MAX_IMAGE_PIXELS`) and :func:`decode_data_url` (a ``data:image/...;base64,`` URL);
- resize and crop: :func:`scale_image` (FFmpeg's area filter), :func:`resize` (never up),
  :func:`region_crop`;
- polygons on a picture: :func:`polygon_in_pixels` (relative or pixel corners) and
  :func:`inside` (which points a polygon covers);
- JPEG snapshots: :func:`encode_jpeg` (a frame) and :func:`rgb_to_jpeg` (an RGB array),
  with the MJPEG encoder.

Arrays are ``(height, width)`` uint8 for luma and ``(height, width, 3)`` uint8 for RGB.
Encoding and scaling cost milliseconds at 720p: call them off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
import numpy.typing as npt

Rgb = npt.NDArray[np.uint8]
"""An ``(height, width, 3)`` uint8 RGB array."""

# Pixel formats whose first plane is the luma plane, one byte per sample.
_PLANAR_Y = frozenset(
    {
        "yuv420p",
        "yuvj420p",
        "yuv422p",
        "yuvj422p",
        "yuv444p",
        "yuvj444p",
        "yuv410p",
        "yuv411p",
        "yuv440p",
        "yuvj440p",
        "nv12",
        "nv21",
        "nv16",
        "gray",
        "yuva420p",
    }
)
# Packed formats with luma in every other byte (common on USB cameras).
_PACKED_YUYV = {"yuyv422": 0, "yvyu422": 0, "uyvy422": 1}

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
"""BT.601 luma of RGB."""

MAX_IMAGE_PIXELS = 8192 * 8192
"""Larger pictures from outside (MQTT frames, worker requests) are refused before decoding."""


# ----------------------------------------------------------------------------- luma


def y_plane(frame: av.VideoFrame) -> npt.NDArray[np.uint8]:
    """The luma plane of ``frame`` as an ``(height, width)`` uint8 array, without copying
    when the pixel format allows it (a view into the decoder's buffer: do not write to it)."""
    name = frame.format.name
    width, height = frame.width, frame.height
    if name in _PLANAR_Y or name in _PACKED_YUYV:
        plane = frame.planes[0]
        rows: npt.NDArray[np.uint8] = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
        if name in _PLANAR_Y:
            return rows[:height, :width]
        start = _PACKED_YUYV[name]
        return rows[:height, start : start + 2 * width : 2]
    return np.asarray(frame.to_ndarray(format="gray"), dtype=np.uint8)


def rgb_luma(rgb: Rgb) -> npt.NDArray[np.uint8]:
    """The BT.601 luma of an ``(height, width, 3)`` RGB array."""
    return np.asarray((rgb @ LUMA_WEIGHTS).round(), np.uint8)


# ----------------------------------------------------------------------------- decode


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header or a PNG's IHDR, read without decoding;
    ``None`` for other data."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + length
    return None


def decode_image(data: bytes, format: str | None = None) -> av.VideoFrame:
    """The first picture in ``data`` (an encoded image: JPEG, PNG...; ``format`` forces
    the demuxer); raises ValueError when it is not one, or when its header announces more
    than :data:`MAX_IMAGE_PIXELS` (a decompression bomb)."""
    size = image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {size[0]}x{size[1]} refused: over {MAX_IMAGE_PIXELS} pixels")
    try:
        with av.open(io.BytesIO(data), mode="r", format=format) as container:
            return next(container.decode(video=0))
    except (av.error.FFmpegError, StopIteration) as exc:
        raise ValueError(f"not an image: {exc}") from None


def decode_data_url(url: str) -> Rgb:
    """The RGB picture of a ``data:image/...;base64,`` URL; raises ValueError (saying what
    is wrong) for any other URL, a payload that is not base64, or one that is not an image."""
    if not url.startswith("data:"):
        raise ValueError("not a data: URL")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ValueError("image data URLs must be base64")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None
    return np.asarray(decode_image(data).to_ndarray(format="rgb24"), np.uint8)


# ----------------------------------------------------------------------------- resize and crop


def scale_image(image: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    """A luma plane (h, w) or an RGB image (h, w, 3) resampled to ``width`` x ``height``
    with FFmpeg's area filter."""
    fmt = "gray" if image.ndim == 2 else "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=fmt)
    return np.asarray(frame.reformat(width=width, height=height, interpolation="AREA").to_ndarray(), np.uint8)


def resize(rgb: Rgb, max_side: int) -> Rgb:
    """Scale down (never up) so the longest side is at most ``max_side`` (even sizes);
    ``rgb`` itself when it is small enough."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return rgb
    return scale_image(rgb, max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2))


def region_crop(rgb: Rgb, regions: Sequence[tuple[int, int, int, int]], margin: float = 0.25) -> Rgb | None:
    """The union of ``regions`` (``(x0, y0, x1, y1)`` pixel boxes) with a margin, copied;
    ``None`` when there are none or they already cover a quarter of the picture or more
    (the whole picture shows them well enough)."""
    if not regions:
        return None
    h, w = rgb.shape[:2]
    x0, y0 = min(b[0] for b in regions), min(b[1] for b in regions)
    x1, y1 = max(b[2] for b in regions), max(b[3] for b in regions)
    if (x1 - x0) * (y1 - y0) >= 0.25 * w * h:
        return None
    mx, my = int((x1 - x0) * margin) + 8, int((y1 - y0) * margin) + 8
    x0, y0, x1, y1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


# ----------------------------------------------------------------------------- polygons

Polygon = Sequence[tuple[float, float]]
"""A polygon's ``(x, y)`` corners, in pixels or, when every coordinate lies within 0..1, in
shares of the picture's width and height."""


def polygon_in_pixels(polygon: Polygon, width: int, height: int) -> list[tuple[float, float]]:
    """The corners of ``polygon`` in pixels of a ``width`` x ``height`` picture."""
    if all(0 <= x <= 1 and 0 <= y <= 1 for x, y in polygon):
        return [(x * width, y * height) for x, y in polygon]
    return [(float(x), float(y)) for x, y in polygon]


def inside(polygon: Polygon, xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Which points ``(xs[i], ys[i])`` lie inside ``polygon`` (pixel corners; even-odd rule)."""
    result = np.zeros(xs.shape, np.bool_)
    corners = list(polygon)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True):
        crosses = (y0 > ys) != (y1 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            at_x = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        result ^= crosses & (xs < at_x)
    return result


# ----------------------------------------------------------------------------- JPEG snapshots


class HasRgb(Protocol):
    """Anything that converts itself to RGB, such as a :class:`~stream_rt.graph.packets.VideoFrame`."""

    def rgb(self) -> Rgb: ...


def encode_jpeg(frame: HasRgb, quality: int = 5) -> bytes:
    """``frame`` as JPEG bytes. ``quality`` is MJPEG's qscale: 2 (best) .. 31 (smallest)."""
    return rgb_to_jpeg(frame.rgb(), quality)


def rgb_to_jpeg(rgb: Rgb, quality: int = 5) -> bytes:
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
