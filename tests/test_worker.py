"""`stream-rt worker` as an OpenAI-compatible server, checked with the official `openai` client."""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import av
import openai
import pytest

from stream_rt.media.images import rgb_to_jpeg
from stream_rt.mllm.backends.decoding import Sampling
from stream_rt.mllm.backends.openai_backend import SMOKE_FINGERPRINT, SMOKE_HEADER
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.smoke import SMOKE_ANSWER, build_smoke_model
from stream_rt.testing import chat_server, start_worker

from .test_mllm import smoke_backend, smoke_model  # noqa: F401  (the fixtures)

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
    content = [  # the image first, as the daemon sends it (the smoke model was fitted to that order)
        {"type": "image_url", "image_url": {"url": jpeg_url(samples)}},
        {"type": "text", "text": "What is happening?"},
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
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="smoke", messages=messages, **unsupported)  # type: ignore[call-overload]
        assert bad.value.param == next(iter(unsupported))
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    # Refused with 400 naming the field, rather than ignored.
    for refused, param in (
        ({"top_logprobs": 2}, "top_logprobs"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"temperature": 3}, "temperature"), ({"logit_bias": {"999999": 5}}, "logit_bias"), ({"store": True}, "store"),
        ({"extra_body": {"top_k": 5}}, "top_k"), ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0].type"),
    ):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(**{"model": "smoke", "messages": messages, **refused})  # type: ignore[call-overload]
        assert bad.value.param == param, (refused, bad.value.body)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for method, path, status in (("GET", "/nothing", 404), ("GET", "/chat/completions", 405)):
            async with http.request(method, url + path) as response:
                assert response.status == status and "message" in (await response.json())["error"]
    # Four at once: each answered (they take the model's thread in turn).
    replies = await asyncio.gather(*(client.chat.completions.create(model="smoke", messages=messages)  # type: ignore[arg-type]
                                     for _ in range(4)))  # fmt: skip
    assert [r.choices[0].message.content for r in replies] == [SMOKE_ANSWER] * 4
    await stop_strings_and_logprobs(client, messages)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        body = {"model": "smoke", "messages": messages, "max_tokens": 4}
        async with http.post(url + "/chat/completions", json=body) as response:
            raw = await response.json()
            assert "smoke" not in raw, "nothing but OpenAI's fields at the top"
            assert raw["system_fingerprint"] == SMOKE_FINGERPRINT and SMOKE_HEADER in response.headers
        async with http.get(url.removesuffix("/v1") + "/health") as response:
            assert response.status == 200 and (await response.json())["scheduler"] == "continuous batching"
    await client.close()


