"""Build a runnable graph from a :class:`~stream_rt.config.Config`.

The CLI stays thin: ``stream-rt run``, ``replay`` and ``eval`` call :func:`build_pipeline`,
and programs can do the same and then add their own nodes to ``pipeline.graph``::

    source.video -> change ---+
    source.audio -> audio ----+-> salience -> trigger -> events ---------> JSONL, MQTT
    source.status ------------+                         +-> mllm -> answers -> JSONL, MQTT
    source.status ----------------------------------------------------------> JSONL, MQTT

One change detector, audio analyser, fusion and trigger serve every source (each keeps
its state per source).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from stream_rt.config import Config, DetectConfig, MllmConfig, MqttSinkConfig, SourceConfig, SourceSettings
from stream_rt.graph import Graph, ReplayClock, Supervision
from stream_rt.graph.backoff import Backoff
from stream_rt.memory.streaming import StreamingMemory
from stream_rt.mllm.backend import Backend
from stream_rt.mllm.clips import ClipBuffer
from stream_rt.mllm.prompt import DEFAULT_QUESTION
from stream_rt.mllm.stage import MllmStage
from stream_rt.operators.audio import AudioAnalyzer
from stream_rt.operators.change import ChangeDetector
from stream_rt.operators.detectors import Detector, load_detector
from stream_rt.operators.objects import DetectSettings, ObjectGate
from stream_rt.operators.salience import SalienceFusion
from stream_rt.operators.vad import vad_available
from stream_rt.operators.zones import SceneLayout
from stream_rt.policies.asks import AskLedger
from stream_rt.policies.trigger import TriggerPolicy
from stream_rt.policies.watches import WatchBook, watch_entry
from stream_rt.sinks.jsonl import JsonlSink
from stream_rt.sinks.mqtt import MqttSettings, MqttSink
from stream_rt.sinks.report import ReportSink
from stream_rt.sources.av_source import AvSource
from stream_rt.sources.mqtt_source import MqttSource
from stream_rt.sources.status import StatusSource
from stream_rt.sources.synthetic import SyntheticSource

log = logging.getLogger("stream_rt.pipeline")


@dataclass
class Pipeline:
    graph: Graph
    sources: list[StatusSource]
    trigger: TriggerPolicy | None
    mllm: MllmStage | None
    jsonl: JsonlSink | None
    mqtt: MqttSink | None = None
    layouts: dict[str, SceneLayout] = field(default_factory=dict)  # each source's masks and zones

    @property
    def health_checks(self) -> list[MllmStage | MqttSink]:
        """What ``/healthz`` checks besides the sources."""
        return [c for c in (self.mllm, self.mqtt) if c is not None]


def build_source(cfg: SourceConfig) -> StatusSource:
    """An :class:`AvSource`, an :class:`MqttSource` for ``mqtt://`` URLs (credentials
    from ``$STREAM_RT_MQTT_USERNAME`` / ``$STREAM_RT_MQTT_PASSWORD``), or a
    :class:`SyntheticSource` for ``synthetic:`` URLs."""
    if cfg.url.startswith("synthetic:"):
        return SyntheticSource.from_url(cfg.id, cfg.url, audio=cfg.decodes_audio)
    backoff = Backoff(cfg.reconnect.initial_s, cfg.reconnect.max_s, cfg.reconnect.jitter)
    topic = cfg.mqtt_topic
    if topic is not None:
        address = urlsplit(cfg.url)
        return MqttSource(
            cfg.id,
            topic,
            host=address.hostname or "127.0.0.1",
            port=address.port or 1883,
            username=os.environ.get("STREAM_RT_MQTT_USERNAME"),
            password=os.environ.get("STREAM_RT_MQTT_PASSWORD"),
            format=cfg.frames,
            width=cfg.width,
            height=cfg.height,
            backoff=backoff,
            stall_timeout_s=cfg.stall_timeout_s,
        )
    return AvSource(
        cfg.id,
        cfg.url,
        video=cfg.video,
        audio=cfg.decodes_audio,
        live=cfg.live,
        format=cfg.format,
        options=dict(cfg.options),
        stall_timeout_s=cfg.stall_timeout_s,
        timeout_s=cfg.timeout_s,
        backoff=backoff,
    )


def build_pipeline(config: Config, *, speed: float | None = 1.0, sources: list[StatusSource] | None = None) -> Pipeline:
    """Sources -> perception gates -> trigger -> sinks, with the channel policies of
    ``config.graph``. ``speed`` paces recorded files (1.0 = real time, ``None`` = as fast
    as possible); live sources are never paced. ``sources`` (e.g. a :class:`PushSource`
    fed by a robot's own loop) are used as well as the config's ``[[sources]]``."""
    if not config.sources and not sources:
        raise ValueError("the config has no [[sources]]: add at least one source")
    graph = Graph(clock=ReplayClock(speed), drain_timeout_s=config.graph.drain_timeout_s)
    video_ch, audio_ch = config.graph.video_channel, config.graph.audio_channel
    for source in sources or []:
        graph.add(source, Supervision(on_error="stop"))
    sources = list(sources or [])
    for cfg in config.sources:
        source = build_source(cfg)
        live = isinstance(source, MqttSource) or (isinstance(source, AvSource) and source.live)
        on_error = cfg.on_error or ("restart" if live else "stop")
        graph.add(source, Supervision(on_error=on_error, max_restarts=None))
        sources.append(source)

    asks = AskLedger() if config.mllm is not None else None
    settings = {s.name: config.settings(s.name) for s in sources}
    layouts = {name: SceneLayout(own.masks, own.zones, own.require_zones) for name, own in settings.items()}
    trigger = _build_gates(graph, config, sources, asks, settings, layouts)
    mllm = None
    if config.mllm is not None and trigger is not None:
        questions = {s.id: s.question for s in config.sources if s.question}
        watches = WatchBook(config.watch_state)  # restored, then the configured ones set
        configured = {(w.source, w.id) for w in config.watches}
        for kept in watches.all():  # a [[watches]] entry deleted since: its watch ends
            if kept.origin == "config" and (kept.source_id, kept.id) not in configured:
                watches.remove(kept.source_id)
        watches.forget_ended({watch_entry(w.source, w.id, w.condition, w.expires_s, w.confirm, w.recheck_s)
                              for w in config.watches})  # fmt: skip
        for w in config.watches:
            watches.set(w.source, w.id, w.condition, w.expires_s, w.confirm, w.recheck_s, origin="config")
        trigger.watches = watches  # for the watch/set command
        mllm = _build_mllm(config.mllm, asks, questions, watches)
        graph.add(mllm, Supervision(on_error="restart", max_restarts=None))
        graph.connect("trigger.events", "mllm.events", capacity=64)
        if mllm.clip is not None:  # clips: the frames before each event and their sound
            for source in sources:
                if source.has_video:
                    graph.connect(f"{source.name}.video", "mllm.video", video_ch.policy, video_ch.capacity)
            if "audio" in graph:
                graph.connect("audio.features", "mllm.audio", capacity=256)

    jsonl = None
    if config.sinks.jsonl is not None:
        jsonl_cfg = config.sinks.jsonl
        names = {s.name for s in sources}
        jsonl = JsonlSink("jsonl", jsonl_cfg.path, snapshots_dir=jsonl_cfg.snapshots_dir, sources=names)
        graph.add(jsonl)
        _feed(graph, "jsonl", trigger, mllm, sources)
        for source in sources:
            if jsonl_cfg.video and source.has_video:
                graph.connect(f"{source.name}.video", "jsonl.in", video_ch.policy, video_ch.capacity)
            if jsonl_cfg.audio and source.has_audio:
                graph.connect(f"{source.name}.audio", "jsonl.in", audio_ch.policy, audio_ch.capacity)
    mqtt = None
    if config.sinks.mqtt is not None:
        mqtt = build_mqtt_sink(config.sinks.mqtt, graph, trigger, {s.name for s in sources})
        graph.add(mqtt)
        _feed(graph, "mqtt", trigger, mllm, sources)
    return Pipeline(graph, sources, trigger, mllm, jsonl, mqtt, layouts)


def _feed(
    graph: Graph, sink: str, trigger: TriggerPolicy | None, mllm: MllmStage | None, sources: list[StatusSource]
) -> None:
    """What every sink receives: events, answers, watch transitions and each source's status."""
    if trigger is not None:
        graph.connect("trigger.events", f"{sink}.in", capacity=64)
    if mllm is not None:
        graph.connect("mllm.answers", f"{sink}.in", capacity=64)
        graph.connect("mllm.watches", f"{sink}.in", capacity=64)
    for source in sources:
        graph.connect(f"{source.name}.status", f"{sink}.in")


def build_backend(cfg: MllmConfig) -> Backend:
    """The configured backend (nothing is loaded until the stage starts)."""
    if cfg.backend == "openai":
        from stream_rt.mllm.backends.openai_backend import OpenAIBackend

        assert cfg.url is not None
        api_key = cfg.api_key or os.environ.get("STREAM_RT_MLLM_API_KEY")
        return OpenAIBackend(
            cfg.url, cfg.model, api_key=api_key, max_new_tokens=cfg.max_new_tokens, contract_stop=cfg.contract_stop
        )
    from stream_rt.mllm.backends.transformers_backend import TransformersBackend
    from stream_rt.mllm.techniques import Techniques
    from stream_rt.mllm.techniques.compression import Compression
    from stream_rt.mllm.techniques.layer_exit import LayerExit
    from stream_rt.mllm.techniques.token_reuse import ReuseSettings, TokenReuse

    layer_exit = LayerExit(cfg.layer_exit_every, list(cfg.layer_exit_thresholds)) if cfg.layer_exit_every else None
    reuse = cfg.token_reuse
    token_reuse = TokenReuse(ReuseSettings(**reuse.model_dump(exclude={"enabled"}))) if reuse.enabled else None
    clip = cfg.clip
    compression = None
    if clip.frames > 1 and clip.compression != "off":
        compression = Compression(average=clip.keep, window_s=clip.window_s, mode=clip.compression)
    return TransformersBackend(
        cfg.model, device=cfg.device, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
        contract_stop=cfg.contract_stop, threads=cfg.threads, allow_download=cfg.allow_download,
        techniques=Techniques(token_reuse, compression, layer_exit, cfg.memory.text_tokens),
    )  # fmt: skip


def _build_mllm(cfg: MllmConfig, asks: AskLedger | None, questions: dict[str, str], watches: WatchBook) -> MllmStage:
    clip = ClipBuffer(cfg.clip.frames, cfg.clip.interval_s) if cfg.clip.frames > 1 else None
    m = cfg.memory
    memory = StreamingMemory(m.max_entries, m.anchors, m.tokens) if m.enabled else None
    return MllmStage(
        "mllm", build_backend(cfg), question=cfg.question or DEFAULT_QUESTION, timeout_s=cfg.timeout_s,
        max_side=cfg.max_image_side, crop_regions=cfg.crop_regions, reuse_threshold=cfg.reuse_threshold,
        reuse_max_age_s=cfg.reuse_max_age_s, flow=cfg.flow, clip=clip, memory=memory,
        memory_snapshot=m.snapshot, snapshot_interval_s=m.snapshot_interval_s, memory_refresh=m.refresh, asks=asks,
        questions=questions,
        max_in_flight=cfg.in_flight, calls_per_minute=cfg.calls_per_minute, watches=watches,
    )  # fmt: skip


def build_mqtt_sink(cfg: MqttSinkConfig, graph: Graph, trigger: TriggerPolicy | None, sources: set[str]) -> MqttSink:
    """Credentials come from the config or, better, the environment; never from code."""
    settings = MqttSettings(
        host=cfg.host,
        port=cfg.port,
        prefix=cfg.prefix,
        client_id=cfg.client_id,
        username=cfg.username or os.environ.get("STREAM_RT_MQTT_USERNAME"),
        password=cfg.password or os.environ.get("STREAM_RT_MQTT_PASSWORD"),
        outbox=cfg.outbox,
        stats_interval_s=cfg.stats_interval_s,
        tls_ca=cfg.tls_ca,
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
        home_assistant=cfg.home_assistant,
        discovery_prefix=cfg.discovery_prefix,
    )
    return MqttSink(
        "mqtt",
        settings,
        drain_timeout_s=graph.drain_timeout_s,
        stats=graph.statistics,
        commands=trigger,
        sources=sources,
    )


def _build_gates(
    graph: Graph,
    config: Config,
    sources: list[StatusSource],
    asks: AskLedger | None,
    settings: dict[str, SourceSettings],
    layouts: dict[str, SceneLayout],
) -> TriggerPolicy | None:
    video_ch, audio_ch = config.graph.video_channel, config.graph.audio_channel
    with_video = [s for s in sources if s.has_video and settings[s.name].change.enabled]
    with_audio = [s for s in sources if s.has_audio and settings[s.name].audio.enabled]
    if not with_video and not with_audio:
        return None
    # The config sections mirror the constructors' keyword arguments one to one.
    fusion = SalienceFusion("salience", **config.salience.model_dump())
    graph.add(fusion)
    trigger = TriggerPolicy("trigger", **config.trigger.model_dump(), asks=asks)
    for source in sources:  # fusion waits only for what is wired, and hears when a source goes offline
        own = settings[source.name]
        fusion.expect(source.name, video=source in with_video, audio=source in with_audio)
        fusion.configure(source.name, **own.salience.model_dump())
        trigger.configure(source.name, require_zones=tuple(own.require_zones), **own.trigger.model_dump())
        graph.connect(f"{source.name}.status", "salience.status")
    if with_video:
        change = ChangeDetector("change", **config.change.model_dump(exclude={"enabled"}))
        graph.add(change)
        for source in with_video:
            own = settings[source.name]
            change.configure(source.name, layouts[source.name], **own.change.model_dump(exclude={"enabled"}))
            graph.connect(f"{source.name}.video", "change.video", video_ch.policy, video_ch.capacity)
        detecting = [s for s in with_video if settings[s.name].detect.enabled]
        if detecting:
            detectors = _load_detectors([settings[s.name] for s in detecting])
            objects = ObjectGate("objects", wait=video_ch.policy == "block")
            for source in detecting:
                own = settings[source.name]
                d = own.detect
                gate = DetectSettings(d.detect_fps, tuple(own.objects), d.stationary_s, d.lost_s)
                objects.configure(source.name, detectors[_detector_key(d)], gate, layouts[source.name])
            graph.add(objects)
            graph.connect("change.changes", "objects.changes", capacity=8)
            graph.connect("objects.changes", "salience.changes", capacity=8)
        else:
            graph.connect("change.changes", "salience.changes", capacity=8)
    if with_audio:
        vad_installed = vad_available()
        vad = {s.name: vad_installed if (v := settings[s.name].audio.vad) is None else v for s in with_audio}
        if not all(vad.values()):
            why = "the 'vad' extra is not installed" if not vad_installed else "[audio] vad = false"
            log.info("speech detection is off for %s (%s)", ", ".join(n for n, on in vad.items() if not on), why)
        analyzer = AudioAnalyzer("audio", vad=False, **config.audio.model_dump(exclude={"enabled", "vad"}))
        graph.add(analyzer)
        for source in with_audio:
            analyzer.configure(source.name, vad=vad[source.name],
                               **settings[source.name].audio.model_dump(exclude={"enabled", "vad"}))  # fmt: skip
            graph.connect(f"{source.name}.audio", "audio.audio", audio_ch.policy, audio_ch.capacity)
        graph.connect("audio.features", "salience.audio", capacity=256)
    graph.add(trigger)
    graph.connect("salience.salience", "trigger.salience", capacity=64)
    return trigger


def _load_detectors(detecting: list[SourceSettings]) -> dict[tuple[object, ...], Detector]:
    """One detector per distinct way the sources load one (:func:`_detector_key`), loaded
    now: one that cannot load fails the build in one line."""
    loaded: dict[tuple[object, ...], Detector] = {}
    for d in (s.detect for s in detecting):
        if _detector_key(d) not in loaded:
            loaded[_detector_key(d)] = load_detector(
                d.model, min_score=d.min_score, input_size=d.input_size, threads=d.threads, labels=d.labels
            )
    return loaded


def _detector_key(d: DetectConfig) -> tuple[object, ...]:
    return (d.model, d.min_score, d.input_size, d.threads, d.labels)


def attach_report(pipeline: Pipeline, directory: Path, title: str, thresholds: tuple[float, float]) -> ReportSink:
    """Record ``pipeline``'s salience, events and answers for a report written into
    ``directory`` when the stream ends (the thumbnails show each source's masks and zones)."""
    graph = pipeline.graph
    report = ReportSink("report", directory, title, thresholds, pipeline.layouts)
    graph.add(report)
    if "salience" in graph:
        graph.connect("salience.salience", "report.salience", capacity=64)
    if pipeline.trigger is not None:
        graph.connect("trigger.events", "report.events", capacity=64)
    if pipeline.mllm is not None:
        graph.connect("mllm.answers", "report.answers", capacity=64)
    return report
