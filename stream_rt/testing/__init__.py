"""Test your own nodes the way stream_rt tests its own.

:func:`run_node` feeds packets into one node inside a real graph and returns what it
emitted, per output port::

    out = await run_node(MyDetector("det"), [frame1, frame2])
    assert [p.changed for p in out["changes"]] == [False, True]

Time-based behaviour runs on :class:`~stream_rt.graph.clock.ManualClock`; generated
frames and audio come from :class:`~stream_rt.sources.synthetic.SyntheticSource`.

For what crosses a network, the services stream_rt's own tests and benchmarks use:

- MQTT (:mod:`~stream_rt.testing.broker`): :class:`Broker` runs a real mosquitto on a
  loopback port (killed and started again at will), :class:`Subscriber` records every
  message under a topic with paho-mqtt, :func:`make_certificates` makes throw-away TLS
  certificates; :func:`feed_graph` feeds numbered events to a sink under test;
- cameras (:mod:`~stream_rt.testing.cameras`): :class:`StreamServer` (``ffmpeg`` looping
  a clip over TCP), :class:`LaggingAvServer` (one whose audio arrives late) and
  :class:`RtspCamera` (GStreamer's RTSP server, :mod:`stream_rt.testing.rtsp_camera`);
- models (:mod:`~stream_rt.testing.model_servers`): :func:`start_worker` starts a real
  ``stream-rt worker`` process, :func:`chat_server` a minimal OpenAI-compatible server
  whose replies the test writes;
- ports (:mod:`~stream_rt.testing.ports`): :func:`free_port` / :func:`wait_listening`.

Test media (:mod:`~stream_rt.testing.media`): :func:`remux_audio_late` stores a clip's
audio behind its video in the file, :func:`audio_lag_s` measures by how much; :func:`clip_with_sound` takes frames of a
recording with the sound between them.

For models: :func:`tiny_model` writes a small random-weight model directory of a
vision-language family (Qwen2/2.5/3-VL, SmolVLM, Idefics3, LLaVA, LLaVA-OneVision,
Gemma 3, InternVL, LFM2-VL, Mistral 3) with its tokenizer, processor settings and chat
template, all built locally, so a config can be tried offline with the model type it
will run (its answers are not meaningful)::

    model = tiny_model("gemma3")  # then [mllm] model = "<that directory>"
"""

from stream_rt.graph.clock import ManualClock
from stream_rt.sources.synthetic import SyntheticSource
from stream_rt.testing.broker import Broker, Subscriber, make_certificates
from stream_rt.testing.cameras import LaggingAvServer, RtspCamera, StreamServer
from stream_rt.testing.harness import (
    TINY_MODEL_TYPES,
    ListSource,
    PacedEvents,
    feed_graph,
    numbered_event,
    run_node,
    tiny_model,
)
from stream_rt.testing.media import audio_lag_s, clip_with_sound, remux_audio_late
from stream_rt.testing.model_servers import chat_server, start_worker
from stream_rt.testing.ports import free_port, listening, wait_listening

__all__ = [
    "TINY_MODEL_TYPES",
    "Broker",
    "LaggingAvServer",
    "ListSource",
    "ManualClock",
    "PacedEvents",
    "RtspCamera",
    "StreamServer",
    "Subscriber",
    "SyntheticSource",
    "audio_lag_s",
    "chat_server",
    "clip_with_sound",
    "feed_graph",
    "free_port",
    "listening",
    "make_certificates",
    "numbered_event",
    "remux_audio_late",
    "run_node",
    "start_worker",
    "tiny_model",
    "wait_listening",
]
