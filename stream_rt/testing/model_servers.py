"""Model servers for tests of clients: a real ``stream-rt worker`` process, and a minimal
OpenAI-compatible chat server whose replies the test writes."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web


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