async def stop_strings_and_logprobs(client: openai.AsyncOpenAI, messages: list[dict[str, object]]) -> None:
    """The smoke model's fixed answer, cut by stop strings (streamed, no piece of a stop
    string ever reaches the client) and with the log-probabilities of its tokens."""
    cut = SMOKE_ANSWER[: SMOKE_ANSWER.index("smoke test")]
    reply = await client.chat.completions.create(model="smoke", messages=messages, stop=["zebra", "smoke test"])  # type: ignore[arg-type]
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    stream = await client.chat.completions.create(model="smoke", messages=messages, stop="smoke test", stream=True)  # type: ignore[call-overload]
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut, "held back until it was not a stop string"
    assert chunks[-1].choices[0].finish_reason == "stop"
    reply = await client.chat.completions.create(model="smoke", messages=messages, logprobs=True, top_logprobs=3)  # type: ignore[arg-type]
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
    tokens = reply.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == reply.choices[0].message.content == SMOKE_ANSWER
    for token in tokens:  # greedy: the chosen token is the most likely one
        assert len(token.top_logprobs) == 3 and token.logprob == max(t.logprob for t in token.top_logprobs) <= 0
    stream = await client.chat.completions.create(model="smoke", messages=messages, logprobs=True, stream=True)  # type: ignore[call-overload]
    streamed = [t async for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for t in chunk.choices[0].logprobs.content or []]  # fmt: skip
    assert [t.token for t in streamed] == [t.token for t in tokens]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in tokens], abs=1e-5)


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
    from stream_rt.mllm.backends.openai_backend import OpenAIBackend

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
    prompt lengths and token limits, greedy or sampled with a seed, one with the
    log-probabilities of its tokens) and one whose client leaves get what each gets alone.
    (No end of sequence, so each runs to its limit and the one leaving is still decoding.)"""
    import threading

    from stream_rt.mllm.backends.batching import ContinuousBatch

    monkeypatch.setattr(type(unfitted_backend.family), "eos_ids", property(lambda self: set()))
    with av.open(str(samples / "vtest.avi")) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(60), container.decode(video=0), strict=False)]
    questions = ["What is happening?", "Describe the scene in a few words.", "Is anyone there?"]
    sampled = [
        None,
        Sampling(temperature=0.8, seed=3),
        Sampling(logprobs=2),
        Sampling(temperature=1.2, top_p=0.9, seed=4),
    ]
    jobs = [
        ([frames[i * 11]] if i % 4 else [], questions[i % 3], 96 if i % 2 else 24, sampled[i % 4]) for i in range(5)
    ]
    jobs.append(([frames[55]], questions[2], 400, None))
    alone = [unfitted_backend.generate(images, text, max_new_tokens=limit, sampling=how)
             for images, text, limit, how in jobs]  # fmt: skip
    assert len({tuple(g.token_ids) for g in alone}) > 2, "the answers differ, so a mixed-up row would show"
    greedy = unfitted_backend.generate(jobs[1][0], jobs[1][1], max_new_tokens=jobs[1][2])
    assert greedy.token_ids != alone[1].token_ids, "sampled, not greedy (over its 96 tokens)"
    batch = ContinuousBatch(unfitted_backend, max_batch=4)
    leaving = threading.Event()

    pieces = 0

    def leave_after_a_few(piece: str) -> None:  # the last one leaves mid-answer, however busy the machine
        nonlocal pieces
        pieces += 1
        if pieces == 3:
            leaving.set()

    async def one(k: int, images: list[object], text: str, limit: int, sampling: Sampling | None) -> object:
        await asyncio.sleep(0.03 * k)  # later ones join a batch under way
        cancel, on_text = (leaving, leave_after_a_few) if k == 5 else (threading.Event(), None)
        return await batch.generate(images, text, cancel, on_text, limit, sampling=sampling)  # type: ignore[arg-type]

    together = await asyncio.gather(*(one(k, *job) for k, job in enumerate(jobs)))
    for k, (gen, own) in enumerate(zip(together[:5], alone[:5], strict=True)):
        assert gen.token_ids == own.token_ids and gen.stop == own.stop, k  # type: ignore[attr-defined]
    logprobs, own_logprobs = together[2].logprobs, alone[2].logprobs  # type: ignore[attr-defined]
    assert logprobs and own_logprobs and [e.token for e in logprobs] == [e.token for e in own_logprobs]
    assert [e.logprob for e in logprobs] == pytest.approx([e.logprob for e in own_logprobs], abs=1e-4)
    left = together[5]
    assert left.stop == "cancelled" and 0 < len(left.token_ids) < 400  # type: ignore[attr-defined]
    assert left.token_ids == alone[5].token_ids[: len(left.token_ids)]  # type: ignore[attr-defined]
    assert batch.largest == 4, "four decoded in one step"


async def test_concurrent_streams_progress_together(worker: tuple[str, object], samples: Path) -> None:
    """With continuous batching each of four streamed answers starts before any finishes
    (served one at a time, the fourth would start after the third ended)."""
    url, _ = worker
    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
    content = [  # the image first, as the daemon sends it (the smoke model was fitted to that order)
        {"type": "image_url", "image_url": {"url": jpeg_url(samples)}},
        {"type": "text", "text": "What is happening?"},
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

    from stream_rt.mllm.backends.batching import ContinuousBatch

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


@pytest.fixture(scope="module")
def generic_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real worker serving a tiny InternVL model (no family adapter: the generic path,
    one generation at a time), at most one more waiting; its base URL and log file. Its
    random weights spread the probability over many tokens, so sampling shows."""
    from stream_rt.testing import free_port, tiny_model

    port = free_port()
    log = tmp_path_factory.mktemp("generic_worker") / "stderr.log"
    with log.open("wb") as stderr:
        command = [
            "worker",
            "--model",
            str(tiny_model("internvl")),
            "--listen",
            f"127.0.0.1:{port}",
            "--max-waiting",
            "1",
        ]
        proc = subprocess.Popen([sys.executable, "-m", "stream_rt.cli", *command], stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while "serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


async def test_a_model_without_an_adapter_samples_stops_and_tells_logprobs(generic_worker: tuple[str, Path]) -> None:
    """The generic path (transformers' generate) honours what the adapters' path does:
    greedy by default with the raw log-probabilities of its tokens, sampling with a seed
    (the same seed, the same answer), stop strings (streamed or not), a system turn."""
    url, _ = generic_worker
    client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0)
    messages = [{"role": "user", "content": "Describe the scene."}]

    async def ask(**options: object) -> openai.types.chat.ChatCompletion:
        return await client.chat.completions.create(model="smoke", messages=messages, max_tokens=24, **options)  # type: ignore[call-overload,no-any-return]

    greedy = await ask(logprobs=True, top_logprobs=4)
    tokens = greedy.choices[0].logprobs.content  # type: ignore[union-attr]
    assert tokens is not None and len(tokens) == greedy.usage.completion_tokens == 24  # type: ignore[union-attr]
    for token in tokens:  # bytes: what the token stands for, even part of a character (its text then shows U+FFFD)
        assert token.logprob == max(t.logprob for t in token.top_logprobs) and token.bytes
        assert "\ufffd" in token.token or token.bytes == list(token.token.encode())
    assert greedy.choices[0].finish_reason == "length" and greedy.system_fingerprint == SMOKE_FINGERPRINT
    sampled = [(await ask(temperature=1.0, seed=seed)).choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != greedy.choices[0].message.content and sampled[0] != sampled[2], sampled
    # A stop string from the seeded answer: the same answer, ending before it.
    text = str(sampled[0])
    stop = next(
        text[i : i + 2] for i in range(4, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].strip()
    )
    cut = await ask(temperature=1.0, seed=7, stop=[stop])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (text[: text.index(stop)], "stop")
    stream = await ask(temperature=1.0, seed=7, stop=stop, stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]  # type: ignore[attr-defined]
    assert "".join(pieces) == text[: text.index(stop)]
    # The penalties and a logit bias change what greedy decoding picks.
    from transformers import AutoTokenizer

    from stream_rt.testing import tiny_model

    newline = AutoTokenizer.from_pretrained(str(tiny_model("internvl"))).convert_tokens_to_ids(
        "\u010a"
    )  # byte-level "\n"
    assert "\n" in str(greedy.choices[0].message.content)
    assert "\n" not in str((await ask(logit_bias={str(newline): -100})).choices[0].message.content)
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert (await ask(**penalty)).choices[0].message.content != greedy.choices[0].message.content, penalty
    with_system = await client.chat.completions.create(
        model="smoke", max_tokens=1, messages=[{"role": "system", "content": "Answer in JSON."}, *messages],  # type: ignore[list-item]
    )  # fmt: skip
    assert with_system.usage.prompt_tokens > greedy.usage.prompt_tokens  # type: ignore[union-attr]
    await client.close()


async def test_a_model_without_an_adapter_streams_bounds_waiting_and_lets_clients_leave(
    generic_worker: tuple[str, Path],
) -> None:
    """One generation at a time, one more waiting, a third answered 429; clients that
    hang up (the one decoding, the one waiting) end their generations, and the next
    request is answered."""
    url, log = generic_worker
    client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0)
    body = {"model": "smoke", "messages": [{"role": "user", "content": "Go on."}], "stream": True, "max_tokens": 100000}
    async with aiohttp.ClientSession() as http:
        long = [await http.post(url + "/chat/completions", json=body) for _ in range(2)]
        assert [r.status for r in long] == [200, 200]
        await long[0].content.readline()  # the first one is decoding
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="smoke", messages=body["messages"], max_tokens=2)  # type: ignore[call-overload]
        for response in long:
            response.close()  # hang up
        async with http.get(url.removesuffix("/v1") + "/health") as health:
            assert health.status == 200 and (await health.json())["scheduler"] == "one at a time"
    reply = await asyncio.wait_for(client.chat.completions.create(model="smoke", messages=body["messages"],  # type: ignore[call-overload]
                                                                  max_tokens=2), 30)  # fmt: skip
    assert reply.usage.completion_tokens == 2
    assert log.read_text().count("went away") == 2, log.read_text()
    await client.close()


