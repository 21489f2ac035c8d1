"""Speech probability from Silero VAD, run with onnxruntime on the ONNX model that ships
inside the ``silero-vad`` package (no download, and torch is never imported).

The model takes 512-sample windows at 16 kHz (32 ms) preceded by the last 64 samples of
the previous window, and carries a recurrent state from window to window.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

WINDOW = 512
CONTEXT = 64


class VadUnavailable(RuntimeError):
    """The 'vad' extra is not installed."""


def silero_model_path() -> Path:
    """Where the installed ``silero-vad`` package keeps its ONNX model (the package itself
    is not imported: it would load torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("speech detection needs Silero VAD: pip install 'stream-rt[vad]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.exists():
        raise VadUnavailable(f"the silero-vad package has no ONNX model at {path}: reinstall it")
    return path


def vad_available() -> bool:
    """True if the 'vad' extra (silero-vad with onnxruntime) is installed."""
    return importlib.util.find_spec("silero_vad") is not None and importlib.util.find_spec("onnxruntime") is not None


class SileroVad:
    """Speech probability (0..1) of consecutive 32 ms windows of one audio stream."""

    def __init__(self) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise VadUnavailable("speech detection needs onnxruntime: pip install 'stream-rt[vad]'") from None
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        self._session: Any = onnxruntime.InferenceSession(
            str(silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(16_000, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Forget the stream so far (call after a gap in the audio)."""
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)

    def __call__(self, window: npt.NDArray[np.float32]) -> float:
        if window.shape != (WINDOW,):
            raise ValueError(f"Silero VAD takes windows of {WINDOW} samples, got {window.shape}")
        x = np.concatenate([self._context, window])[None, :]
        prob, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = window[-CONTEXT:].copy()
        return float(prob[0, 0])
