"""`stream-rt worker` as an OpenAI-compatible server, checked with the official `openai` client."""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import av
import openai
import pytest

from stream_rt.mllm.smoke import SMOKE_ANSWER, build_smoke_model
from stream_rt.mllm.transformers_backend import TransformersBackend
from stream_rt.operators.snapshot import rgb_to_jpeg
from stream_rt.testing import chat_server, start_worker

from .test_mllm import smoke_model  # noqa: F401  (the fixture)

KEY = "test-key-0123"


@pytest.fixture
async def worker(smoke_model: Path, free_port: int) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:  # noqa: F811
    """A real worker process serving the smoke model with an API key, and its base URL."""
    proc = await start_worker(smoke_model, free_port, "--api-key", KEY)
    try:
        yield f"http://127.0.0.1:{free_port}/v1", proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)


def jpeg_url(samples: Path) -> str:
    with av.open(str(samples / "vtest.avi")) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    return "data:image/jpeg;base64," + base64.b64encode(rgb_to_jpeg(rgb)).decode()


async def test_the_official_client_gets_what_openai_would_give(worker: tuple[str, object], samples: Path) -> None:
    url, _ = worker
    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
    models = (await client.models.list()).data
    assert [m.id for m in models] == ["smoke"] and models[0].owned_by and models[0].created > 0
    content = [
        {"type": "text", "text": "What is happening?"},
        {"type": "image_url", "image_url": {"url": jpeg_url(samples)}},
    ]
    messages = [{"role": "user", "content": content}]
    reply = await client.chat.completions.create(model="smoke", messages=messages)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == SMOKE_ANSWER and reply.usage and reply.usage.prompt_tokens > 0
    stream = await client.chat.completions.create(model="smoke", messages=messages, stream=True)  # type: ignore[arg-type]
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant", "the first delta names the role"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SMOKE_ANSWER
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    for unsupported in (
        {"n": 2},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
    ):
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="smoke", messages=messages, **unsupported)  # type: ignore[call-overload]
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for method, path, status in (("GET", "/nothing", 404), ("GET", "/chat/completions", 405)):
            async with http.request(method, url + path) as response:
                assert response.status == status and "message" in (await response.json())["error"]
    # Four at once: each answered (they take the model's thread in turn).
    replies = await asyncio.gather(*(client.chat.completions.create(model="smoke", messages=messages)  # type: ignore[arg-type]
                                     for _ in range(4)))  # fmt: skip
    assert [r.choices[0].message.content for r in replies] == [SMOKE_ANSWER] * 4
    await client.close()


async def test_a_client_that_leaves_mid_stream_is_one_log_line(worker: tuple[str, asyncio.subprocess.Process]) -> None:
    """Streamed or not, a client that hangs up ends its generation with one log line."""
    url, proc = worker
    body = {"model": "smoke", "messages": [{"role": "user", "content": "Describe the scene at length."}],
            "stream": True, "max_tokens": 100000}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(url + "/chat/completions", json=body) as r:
            await r.content.readline()  # the first chunk, then hang up
        with pytest.raises(asyncio.TimeoutError):  # not streamed: give up waiting for the whole answer
            await http.post(url + "/chat/completions", json={**body, "stream": False},
                            timeout=aiohttp.ClientTimeout(total=0.05))  # fmt: skip
    await asyncio.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    log = (await asyncio.wait_for(proc.stderr.read(), 10)).decode()
    assert await proc.wait() == 0
    assert log.count("went away") == 2 and "Traceback" not in log, log


def test_listening_beyond_loopback_needs_an_api_key(smoke_model: Path) -> None:  # noqa: F811
    result = subprocess.run([sys.executable, "-m", "stream_rt.cli", "worker", "--model", str(smoke_model),
                             "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 2 and "needs an API key" in result.stderr and len(result.stderr.splitlines()) == 1


async def test_a_server_that_refuses_continuous_usage_stats_is_asked_again_without(free_port: int) -> None:
    """A strict OpenAI-compatible server (as OpenAI's own API may be) answers 400 to an
    unknown stream option: the daemon's backend asks again without it, and keeps to that."""
    from aiohttp import web

    from stream_rt.graph.packets import MllmRequest
    from stream_rt.mllm.openai_backend import OpenAIBackend

    bodies: list[dict[str, object]] = []

    def reply(body: dict[str, object]) -> str | web.Response:
        bodies.append(body)
        if "continuous_usage_stats" in body["stream_options"]:  # type: ignore[operator]
            error = {"message": "Unrecognized request argument: stream_options.continuous_usage_stats"}
            return web.json_response({"error": error}, status=400)
        return SMOKE_ANSWER

    runner = await chat_server(free_port, reply)
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port}/v1", "strict")
    try:
        for n in range(2):
            answer = await backend.answer(MllmRequest("cam", n, 0, 0, f"cam-{n}", "Anyone there?"))
            assert answer.status == "ok", answer.error
    finally:
        await backend.close()
        await runner.cleanup()
    assert ["continuous_usage_stats" in b["stream_options"] for b in bodies] == [True, False, False]  # type: ignore[operator]


@pytest.fixture(scope="module", params=["qwen2_vl", "idefics3"])
def unfitted_backend(request: pytest.FixtureRequest) -> TransformersBackend:
    """The tiny smoke model with seeded noise on every weight: it no longer says one fixed
    answer, so its tokens follow the prompt, the image and any slip in the batch's padding."""
    import torch

    backend = TransformersBackend(str(build_smoke_model(family=request.param)))
    backend.load()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in backend.model.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std().nan_to_num(0.02))
    return backend


