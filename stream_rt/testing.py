"""Test your own nodes the way stream_rt tests its own.

:func:`run_node` feeds packets into one node inside a real graph and returns what it
emitted, per output port::

    out = await run_node(MyDetector("det"), [frame1, frame2])
    assert [p.changed for p in out["changes"]] == [False, True]

Time-based behaviour runs on :class:`~stream_rt.graph.clock.ManualClock`; generated
frames and audio come from :class:`~stream_rt.sources.synthetic.SyntheticSource`.

For what crosses a network: :class:`Broker` runs a real mosquitto on a loopback port
(killed and started again at will), :class:`Subscriber` records every message under a
topic with paho-mqtt, :func:`feed_graph` feeds numbered events to a sink under test,
:func:`start_worker` starts a real ``stream-rt worker`` process, and :func:`free_port` /
:func:`wait_listening` find and wait for ports.

For models: :func:`tiny_model` writes a small random-weight model directory of a
vision-language family (Qwen2/2.5/3-VL, SmolVLM, Idefics3, LLaVA, LLaVA-OneVision,
Gemma 3, InternVL, LFM2-VL, Mistral 3) with its tokenizer, processor settings and chat
template, all built locally, so a config can be tried offline with the model type it
will run (its answers are not meaningful)::

    model = tiny_model("gemma3")  # then [mllm] model = "<that directory>"
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from stream_rt.graph.clock import Clock, ManualClock, ReplayClock
from stream_rt.graph.graph import Graph
from stream_rt.graph.node import Context, Node, Source, Supervision
from stream_rt.graph.packets import Event, Packet, Salience
from stream_rt.sinks.callback import CallbackSink
from stream_rt.sources.synthetic import SyntheticSource

__all__ = ["TINY_MODEL_TYPES", "Broker", "ListSource", "ManualClock", "PacedEvents", "Subscriber", "SyntheticSource",
           "feed_graph", "free_port", "numbered_event", "run_node", "tiny_model", "wait_listening"]  # fmt: skip

TINY_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "idefics3", "llava", "llava_onevision", "gemma3",
                    "internvl", "lfm2_vl", "mistral3")  # fmt: skip
"""The ``config.model_type`` values :func:`tiny_model` can write."""


def tiny_model(model_type: str, directory: str | Path | None = None, *, seed: int = 0) -> Path:
    """Write a tiny random-weight model of ``model_type`` (one of :data:`TINY_MODEL_TYPES`)
    into ``directory`` (default: a cache under ``$XDG_CACHE_HOME/stream_rt``, reused
    while it is complete) and return it. Needs the ``mllm`` extra; nothing is downloaded."""
    from stream_rt.mllm.tiny_models import build_tiny_model

    return build_tiny_model(model_type, directory, seed=seed)


class ListSource(Source):
    """Emits a fixed list of packets on port ``out``, then ends."""

    outputs = {"out": (Packet,)}

    def __init__(self, name: str, packets: Iterable[Packet]) -> None:
        super().__init__(name)
        self.packets = list(packets)

    async def run(self, ctx: Context) -> None:
        for packet in self.packets:
            await ctx.emit("out", packet)


async def run_node(
    node: Node,
    inputs: Iterable[Packet] | Mapping[str, Iterable[Packet]],
    *,
    clock: Clock | None = None,
    supervision: Supervision | None = None,
) -> dict[str, list[Packet]]:
    """Run ``node`` on ``inputs`` (a list for its only input port, or a dict by port) until
    every input has ended; return the packets it emitted on each output port, in order,
    control packets included."""
    if not isinstance(inputs, Mapping):
        if len(node.inputs) != 1:
            raise ValueError(f"node '{node.name}' has {len(node.inputs)} input ports: pass a dict by port")
        inputs = {next(iter(node.inputs)): inputs}
    graph = Graph(clock=clock or ManualClock())
    graph.add(node, supervision)
    for port, packets in inputs.items():
        feeder_type: Any = type("Feed", (ListSource,), {"outputs": {"out": node.inputs[port]}})
        graph.add(feeder_type(f"feed_{port}", packets))
        graph.connect(f"feed_{port}.out", f"{node.name}.{port}")
    outputs: dict[str, list[Packet]] = {port: [] for port in node.outputs}
    for port, collected in outputs.items():
        graph.add(CallbackSink(f"collect_{port}", collected.append, control=True))
        graph.connect(f"{node.name}.{port}", f"collect_{port}.in")
    await graph.run()
    return outputs


def listening(port: int) -> bool:
    """True once a TCP port on this machine is in LISTEN state (read from /proc, because a
    probe connection could take a one-client server's only accept)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                return True
    return False


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until ``proc`` listens on ``port``; raises RuntimeError if it exits or takes
    longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"process {proc.pid} ({proc.args!r}) did not start listening on port {port}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_worker(model: str | Path, port: int, *args: str, env: Mapping[str, str] | None = None,
                       timeout_s: float = 60.0) -> asyncio.subprocess.Process:  # fmt: skip
    """A real ``stream-rt worker`` serving ``model`` on ``127.0.0.1:port`` (more options in
    ``args``), once it says it is serving; its stderr stays piped for the caller to read."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_rt.cli", "worker", "--model", str(model), "--listen", f"127.0.0.1:{port}",
        *args, stderr=asyncio.subprocess.PIPE, env=None if env is None else dict(env),
    )  # fmt: skip
    assert proc.stderr is not None
    while b"serving" not in (line := await asyncio.wait_for(proc.stderr.readline(), timeout_s)):
        if not line:
            raise RuntimeError("the worker exited before serving")
    return proc


async def chat_server(port: int, reply: Callable[[dict[str, Any]], str | web.Response]) -> web.AppRunner:
    """A minimal OpenAI-compatible chat server on a loopback port, for tests of clients:
    each request's JSON body goes to ``reply``, whose text is streamed back as one chunk
    (or whose response is sent as it is). ``cleanup()`` the runner to stop it."""

    async def chat(request: web.Request) -> web.StreamResponse:
        said = reply(await request.json())
        if isinstance(said, web.Response):
            return said
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": said}, "finish_reason": "stop"}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class Broker:
    """A real mosquitto on a loopback port, which tests can kill and start again."""

    def __init__(
        self, port: int, workdir: Path, persistent: bool = False, auth: Path | None = None, tls: Path | None = None
    ) -> None:
        self.port = port
        self.config = workdir / "mosquitto.conf"
        # persistent: sessions and queued messages are saved on every change, so a test
        # subscriber's session survives a kill; messages go to subscribers at once (no
        # in-flight window), so what the broker acknowledged is already on its way to them.
        persistence = (
            f"persistence true\npersistence_location {workdir}/\n"
            "autosave_interval 1\nautosave_on_changes true\nmax_inflight_messages 0\n"
        )
        self.config.write_text(
            # user root: stay able to read files in the test's private tmp dir when run as root.
            f"listener {port} 127.0.0.1\nlog_dest none\nuser root\n"
            + (f"allow_anonymous false\npassword_file {auth}\n" if auth else "allow_anonymous true\n")
            + (persistence if persistent else "persistence false\n")
            + (
                f"cafile {tls}/ca.crt\ncertfile {tls}/server.crt\nkeyfile {tls}/server.key\nrequire_certificate true\n"
                if tls
                else ""
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdin=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(5)


class Subscriber:
    """Collects every message under a prefix with paho-mqtt in its own thread: a message is
    recorded in the callback, before its acknowledgement goes back, and the session is
    persistent (QoS 1) and reconnects by itself, so nothing is lost on this side."""

    def __init__(self, port: int, topic: str = "stream_rt/#") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = asyncio.Event()
        loop = asyncio.get_running_loop()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-subscriber-{port}", clean_session=False)
        client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # paho takes fractions of a second too

        def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            c.subscribe(topic, qos=1)
            loop.call_soon_threadsafe(self.connected.set)

        def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

        client.on_connect, client.on_message = on_connect, on_message
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        self._client = client

    def payloads(self, suffix: str) -> list[dict[str, object]]:
        return [json.loads(p) for t, p, _ in list(self.messages) if t.endswith(suffix)]

    async def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def numbered_event(i: int) -> Event:
    """Update event ``i`` of source ``cam`` (id ``cam-<i>``), for sink tests."""
    s = Salience("cam", i, i * 1_000_000, 0, 0.9, {"visual": 0.9})
    return Event("cam", i, s.pts_ns, 0, "update", f"cam-{i}", 0, None, 0.9, 0.9, s.components, (), True)


def feed_graph(sink: Node, ids: range, drain_timeout_s: float = 5.0, feed: type[ListSource] | None = None) -> Graph:
    """A graph that feeds the numbered events ``ids`` to ``sink``'s ``in`` port (through a
    ``feed``, by default :class:`PacedEvents`)."""
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=drain_timeout_s)
    graph.add((feed or PacedEvents)("feed", [numbered_event(i) for i in ids]))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in", capacity=64)
    return graph


class PacedEvents(ListSource):
    """Emits its events at a steady pace (a pause after every 50), so that a broker outage
    falls in the middle of the stream."""

    outputs = {"out": (Event,)}

    async def run(self, ctx: Context) -> None:
        for i, packet in enumerate(self.packets):
            await ctx.emit("out", packet)
            if i % 50 == 49:
                await asyncio.sleep(0.01)
