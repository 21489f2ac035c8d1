"""The security review, as tests: no unsafe deserialisation in the package, external
pictures bounded before they are decoded, secrets kept out of logs."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stream_rt
from stream_rt.media.images import MAX_IMAGE_PIXELS, decode_image, image_size

PACKAGE = Path(stream_rt.__file__).parent
UNSAFE = re.compile(
    r"\bpickle\b|(?<![.\w])eval\(|(?<![.\w])exec\(|allow_pickle=True|torch\.load\(|trust_remote_code|shell=True"
)


def test_the_package_never_unpickles_evaluates_or_shells_out_on_external_data() -> None:
    hits = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if UNSAFE.search(line.split("#")[0]) and "no pickle" not in line
    ]
    assert hits == []


def encoded(width: int, height: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_picture_sizes_are_read_from_headers(fmt: str) -> None:
    assert image_size(encoded(123, 45, fmt)) == (123, 45)
    assert image_size(b"not a picture") is None


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    png = bytearray(encoded(16, 16, "PNG"))
    png[16:24] = struct.pack(">II", 60_000, 60_000)  # the header claims 3.6 gigapixels
    with pytest.raises(ValueError, match=f"60000x60000 refused: over {MAX_IMAGE_PIXELS} pixels"):
        decode_image(bytes(png))
    jpeg = bytearray(encoded(16, 16, "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65_000, 65_000)
    with pytest.raises(ValueError, match="65000x65000 refused"):
        decode_image(bytes(jpeg), "mjpeg")
    assert decode_image(encoded(64, 48, "JPEG"), "mjpeg").width == 64