async def test_health_says_when_the_model_cannot_answer(smoke_backend: TransformersBackend, free_port: int) -> None:  # noqa: F811
    """/health (vLLM's route) and /healthz: 200 while the model gets on; 503 with the reason
    while its thread is held without getting on (a step that hangs), and requests are
    answered 503 at once meanwhile rather than waiting behind it."""
    from stream_rt.mllm.worker import Worker

    worker = Worker(smoke_backend, port=free_port, stuck_s=0.3)
    await worker.start()
    base = f"http://127.0.0.1:{worker.port}"
    body = {"model": "smoke", "messages": [{"role": "user", "content": "Anyone there?"}], "max_tokens": 2}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/health") as response:
                assert response.status == 200 and (await response.json())["model"] == "smoke"
            hung = asyncio.ensure_future(smoke_backend.in_model_thread(time.sleep, 1.5))  # a step that hangs
            await asyncio.sleep(0.6)
            async with http.get(base + "/health") as response:
                assert response.status == 503 and "not got on" in (await response.json())["reason"]
            async with http.get(base + "/healthz") as response:
                assert response.status == 503
            async with http.post(base + "/v1/chat/completions", json=body) as response:
                assert response.status == 503 and "not got on" in (await response.json())["error"]["message"]
            await hung
            async with (
                http.get(base + "/healthz") as response,
                http.post(base + "/v1/chat/completions", json=body) as r,
            ):
                assert (response.status, await response.text(), r.status) == (200, "ok\n", 200)
    finally:
        await worker.stop()
    assert worker.problem() == "the worker is stopping"


async def test_a_model_that_cannot_be_served_is_one_line(tmp_path: Path) -> None:
    """`stream-rt worker --model` with a model transformers does not load as a
    vision-language model, a directory that is not there, or damaged weights: one line on
    stderr, exit code 2, no traceback."""
    import shutil

    from stream_rt.testing import tiny_model

    text_only = tmp_path / "bert"
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "bert"}')
    (text_only / "model.safetensors").write_bytes(b"")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model("internvl"), damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:3000])

    async def serve(model: Path) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stream_rt.cli", "worker", "--model", str(model), "--listen", "127.0.0.1:0",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 90)
        return await proc.wait(), stderr.decode()

    results = await asyncio.gather(*(serve(m) for m in (text_only, tmp_path / "missing", damaged)))
    for (code, stderr), says in zip(
        results, ("image-text-to-text", "does not exist", "damaged weights in"), strict=True
    ):
        assert code == 2 and len(stderr.splitlines()) == 1 and says in stderr, stderr