async def test_requests_decoded_together_get_the_answers_each_gets_alone(
    unfitted_backend: TransformersBackend, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching: requests that join a batch under way (at other steps, with other
    prompt lengths and token limits) and one whose client leaves get what each gets alone.
    (No end of sequence, so each runs to its limit and the one leaving is still decoding.)"""
    import threading

    from stream_rt.mllm.batching import ContinuousBatch

    monkeypatch.setattr(type(unfitted_backend.family), "eos_ids", property(lambda self: set()))
    with av.open(str(samples / "vtest.avi")) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(60), container.decode(video=0), strict=False)]
    questions = ["What is happening?", "Describe the scene in a few words.", "Is anyone there?"]
    jobs = [([frames[i * 11]] if i % 4 else [], questions[i % 3], 96 if i % 2 else 24) for i in range(5)]
    jobs.append(([frames[55]], questions[2], 400))
    alone = [unfitted_backend.generate(images, text, max_new_tokens=limit) for images, text, limit in jobs]
    assert len({tuple(g.token_ids) for g in alone}) > 2, "the answers differ, so a mixed-up row would show"
    batch = ContinuousBatch(unfitted_backend, max_batch=4)
    leaving = threading.Event()

    async def one(k: int, images: list[object], text: str, limit: int) -> object:
        await asyncio.sleep(0.03 * k)  # later ones join a batch under way
        cancel = leaving if k == 5 else threading.Event()
        return await batch.generate(images, text, cancel, None, limit)  # type: ignore[arg-type]

    async def leave_soon() -> None:
        await asyncio.sleep(0.3)
        leaving.set()

    together = await asyncio.gather(*(one(k, *job) for k, job in enumerate(jobs)), leave_soon())
    for k, (gen, own) in enumerate(zip(together[:5], alone[:5], strict=True)):
        assert gen.token_ids == own.token_ids and gen.stop == own.stop, k  # type: ignore[attr-defined]
    left = together[5]
    assert left.stop == "cancelled" and 0 < len(left.token_ids) < 400  # type: ignore[attr-defined]
    assert left.token_ids == alone[5].token_ids[: len(left.token_ids)]  # type: ignore[attr-defined]
    assert batch.largest == 4, "four decoded in one step"


async def test_concurrent_streams_progress_together(worker: tuple[str, object], samples: Path) -> None:
    """With continuous batching each of four streamed answers starts before any finishes
    (served one at a time, the fourth would start after the third ended)."""
    url, _ = worker
    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
    content = [
        {"type": "text", "text": "What is happening?"},
        {"type": "image_url", "image_url": {"url": jpeg_url(samples)}},
    ]
    messages = [{"role": "user", "content": content}]
    loop = asyncio.get_running_loop()

    async def streamed() -> tuple[float, float, str]:
        stream = await client.chat.completions.create(model="smoke", messages=messages, stream=True, max_tokens=48)  # type: ignore[call-overload]
        first, text = 0.0, ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or loop.time()
                text += chunk.choices[0].delta.content
        return first, loop.time(), text

    runs = await asyncio.gather(*(streamed() for _ in range(4)))
    assert max(first for first, _, _ in runs) < min(last for _, last, _ in runs), runs
    assert len({text for _, _, text in runs}) == 1 and runs[0][2].startswith(SMOKE_ANSWER[:10])
    await client.close()


async def test_the_batch_leaves_no_request_unanswered_and_prefills_none_abandoned(
    unfitted_backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault while a request joins the batch answers it with the error and the others
    as usual; requests whose clients left before their turn cost no prefill; stopping ends
    a long generation at its next step."""
    import threading

    from stream_rt.mllm.batching import ContinuousBatch

    # Generations run to their token limit: no end of sequence, no contract stop.
    monkeypatch.setattr(type(unfitted_backend.family), "eos_ids", property(lambda self: set()))
    monkeypatch.setattr(unfitted_backend, "contract_stop", False)
    batch = ContinuousBatch(unfitted_backend, max_batch=1)
    prefills: list[str] = []
    prefill, joined = batch._prefill, batch._joined
    batch._prefill = lambda job: (prefills.append(job.text), prefill(job))[1]  # type: ignore[method-assign]

    def join_fails_once(*args: object) -> object:
        batch._joined = joined  # type: ignore[method-assign]
        raise RuntimeError("out of memory")

    batch._joined = join_fails_once  # type: ignore[method-assign,assignment]
    asks = [batch.generate([], f"question {n}", threading.Event(), None, 8) for n in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 60)
    assert isinstance(results[0], RuntimeError) and all(r.stop == "max_tokens" for r in results[1:])  # type: ignore[union-attr]

    prefills.clear()
    long = asyncio.ensure_future(batch.generate([], "long", threading.Event(), None, 100000))
    gone = [threading.Event() for _ in range(3)]
    left = [asyncio.ensure_future(batch.generate([], f"gone {n}", g, None, 8)) for n, g in enumerate(gone)]
    await asyncio.sleep(0.2)
    for g in gone:
        g.set()  # their clients hang up while they wait for a place
    await asyncio.sleep(0.3)
    batch.cancel_all()
    ended = await asyncio.wait_for(long, 10)
    assert ended.stop == "cancelled" and 0 < len(ended.token_ids) < 100000
    assert [(await f).stop for f in left] == ["cancelled"] * 3 and prefills == ["long"]
