"""The public API is what stream_rt/__init__.py lists: pinned so changes are deliberate."""

from __future__ import annotations

import subprocess
import sys

import stream_rt

PUBLIC = {
    "AUDIO_SAMPLE_RATE", "AudioAnalyzer", "AudioChunk", "AudioFeatures", "AvSource", "Backoff",
    "CallbackSink", "ChangeDetector", "ChangeMap", "Channel", "ChannelStats", "Clock", "Config",
    "ConfigError", "Context", "ControlPacket", "EndOfStream", "Event", "Flush", "Graph", "GraphBuildError",
    "MllmAnswer", "MllmRequest", "MllmStage", "Backend", "MissingWeights", "ModelUnavailable", "OpenAIBackend",
    "TransformersBackend", "build_smoke_model",
    "JsonlSink", "ManualClock", "MqttSink", "MqttSource", "Node", "NodeFailed", "Packet", "Pipeline", "PushSource",
    "RealtimeClock", "ReplayClock", "Salience", "SalienceFusion", "Sink", "Source", "SourceError",
    "SourceStatus", "StreamEnded", "Supervision", "SyntheticSource", "TriggerPolicy", "VideoFrame", "build_pipeline",
    "load_config", "parse_config", "DetectedObject", "ObjectGate", "SceneLayout", "load_detector",
    "WatchBook", "WatchState", "History", "HistoryEntry", "HistoryAnswer", "ask_history",
}  # fmt: skip


def test_all_is_pinned_and_importable() -> None:
    assert set(stream_rt.__all__) == PUBLIC
    for name in stream_rt.__all__:
        assert getattr(stream_rt, name) is not None


def test_importing_the_runtime_does_not_load_torch() -> None:
    code = "import sys, stream_rt, stream_rt.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
