"""Speech recognisers: what turns a stretch of 16 kHz mono speech into words with times.

- :class:`PocketSphinx`: the default, fully offline; its English model (``en-us``) ships
  inside the ``pocketsphinx`` wheel (the ``speech`` extra). Another language needs a
  model folder of its own (``model_dir``: an acoustic model folder, a ``.dict`` and a
  language model ``.lm.bin`` / ``.lm``).
- :class:`FasterWhisper`: for users who have a CTranslate2 Whisper model folder
  (``model_dir``); nothing is downloaded.

:func:`load_recognizer` loads the one a ``[transcription]`` section names, or raises
:class:`RecognizerUnavailable` with one line saying why.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_rt.config import TranscriptionConfig

RecognizedWord = tuple[str, float, float, float]
"""One word as a recogniser returns it: text, start and end (seconds from the stretch's
first sample), confidence (0..1)."""


class RecognizerUnavailable(RuntimeError):
    """The configured recogniser cannot be used here (not installed, no model)."""


class Recognizer(Protocol):
    engine: str
    language: str

    def recognize(self, samples: npt.NDArray[np.float32]) -> list[RecognizedWord]:
        """The words of ``samples`` (16 kHz mono float32), in order. Not thread-safe: one
        thread at a time."""
        ...


_FILLER = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")  # <s>, </s>, <sil>, [NOISE], ++BREATH++
_VARIANT = re.compile(r"\(\d+\)$")  # read(2): the second pronunciation of "read"


class PocketSphinx:
    """CMU PocketSphinx 5. Its own English model, or the model in ``model_dir``."""

    engine = "pocketsphinx"

    def __init__(self, language: str = "en", model_dir: Path | None = None) -> None:
        _require("pocketsphinx")
        from pocketsphinx import Decoder

        self.language = language
        self._decoder = Decoder(samprate=16000, loglevel="FATAL", **_pocketsphinx_model(language, model_dir))
        self._frame_s = 1.0 / float(self._decoder.config["frate"])

    def recognize(self, samples: npt.NDArray[np.float32]) -> list[RecognizedWord]:
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        if self._decoder.hyp() is None:
            return []
        words = []
        for seg in self._decoder.seg():
            if _FILLER.match(seg.word):
                continue
            start, end = seg.start_frame * self._frame_s, (seg.end_frame + 1) * self._frame_s
            words.append((_VARIANT.sub("", seg.word), start, end, float(min(1.0, max(0.0, seg.prob)))))
        return words


def _pocketsphinx_model(language: str, model_dir: Path | None) -> dict[str, str]:
    """pocketsphinx's arguments for its model: none for its own English one; for a model
    folder, the acoustic model (the folder holding ``mdef``), the pronunciation dictionary
    (``*.dict``) and the language model."""
    if model_dir is None:
        if language.split("-")[0] != "en":
            raise RecognizerUnavailable(
                f"pocketsphinx's own model is English; for language '{language}' set "
                "[transcription] model_dir to a pocketsphinx model folder"
            )
        return {}
    if not model_dir.is_dir():
        raise RecognizerUnavailable(f"pocketsphinx model folder {model_dir} does not exist")
    acoustic = next((p.parent for p in sorted(model_dir.rglob("mdef"))), None)
    dictionary = next(iter(sorted(model_dir.rglob("*.dict"))), None)
    lm = next(iter(sorted(model_dir.rglob("*.lm.bin")) + sorted(model_dir.rglob("*.lm"))), None)
    missing = [name for name, found in (("an acoustic model (mdef)", acoustic), ("a dictionary (*.dict)", dictionary),
                                        ("a language model (*.lm.bin)", lm)) if found is None]  # fmt: skip
    if missing:
        raise RecognizerUnavailable(f"pocketsphinx model folder {model_dir} has no {', no '.join(missing)}")
    return {"hmm": str(acoustic), "dict": str(dictionary), "lm": str(lm)}


class FasterWhisper:
    """faster-whisper on the CPU (int8), from a local CTranslate2 Whisper model folder."""

    engine = "faster-whisper"

    def __init__(self, language: str, model_dir: Path | None) -> None:
        _require("faster-whisper")
        from faster_whisper import WhisperModel

        folder = _whisper_model_dir(model_dir)
        self.language = language
        self._model = WhisperModel(str(folder), device="cpu", compute_type="int8", local_files_only=True)

    def recognize(self, samples: npt.NDArray[np.float32]) -> list[RecognizedWord]:
        segments, _ = self._model.transcribe(
            samples, language=self.language.split("-")[0], word_timestamps=True, beam_size=1, vad_filter=False
        )
        return [
            (w.word.strip(), float(w.start), float(w.end), float(w.probability))
            for segment in segments
            for w in segment.words or ()
            if w.word.strip()
        ]


def load_recognizer(config: TranscriptionConfig) -> Recognizer:
    """The recogniser ``config`` names, loaded; :class:`RecognizerUnavailable` (one line)
    when it cannot be."""
    if config.engine == "faster-whisper":
        return FasterWhisper(config.language, config.model_dir)
    return PocketSphinx(config.language, config.model_dir)


def check_recognizer(config: TranscriptionConfig) -> None:
    """:class:`RecognizerUnavailable` (one line) when the recogniser ``config`` names could
    not be loaded — checked without loading it (its model is loaded once, where it runs)."""
    if config.engine == "faster-whisper":
        _require("faster-whisper")
        _whisper_model_dir(config.model_dir)
    else:
        _require("pocketsphinx")
        _pocketsphinx_model(config.language, config.model_dir)


def recognizer_available(config: TranscriptionConfig) -> bool:
    """Whether the engine ``config`` names is installed (its model is checked at load)."""
    return importlib.util.find_spec(_MODULES[config.engine][0]) is not None


_MODULES = {
    "pocketsphinx": ("pocketsphinx", "the 'speech' extra: pip install 'stream-rt[speech]'"),
    "faster-whisper": ("faster_whisper", "it installed: pip install faster-whisper"),
}


def _require(engine: str) -> None:
    module, how = _MODULES[engine]
    if importlib.util.find_spec(module) is None:
        raise RecognizerUnavailable(f"transcription with {engine} needs {how}")


def _whisper_model_dir(model_dir: Path | None) -> Path:
    if model_dir is None or not model_dir.is_dir():
        where = "is not set" if model_dir is None else f"({model_dir}) does not exist"
        raise RecognizerUnavailable(
            f"faster-whisper needs a CTranslate2 Whisper model folder: [transcription] model_dir {where}; "
            "nothing is downloaded"
        )
    return model_dir
