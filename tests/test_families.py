"""The vision-language families people run today go through the daemon and the worker.

A tiny random-weight model of each family (written by the public helper
:func:`stream_rt.testing.tiny_model`: config, weights, tokenizer, processor settings and
chat template, built here, nothing downloaded) answers every model call of a replay of a
real clip — several frames per call, with the memory — and serves the official ``openai``
client through a real ``stream-rt worker``. Random weights say random things: an answer
is ``ok`` or ``invalid``, never an error, and is labelled as not meaningful.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import signal
from pathlib import Path

import av
import openai
import pytest

from stream_rt.config import LOSSLESS_CHANNELS, parse_config
from stream_rt.media.images import rgb_to_jpeg
from stream_rt.mllm.tiny_recipes import RECIPES
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import TINY_MODEL_TYPES, free_port, start_worker, tiny_model


def test_the_helper_writes_every_family_it_names_and_never_into_a_folder_in_use(tmp_path: Path) -> None:
    assert set(TINY_MODEL_TYPES) == set(RECIPES)
    assert len(TINY_MODEL_TYPES) >= 10
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not a model stream_rt built"):
        tiny_model("qwen3_vl", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine", "nothing of the user's is deleted"


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
async def test_a_replay_of_a_real_clip_answers_every_call(model_type: str, samples: Path, tmp_path: Path) -> None:
    model = tiny_model(model_type)
    out = tmp_path / "events.jsonl"
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}],
        "graph": LOSSLESS_CHANNELS,
        "trigger": {"update_interval_s": 4},
        "mllm": {"model": str(model), "reuse_threshold": 0, "flow": "block", "max_new_tokens": 16,
                 "clip": {"frames": 3, "interval_s": 0.5, "compression": "off"}, "memory": {"enabled": True}},
        "sinks": {"jsonl": {"path": str(out)}},
    })  # fmt: skip
    await build_pipeline(config, speed=None).graph.run()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    calls = sorted((r["event_id"], r["seq"]) for r in records if r["kind"] == "Event" and r["call_model"])
    answers = [r for r in records if r["kind"] == "MllmAnswer"]
    assert len({event_id for event_id, _ in calls}) == 3, "still_motion.mkv has three episodes, each with calls"
    assert sorted((a["event_id"], a["seq"]) for a in answers) == calls, "one answer per call, tied to it"
    for a in answers:
        assert a["status"] in ("ok", "invalid"), a["error"]
        assert "not meaningful" in a["smoke"], "random weights are labelled as such"
        tokens, timings = a["tokens"], a["timings"]
        assert 0 < tokens["visual"] < tokens["prompt"] and 0 < tokens["generated"] <= 16, tokens
        assert timings["prefill"] > 0 and timings["decode"] >= 0, timings
    # Every call is shown its 3-frame clip, 0.5 s apart and ending at its event, however far the
    # video ran ahead of the events: the same frames, so the same visual tokens, in every call.
    for a in answers:
        shown = a["frame_pts_ns"]
        assert len(shown) == 3 and shown[-1] == a["pts_ns"], shown
        assert all(later - earlier >= 500_000_000 for earlier, later in itertools.pairwise(shown)), shown
    assert len({a["tokens"]["visual"] for a in answers}) == 1, [a["tokens"] for a in answers]
    # The memory of earlier episodes reaches later calls: as a K/V prefix with an adapter, as text without.
    last = answers[-1]["tokens"]
    first = answers[0]["tokens"]
    assert last.get("memory", 0) > 0 or last["prompt"] - last["visual"] > first["prompt"] - first["visual"], (
        first, last,
    )  # fmt: skip


def jpeg_url(samples: Path) -> str:
    with av.open(str(samples / "vtest.avi")) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    return "data:image/jpeg;base64," + base64.b64encode(rgb_to_jpeg(rgb)).decode()


async def test_the_worker_serves_every_family_to_the_official_client(samples: Path) -> None:
    """One ``stream-rt worker`` per family, started a few at a time; each answers a
    streamed and an unstreamed request with an image."""
    image = jpeg_url(samples)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is happening?"},
    ]}]  # fmt: skip

    async def serve(model_type: str) -> tuple[str, str, int, str]:
        port = free_port()
        proc = await start_worker(tiny_model(model_type), port, "--max-new-tokens", "8")
        try:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
            served = (await client.models.list()).data[0].id
            reply = await client.chat.completions.create(model=served, messages=messages)  # type: ignore[arg-type]
            stream = await client.chat.completions.create(model=served, messages=messages, stream=True,  # type: ignore[arg-type]
                                                          stream_options={"include_usage": True})  # fmt: skip
            chunks = [chunk async for chunk in stream]
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert reply.usage is not None and chunks[-1].usage is not None
            assert reply.usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0
            assert 0 < reply.usage.completion_tokens <= 8
            return model_type, str(reply.choices[0].message.content), reply.usage.completion_tokens, streamed
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)

    results = []
    for start in range(0, len(TINY_MODEL_TYPES), 3):  # a few processes at a time: each loads torch
        results += await asyncio.gather(*(serve(t) for t in TINY_MODEL_TYPES[start : start + 3]))
    for model_type, text, _, streamed in results:
        assert streamed == text, f"{model_type}: greedy decoding streams what it answers"
