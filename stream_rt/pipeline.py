"""Build a runnable graph from a :class:`~stream_rt.config.Config`.

The CLI stays thin: ``stream-rt run`` and ``stream-rt replay`` call :func:`build_pipeline`,
and programs can do the same and then add their own nodes to ``pipeline.graph``.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_rt.config import Config, SourceConfig
from stream_rt.graph import Graph, ReplayClock, Supervision
from stream_rt.sinks.jsonl import JsonlSink
from stream_rt.sources.av_source import AvSource, Backoff


@dataclass
class Pipeline:
    graph: Graph
    sources: list[AvSource]
    jsonl: JsonlSink | None


def build_source(cfg: SourceConfig) -> AvSource:
    return AvSource(
        cfg.id,
        cfg.url,
        video=cfg.video,
        audio=cfg.audio,
        live=cfg.live,
        format=cfg.format,
        options=dict(cfg.options),
        stall_timeout_s=cfg.stall_timeout_s,
        timeout_s=cfg.timeout_s,
        backoff=Backoff(cfg.reconnect.initial_s, cfg.reconnect.max_s, cfg.reconnect.jitter),
    )


def build_pipeline(config: Config, *, speed: float | None = 1.0) -> Pipeline:
    """Sources -> sinks, with the channel policies of ``config.graph``.

    ``speed`` paces recorded files (1.0 = real time, ``None`` = as fast as possible);
    live sources are never paced.
    """
    if not config.sources:
        raise ValueError("the config has no [[sources]]: add at least one source")
    graph = Graph(clock=ReplayClock(speed), drain_timeout_s=config.graph.drain_timeout_s)
    sources = []
    for cfg in config.sources:
        source = build_source(cfg)
        on_error = cfg.on_error or ("restart" if source.live else "stop")
        graph.add(source, Supervision(on_error=on_error, max_restarts=None))
        sources.append(source)
    jsonl = None
    jsonl_cfg = config.sinks.jsonl
    if jsonl_cfg is not None:
        jsonl = JsonlSink("jsonl", jsonl_cfg.path)
        graph.add(jsonl)
        video, audio = config.graph.video_channel, config.graph.audio_channel
        for source in sources:
            graph.connect(f"{source.name}.status", "jsonl.in")
            if jsonl_cfg.video:
                graph.connect(f"{source.name}.video", "jsonl.in", video.policy, video.capacity)
            if jsonl_cfg.audio:
                graph.connect(f"{source.name}.audio", "jsonl.in", audio.policy, audio.capacity)
    return Pipeline(graph, sources, jsonl)
