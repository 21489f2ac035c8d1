"""The MLLM stage with the smoke model (a real transformers model with seeded random
weights, fitted to always give one valid answer): answers tied to events, timeouts and
errors, flow limiting, the contract stop, answer reuse, and the missing-weights error."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from stream_rt import Event, Graph, MllmAnswer, MllmRequest, Packet, ReplayClock, VideoFrame
from stream_rt.config import LOSSLESS_CHANNELS, MllmConfig, parse_config
from stream_rt.graph import Context
from stream_rt.media.images import y_plane
from stream_rt.mllm.backend import Backend, MissingWeights, OnText
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.contract import JsonObjectEnd, parse_answer
from stream_rt.mllm.prompt import request_text
from stream_rt.mllm.smoke import SMOKE_ANSWER, build_smoke_model
from stream_rt.mllm.stage import MllmStage
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.layer_exit import LayerExit, calibrate, exit_cost
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import Broker, ListSource, Subscriber, start_worker

from .test_mqtt import wait_until


@pytest.fixture(scope="session")
def smoke_model() -> Path:
    return build_smoke_model()


@pytest.fixture(scope="session")
def smoke_backend(smoke_model: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(str(smoke_model))
    backend.load()
    yield backend


def clip_frames(samples: Path, indices: list[int]) -> list[VideoFrame]:
    """Real frames of vtest.avi (pedestrians, static camera) at these indices."""
    out = []
    with av.open(str(samples / "vtest.avi")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                rgb = frame.to_ndarray(format="rgb24")
                out.append(VideoFrame("cam", i, i * 100_000_000, 0, np.array(y_plane(frame)), lambda rgb=rgb: rgb))
            if i >= max(indices):
                break
    return out


def event_for(frame: VideoFrame, n: int, kind: str = "new", question: str | None = None) -> Event:
    return Event(
        "cam", frame.seq, frame.pts_ns, 0, kind, f"cam-{n}", frame.pts_ns, None, 0.9, 0.9, {"visual": 0.9},  # type: ignore[arg-type]
        ((300, 200, 360, 330),), True, "", question, None, frame,
    )  # fmt: skip


class Feed(ListSource):
    outputs = {"out": (Event,)}

    def __init__(self, name: str, packets: list[Packet], gap_s: float = 0.0) -> None:
        super().__init__(name, packets)
        self.gap_s = gap_s

    async def run(self, ctx: Context) -> None:
        for packet in self.packets:
            await ctx.emit("out", packet)
            await asyncio.sleep(self.gap_s)


async def run_stage(stage: MllmStage, packets: list[Packet], gap_s: float = 0.0) -> list[MllmAnswer]:
    answers: list[MllmAnswer] = []
    graph = Graph(clock=ReplayClock(None))
    graph.add(Feed("feed", packets, gap_s))
    graph.add(stage)
    from stream_rt import CallbackSink

    graph.add(CallbackSink("sink", lambda p: answers.append(p) if isinstance(p, MllmAnswer) else None))
    graph.connect("feed.out", "mllm.events")
    graph.connect("mllm.answers", "sink.in")
    await graph.run()
    return answers


class ScriptedBackend(Backend):
    """Stands in for a model to test the stage's handling of slow, failing and hanging
    backends: answers after ``delay_s``, raises, or never returns."""

    name = "scripted"

    def __init__(self, behaviour: str = "ok", delay_s: float = 0.0) -> None:
        self.behaviour, self.delay_s = behaviour, delay_s
        self.calls: list[str] = []

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        self.calls.append(request.event_id)
        if self.behaviour == "raise":
            raise RuntimeError("CUDA out of memory")
        if self.behaviour == "hang" and len(self.calls) == 1:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay_s)
        answer, _ = parse_answer(SMOKE_ANSWER)
        return MllmAnswer(
            request.source_id, request.seq, request.pts_ns, 0, request.event_id, request.question, "ok", answer,
            SMOKE_ANSWER, self.name,
        )  # fmt: skip


def test_json_object_end_ignores_braces_in_strings_and_waits_for_the_outer_close() -> None:
    end = JsonObjectEnd()
    pieces = ['Sure: ```json\n{"summary": "a {curly', '} \\"quote\\" }"', ', "x": {"y": 1}', "}", "\n```"]
    closed_at = [end.feed(p) for p in pieces]
    assert closed_at == [False, False, False, True, True]
    text = "".join(pieces)
    assert text[: end.end].endswith('{"y": 1}}')
    assert parse_answer(text)[0] == {"summary": 'a {curly} "quote" }', "condition_met": None, "action": None,
                                     "confidence": None}  # fmt: skip
    assert parse_answer('{"summary": 3}')[1] == "summary: Input should be a valid string"
    assert parse_answer("I cannot see anything")[1] == "no JSON object in the answer"


def test_the_contract_stop_ends_decoding_when_the_json_closes(
    smoke_backend: TransformersBackend, samples: Path
) -> None:
    [frame] = clip_frames(samples, [100])
    images, text = [frame.rgb()], request_text(MllmRequest("cam", 0, 0, 0, "cam-1", "Anyone running?"))
    smoke_backend.contract_stop = True
    stopped = smoke_backend.generate(images, text, max_new_tokens=200)
    smoke_backend.contract_stop = False
    try:
        full = smoke_backend.generate(images, text, max_new_tokens=200)
    finally:
        smoke_backend.contract_stop = True
    assert (stopped.stop, stopped.text) == ("contract", SMOKE_ANSWER)
    assert full.stop == "eos" and full.text.startswith(SMOKE_ANSWER) and len(full.text) > len(SMOKE_ANSWER) + 20
    assert len(stopped.token_ids) < len(full.token_ids), "the tokens after the closing brace are never decoded"
    assert stopped.visual_tokens > 0 and stopped.encode_s > 0 and stopped.prefill_s > 0


async def test_a_replay_of_a_real_clip_answers_each_episode_and_publishes_it(
    samples: Path, smoke_model: Path, free_port: int, tmp_path: Path
) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    subscriber = Subscriber(free_port)
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        config = parse_config({
            "sources": [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}],
            "graph": LOSSLESS_CHANNELS,
            "mllm": {"model": str(smoke_model), "reuse_threshold": 0, "flow": "block"},
            "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")},
                      "mqtt": {"port": free_port, "outbox": str(tmp_path / "outbox.sqlite")}},
        })  # fmt: skip
        pipeline = build_pipeline(config, speed=None)
        await pipeline.graph.run()
        await wait_until(lambda: len(subscriber.payloads("/walkway/answers")) >= 5, 10, "the answers")
    finally:
        await subscriber.close()
        broker.kill()
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    calls = [(r["event_id"], r["seq"]) for r in records if r["kind"] == "Event" and r["call_model"]]
    answers = [r for r in records if r["kind"] == "MllmAnswer"]
    assert len({event_id for event_id, _ in calls}) == 3, "still_motion.mkv has three episodes, each with a call"
    assert sorted((a["event_id"], a["seq"]) for a in answers) == sorted(calls), "one answer per call, tied to it"
    assert {a["status"] for a in answers} == {"ok"} and all("not meaningful" in a["smoke"] for a in answers)
    assert answers[0]["answer"]["summary"] == "smoke test" and answers[0]["stop"] == "contract"
    assert answers[0]["tokens"]["visual"] > 0 and answers[0]["timings"]["prefill"] > 0
    published = subscriber.payloads("/walkway/answers")
    assert sorted((a["event_id"], a["seq"]) for a in published) == sorted(calls)


async def test_a_failing_or_hanging_backend_is_reported_and_perception_keeps_running(
    samples: Path, tmp_path: Path
) -> None:
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}],
        "graph": LOSSLESS_CHANNELS,
        "trigger": {"update_interval_s": 1, "cooldown_s": 0, "max_calls_per_min": 600},
        "mllm": {"reuse_threshold": 0, "flow": "block"},
        "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}},
    })  # fmt: skip
    for behaviour, status in (("raise", "error"), ("hang", "timeout")):
        pipeline = build_pipeline(config, speed=None)
        assert pipeline.mllm is not None
        pipeline.mllm.backend = ScriptedBackend(behaviour)
        pipeline.mllm.timeout_s = 0.5
        (tmp_path / "events.jsonl").unlink(missing_ok=True)
        await asyncio.wait_for(pipeline.graph.run(), 60)
        stats = pipeline.graph.statistics()["nodes"]
        assert stats["walkway"]["frames"] == 890, "every frame was processed while the backend misbehaved"
        records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        answers = [r for r in records if r["kind"] == "MllmAnswer"]
        assert answers and answers[0]["status"] == status
        if behaviour == "raise":
            assert {a["status"] for a in answers} == {"error"} and "CUDA out of memory" in answers[0]["error"]
        else:  # only the first call hangs: the next ones are answered
            assert "ok" in {a["status"] for a in answers[1:]} and "within 0.5 s" in answers[0]["error"]


async def test_flow_limiting_keeps_one_in_flight_and_the_newest_waiting(samples: Path) -> None:
    frames = clip_frames(samples, [0, 100, 200, 300, 400])
    backend = ScriptedBackend(delay_s=0.3)
    events = [event_for(f, i) for i, f in enumerate(frames)]
    answers = await run_stage(MllmStage("mllm", backend, MllmConfig(reuse_threshold=0)), list(events), gap_s=0.02)
    by_id = {a.event_id: a.status for a in answers}
    assert by_id == {"cam-0": "ok", "cam-1": "dropped", "cam-2": "dropped", "cam-3": "dropped", "cam-4": "ok"}
    assert backend.calls == ["cam-0", "cam-4"]


async def test_answer_reuse_skips_an_unchanged_scene_and_not_a_changed_one(samples: Path) -> None:
    # vtest.avi: frames 100 and 101 are 0.1 s apart (people barely moved); 600 is a minute later.
    same, next_frame, later = clip_frames(samples, [100, 101, 600])
    backend = ScriptedBackend()
    events = [event_for(same, 1), event_for(next_frame, 2), event_for(later, 3), event_for(later, 4, question="Who?")]
    answers = await run_stage(MllmStage("mllm", backend), list(events), gap_s=0.05)
    assert [(a.event_id, a.status) for a in answers] == [
        ("cam-1", "ok"), ("cam-2", "reused"), ("cam-3", "ok"), ("cam-4", "ok"),
    ], "an unchanged scene reuses the answer; a changed scene or another question calls the model"  # fmt: skip
    assert backend.calls == ["cam-1", "cam-3", "cam-4"]
    assert answers[1].answer == answers[0].answer


def test_missing_weights_is_one_clear_line(tmp_path: Path) -> None:
    for ref, expected in [
        ("acme-research/vision-7b-does-not-exist", "cannot load model 'acme-research/vision-7b-does-not-exist'"),
        (str(tmp_path / "models" / "mine"), "does not exist"),
        (str(tmp_path), "is not a model directory (no config.json)"),
    ]:
        with pytest.raises(MissingWeights) as err:
            TransformersBackend(ref).load()
        message = str(err.value)
        assert expected in message and "\n" not in message, message
    with pytest.raises(MissingWeights, match="`hf download a/b`"):
        TransformersBackend("a/b").load()


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "llava"])
async def test_every_supported_family_answers_through_the_same_path(family: str, samples: Path) -> None:
    backend = TransformersBackend(str(build_smoke_model(family=family)))
    frames = clip_frames(samples, [50])
    request = MllmRequest("cam", 0, 0, 0, "cam-1", "What is happening?", (frames[0].rgb(),), "event at 5 s")
    streamed: list[str] = []
    answer = await backend.answer(request, on_text=streamed.append)
    await asyncio.sleep(0)  # streamed pieces are delivered through the event loop
    assert (answer.status, answer.stop, answer.text) == ("ok", "contract", SMOKE_ANSWER), answer.error
    assert "".join(streamed) == SMOKE_ANSWER and answer.smoke
    assert answer.tokens["visual"] > 0 and list(itertools.accumulate(answer.timings.values()))


async def test_the_http_backend_talks_to_stream_rt_worker_over_loopback(
    samples: Path, smoke_model: Path, free_port: int
) -> None:
    """A real `stream-rt worker` process serving the smoke model; the OpenAI-compatible
    backend asks it about a real frame, streamed, and the contract stop works remotely."""
    from stream_rt.mllm.backends.openai_backend import OpenAIBackend

    proc = await start_worker(smoke_model, free_port)
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port}/v1", "smoke")
    try:
        [frame] = clip_frames(samples, [200])
        request = MllmRequest("cam", 0, 0, 0, "cam-9", "What is happening?", (frame.rgb(),), "event at 20 s")
        streamed: list[str] = []
        answer = await backend.answer(request, on_text=streamed.append)
        assert (answer.status, answer.text, answer.event_id) == ("ok", SMOKE_ANSWER, "cam-9"), answer.error
        assert answer.smoke and "".join(streamed) == SMOKE_ANSWER and answer.stop in ("contract", "eos")
        assert answer.tokens["generated"] > 0 and answer.timings["first_token"] > 0
        assert answer.tokens["prompt"] > 0, "the worker's prompt count reaches the daemon's answer"
        # [mllm] contract_stop = false reaches the HTTP backend: it reads the stream to its
        # end (here the worker's own contract stop ends it) instead of closing it itself.
        from stream_rt.config import MllmConfig
        from stream_rt.pipeline import build_backend

        url = f"http://127.0.0.1:{free_port}/v1"
        chatty = build_backend(MllmConfig(backend="openai", url=url, model="smoke", contract_stop=False))
        try:
            full = await chatty.answer(request)
        finally:
            await chatty.close()
        assert full.stop == "eos" and full.text == SMOKE_ANSWER
        remote_image = {"type": "image_url", "image_url": {"url": "http://192.0.2.1/cam.jpg"}}
        body = {"model": "smoke", "messages": [{"role": "user", "content": [remote_image]}]}
        url = f"http://127.0.0.1:{free_port}/v1/chat/completions"
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
            assert response.status == 400
            assert "only data: image URLs" in (await response.json())["error"]["message"]
    finally:
        await backend.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_the_layer_exit_never_changes_the_output_when_its_thresholds_are_zero(smoke_model: Path, samples: Path) -> None:
    [frame] = clip_frames(samples, [300])
    images, text = [frame.rgb()], request_text(MllmRequest("cam", 0, 0, 0, "cam-1", "Anyone there?"))
    full = TransformersBackend(str(smoke_model))
    reference = full.generate(images, text)
    for exit in (LayerExit(every=1, thresholds=[0.0, 0.0]), LayerExit(every=1, thresholds=None)):
        gen = TransformersBackend(str(smoke_model), techniques=Techniques(layer_exit=exit)).generate(images, text)
        assert gen.token_ids == reference.token_ids and gen.exit_depth == 4
        assert exit.depth_counts == {4: len(gen.token_ids) - 1}
    # Only the measuring run (thresholds None) logs the exits.
    assert len(exit.distances) == len(gen.token_ids) - 1 and all(len(d) == 2 for d in exit.distances)
    assert all(len(t) == 4 and t[-1] == token for t, token in zip(exit.tokens, gen.token_ids[1:], strict=True))
    # Calibrated on the logged distances for an average of 3 of the 4 layers, exits are taken.
    thresholds = calibrate(exit, 4, target_depth=3.0)
    early = LayerExit(every=1, thresholds=thresholds)
    gen = TransformersBackend(str(smoke_model), techniques=Techniques(layer_exit=early)).generate(images, text)
    assert gen.exit_depth is not None and gen.exit_depth < 4
    assert min(early.depth_counts) < 4 and set(early.depth_counts) <= {2, 3, 4} and not early.distances
    # An exit costs the output layer's work: where evaluating the exits would cost the logged
    # tokens more than the layers they skip, there are none, and none is evaluated.
    assert exit_cost(full.model) > 0
    assert calibrate(exit, 4, target_depth=3.0, cost=100.0) == []
    assert LayerExit(every=1, thresholds=[]).exit_layers(4) == [] and early.exit_layers(4) == [1, 2, 3]


def test_the_layer_exits_statistics_stay_bounded_however_long_it_decodes(smoke_model: Path, samples: Path) -> None:
    """A long-lived backend keeps one count per depth and, measuring, the last
    ``log_limit`` tokens' exits; each call's exit depth is still the mean over its own
    tokens, as a fresh exit per call reports it."""
    frames = [f.rgb() for f in clip_frames(samples, [100, 300, 500])]
    text = request_text(MllmRequest("cam", 0, 0, 0, "cam-1", "Anyone there?"))
    measuring = LayerExit(every=1, thresholds=None, log_limit=40)
    backend = TransformersBackend(
        str(smoke_model), contract_stop=False, max_new_tokens=80, techniques=Techniques(layer_exit=measuring)
    )
    for frame in frames:
        gen = backend.generate([frame], text)
        assert gen.stop == "max_tokens" and gen.exit_depth == 4
    steps = 3 * 79  # a decoding step per token after the first
    assert measuring.decoded == steps and measuring.depth_counts == {4: steps}
    assert len(measuring.distances) == len(measuring.tokens) == 40
    assert [t[-1] for t in measuring.tokens] == gen.token_ids[-40:], "the latest 40 tokens"
    thresholds = calibrate(measuring, 4, target_depth=3.0)
    early = LayerExit(every=1, thresholds=thresholds)
    backend.layer_exit = early
    depths, tokens = [], []
    for frame in frames:
        gen = backend.generate([frame], text)
        fresh = LayerExit(every=1, thresholds=thresholds)
        backend.layer_exit = fresh
        assert backend.generate([frame], text).exit_depth == gen.exit_depth == fresh.mean_depth
        backend.layer_exit = early
        depths.append(gen.exit_depth)
        tokens.append(fresh.decoded)
    assert len(early.depth_counts) <= 3 and not early.distances
    assert early.mean_depth == pytest.approx(np.average(depths, weights=tokens)) and early.mean_depth < 4


async def test_cancelling_a_call_stops_the_generation_thread(smoke_model: Path, samples: Path) -> None:
    """Without the contract stop the smoke model decodes 160 tokens; a call cancelled
    after its first pieces must stop there, not run on in its thread."""
    backend = TransformersBackend(str(smoke_model), contract_stop=False, max_new_tokens=1000)
    await backend.start()
    [frame] = clip_frames(samples, [10])
    streamed: list[str] = []
    request = MllmRequest("cam", 0, 0, 0, "cam-1", "What is happening?", (frame.rgb(),))

    def cancel_early(piece: str) -> None:
        streamed.append(piece)
        if len(streamed) == 5:
            call.cancel()

    call = asyncio.create_task(backend.answer(request, cancel_early))
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.to_thread(backend._lock.acquire, True, 10)  # the thread has returned
    backend._lock.release()
    await asyncio.sleep(0.1)
    assert 5 <= len(streamed) < 40, f"{len(streamed)} pieces: the generation ran on after the cancel"
