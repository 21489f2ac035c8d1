"""A source's settings: where its media come from, how it reconnects, and its own keys of
the gate sections (the top-level sections are the defaults they override, see
:mod:`stream_rt.config.effective`)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, model_validator

from stream_rt.config.base import StrictModel
from stream_rt.config.perception import (
    AudioGateConfig,
    ChangeConfig,
    DetectConfig,
    SalienceConfig,
    TranscriptionConfig,
)
from stream_rt.config.trigger import TriggerConfig
from stream_rt.config.zones import Polygon

SYNTHETIC_PARAMETERS = {"frames": int, "fps": float, "width": int, "height": int, "active_s": float,
                        "period_s": float, "seed": int}  # fmt: skip
"""The parameters of a ``synthetic:?...`` URL and their types."""


def synthetic_parameters(url: str) -> dict[str, float]:
    """The parameters of a ``synthetic:?...`` URL; raises ``ValueError`` naming a bad one."""
    parameters: dict[str, float] = {}
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        kind = SYNTHETIC_PARAMETERS.get(key)
        if kind is None:
            raise ValueError(f"unknown synthetic source parameter '{key}' (known: {', '.join(SYNTHETIC_PARAMETERS)})")
        try:
            parameters[key] = kind(value)
        except ValueError:
            raise ValueError(f"synthetic source parameter {key}={value!r} is not a {kind.__name__}") from None
    return parameters


class BackoffConfig(StrictModel):
    initial_s: float = Field(
        0.5, gt=0, title="First delay (s)", description="first reconnect delay, doubled per failed attempt"
    )
    max_s: float = Field(
        10.0, gt=0, title="Longest delay (s)", description="longest reconnect delay (a camera back is seen within it)"
    )
    jitter: float = Field(0.2, ge=0, le=1, title="Jitter", description="random +/- share applied to each delay")


class InputConfig(StrictModel):
    """How a source reads its input and keeps it coming: input format, FFmpeg options, live or not,
    timeouts, reconnect backoff and (``mqtt://`` sources) what each message holds. A ``[[sources]]``
    entry holds these keys itself (:class:`SourceConfig` is an :class:`InputConfig`); a source built in
    code takes one (:class:`~stream_rt.sources.AvSource`, :class:`~stream_rt.sources.MqttSource`)."""

    format: str | None = Field(
        None, title="Input format", description="FFmpeg input format, for devices (v4l2, alsa, avfoundation)"
    )
    live: bool | None = Field(
        None, title="Live", description="reconnect forever; default: network URLs and devices are live"
    )
    options: dict[str, str] = Field(default_factory=dict, title="FFmpeg options", description="extra FFmpeg options")
    stall_timeout_s: float = Field(
        10.0,
        gt=0,
        title="Stall timeout (s)",
        description="a live source without a frame this long is offline (network and device sources are "
        "reconnected; mqtt:// sources stay subscribed and are back online with the next frame)",
    )
    timeout_s: float = Field(
        10.0, gt=0, title="Network timeout (s)", description="network open/read timeout of a live source"
    )
    reconnect: BackoffConfig = Field(
        default_factory=BackoffConfig, title="Reconnect backoff", description="delays between reconnect attempts"
    )
    frames: Literal["jpeg", "gray", "rgb24"] = Field(
        "jpeg",
        title="MQTT frame format",
        description="mqtt:// sources: what each message holds (a JPEG, or raw pixels of width x height)",
    )
    width: int | None = Field(
        None, gt=0, title="MQTT frame width", description="mqtt:// sources with raw frames: frame width"
    )
    height: int | None = Field(
        None, gt=0, title="MQTT frame height", description="mqtt:// sources with raw frames: frame height"
    )


class SourceConfig(InputConfig):
    id: str = Field(
        pattern=r"^[A-Za-z0-9_-]+$", title="Source id", description="name of the source in topics, logs and metrics"
    )
    url: str = Field(
        title="Source URL",
        description="file path, network URL (rtsp://, udp://, tcp://, http://...), device, "
        "mqtt://host:port/topic for frames published over MQTT, or synthetic:?frames=N&fps=F&width=W&height=H"
        "&active_s=A&period_s=P for generated frames (load runs)",
    )
    video: bool = Field(True, title="Decode video", description="decode the first video stream")
    audio: bool | AudioGateConfig = Field(
        True,
        title="Decode audio",
        description="decode the first audio stream (resampled to 16 kHz mono); a table also overrides [audio]'s "
        "analysis settings for this source",
    )
    on_error: Literal["restart", "stop"] | None = Field(
        None,
        title="On error",
        description="when the source raises: restart it, or stop the daemon; default: restart live, stop files",
    )

    change: ChangeConfig | None = Field(
        None, title="Change detection", description="this source's [change] settings (the keys given)"
    )
    transcription: TranscriptionConfig | None = Field(
        None, title="Transcription", description="this source's [transcription] settings (the keys given)"
    )
    salience: SalienceConfig | None = Field(
        None, title="Salience", description="this source's [salience] settings (the keys given)"
    )
    trigger: TriggerConfig | None = Field(
        None, title="Trigger", description="this source's [trigger] settings (the keys given)"
    )
    detect: DetectConfig | None = Field(
        None, title="Object detection", description="this source's [detect] settings (the keys given)"
    )
    question: str | None = Field(
        None, title="Question", description="what to ask the model about this source's events ([mllm] question)"
    )
    masks: list[Polygon] = Field(
        default_factory=list,
        title="Masks",
        description="polygons change detection ignores: [[x, y], ...] in pixels, or all in 0..1 of the frame",
    )
    zones: dict[str, Polygon] = Field(
        default_factory=dict,
        title="Zones",
        description="named polygons (as masks); events name the zones their activity touched",
    )
    require_zones: list[str] = Field(
        default_factory=list,
        title="Required zones",
        description="open episodes only for activity inside these zones (changed regions, objects' feet); sound "
        "alone opens none",
    )
    objects: list[str] = Field(
        default_factory=list,
        title="Objects",
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
