"""A source's effective settings: the top-level gate sections with the keys its
``[[sources]]`` entry gives on top — resolved here and nowhere else."""

from __future__ import annotations

import typing

from pydantic import Field

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

if typing.TYPE_CHECKING:
    from stream_rt.config.root import Config


class SourceSettings(StrictModel):
    """One source's resolved settings (``stream-rt validate --effective`` prints them)."""

    change: ChangeConfig = Field(title="Change detection", description="the [change] section with the source's keys")
    audio: AudioGateConfig = Field(title="Audio analysis", description="the [audio] section with the source's keys")
    transcription: TranscriptionConfig = Field(
        title="Transcription", description="the [transcription] section with the source's keys"
    )
    salience: SalienceConfig = Field(title="Salience", description="the [salience] section with the source's keys")
    trigger: TriggerConfig = Field(title="Trigger", description="the [trigger] section with the source's keys")
    detect: DetectConfig = Field(title="Object detection", description="the [detect] section with the source's keys")
    question: str | None = Field(
        None, title="Question", description="what the model is asked about its events (its own, else [mllm]'s)"
    )
    masks: list[Polygon] = Field(default_factory=list, title="Masks", description="polygons change detection ignores")
    zones: dict[str, Polygon] = Field(
        default_factory=dict, title="Zones", description="named polygons that events name"
    )
    require_zones: list[str] = Field(
        default_factory=list, title="Required zones", description="episodes open only for activity inside these"
    )
    objects: list[str] = Field(
        default_factory=list, title="Objects", description="episodes open only for moving objects of these labels"
    )

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


def effective_settings(config: Config, source_id: str | None = None) -> SourceSettings:
    """What ``source_id`` runs with: the top-level sections with its own keys on top. A
    source that is not in the config (e.g. one a program pushes frames into), and
    ``None``, run with the top-level sections. Raises pydantic's ``ValidationError`` when
    a source's keys do not hold merged with the defaults."""
    source = next((s for s in config.sources if s.id == source_id), None)
    if source is None:
        return SourceSettings(
            change=config.change, audio=config.audio, transcription=config.transcription,
            salience=config.salience, trigger=config.trigger, detect=config.detect,
        )  # fmt: skip
    audio = source.audio if isinstance(source.audio, AudioGateConfig) else None
    question = source.question or (config.mllm.question if config.mllm is not None else None)
    return SourceSettings(
        change=_merged(config.change, source.change),
        audio=_merged(config.audio, audio),
        transcription=_merged(config.transcription, source.transcription),
        salience=_merged(config.salience, source.salience),
        trigger=_merged(config.trigger, source.trigger),
        detect=_merged(config.detect, source.detect),
        question=question,
        masks=source.masks,
        zones=source.zones,
        require_zones=source.require_zones,
        objects=source.objects,
    )


_Section = typing.TypeVar("_Section", bound=StrictModel)


def _merged(default: _Section, override: _Section | None) -> _Section:
    """``default`` with the keys ``override`` sets (validated again as a whole)."""
    if override is None or not override.model_fields_set:
        return default
    data = default.model_dump()
    for key in override.model_fields_set:
        value = getattr(override, key)
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data[key], dict) else value
    return type(default).model_validate(data)
