"""The whole configuration, and reading it: TOML parsed into pydantic models that reject
unknown keys.

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
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from stream_rt.config.base import ConfigError, StrictModel
from stream_rt.config.effective import SourceSettings, effective_settings
from stream_rt.config.graph import LOSSLESS_CHANNELS, ChannelConfig, GraphConfig
from stream_rt.config.history import HistoryConfig
from stream_rt.config.mllm import MllmConfig
from stream_rt.config.ops import LoggingConfig, OpsConfig
from stream_rt.config.perception import (
    AudioGateConfig,
    ChangeConfig,
    DetectConfig,
    SalienceConfig,
    TranscriptionConfig,
)
from stream_rt.config.sinks import SinksConfig
from stream_rt.config.sources import SourceConfig
from stream_rt.config.trigger import TriggerConfig
from stream_rt.config.watches import WatchConfig


class Config(StrictModel):
    """The whole validated configuration (what a TOML file or :func:`parse_config` gives):
    ``sources``, the gate sections whose values each source may override (``change``,
    ``audio``, ``salience``, ``trigger``, ``detect``), ``mllm`` (``None``: no model),
    ``sinks``, ``history``, ``watches``, ``graph``, ``ops``, ``logging``.
    Unknown keys are refused; :meth:`settings` resolves one source's effective settings."""

    sources: list[SourceConfig] = Field(
        default_factory=list,
        title="Sources",
        description="the cameras, microphones, files and streams watched, one [[sources]] table each",
    )
    watches: list[WatchConfig] = Field(
        default_factory=list,
        title="Watches",
        description="standing conditions the model re-checks on every call (needs [mllm])",
    )
    watch_state: Path | None = Field(
        None, title="Watch state file", description="file that keeps the watches and their states across restarts"
    )
    graph: GraphConfig = Field(
        default_factory=GraphConfig,
        title="Graph",
        description="how a stop drains and the channels between sources and their consumers",
    )
    change: ChangeConfig = Field(
        default_factory=ChangeConfig,
        title="Change detection",
        description="visual change detection: the defaults of every source",
    )
    audio: AudioGateConfig = Field(
        default_factory=AudioGateConfig,
        title="Audio analysis",
        description="audio analysis: the defaults of every source",
    )
    transcription: TranscriptionConfig = Field(
        default_factory=TranscriptionConfig,
        title="Transcription",
        description="what was said, from the speech the VAD finds: the defaults of every source",
    )
    salience: SalienceConfig = Field(
        default_factory=SalienceConfig,
        title="Salience",
        description="how change and sound are scored: the defaults of every source",
    )
    trigger: TriggerConfig = Field(
        default_factory=TriggerConfig,
        title="Trigger",
        description="when salience opens an episode and calls the model: the defaults of every source",
    )
    detect: DetectConfig = Field(
        default_factory=DetectConfig,
        title="Object detection",
        description="the object detector: the defaults of every source",
    )
    mllm: MllmConfig | None = Field(
        None, title="Multimodal model", description="ask a multimodal model about events (off when absent)"
    )
    sinks: SinksConfig = Field(
        default_factory=SinksConfig, title="Outputs", description="where events, answers and status go"
    )
    history: HistoryConfig = Field(
        default_factory=HistoryConfig,
        title="History",
        description="a searchable history of events, answers, transcripts and watch transitions (SQLite)",
    )
    ops: OpsConfig = Field(
        default_factory=OpsConfig, title="Operations", description="the HTTP endpoints for health and metrics"
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, title="Logging", description="what is logged and how")

    @model_validator(mode="after")
    def _settings_hold(self) -> Config:
        """The checks that span keys, on the defaults and on every source's own settings
        (a source's override is only a part: it is checked merged)."""
        sources = []
        for i, source in enumerate(self.sources):
            where = f"sources[{i}] ({source.id}): "
            try:
                sources.append((where, effective_settings(self, source.id)))
            except ValidationError as exc:
                raise ValueError(f"{where}{'; '.join(_describe(exc))}") from None
        problems = effective_settings(self).problems() + self._watch_problems()
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

    def settings(self, source_id: str) -> SourceSettings:
        """What ``source_id`` runs with (:func:`~stream_rt.config.effective.effective_settings`)."""
        return effective_settings(self, source_id)

    @field_validator("sources")
    @classmethod
    def _unique_ids(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        seen: set[str] = set()
        for source in sources:
            if source.id in seen:
                raise ValueError(f"source id '{source.id}' is used twice")
            if source.id == "history":
                raise ValueError("source id 'history' is taken by the history's MQTT topics: choose another")
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
    """Read and validate the TOML config file at ``path`` into a :class:`Config`. Raises
    :class:`ConfigError` (one line per problem, naming the file) when it cannot be read,
    is not TOML, or does not validate (see :func:`parse_config`)."""
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
    """Validate ``data`` (a config as a dict, as TOML gives it) into a :class:`Config`.
    Raises :class:`ConfigError` with one line per problem, each prefixed by ``origin`` and
    naming the key (an unknown key gets the closest known one)."""
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
