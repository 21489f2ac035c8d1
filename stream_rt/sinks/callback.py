"""Hand every packet to a Python callable (plain or async): the sink for embedding
stream_rt in a program's own loop, and for tests and benchmarks."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from stream_rt.graph.node import Context, Sink
from stream_rt.graph.packets import Packet


class CallbackSink(Sink):
    inputs = {"in": (Packet,)}

    def __init__(
        self,
        name: str,
        callback: Callable[[Packet], Awaitable[None] | None],
        *,
        control: bool = False,
    ) -> None:
        super().__init__(name)
        self.callback = callback
        self.control = control
        self.received = 0
        self._is_async = inspect.iscoroutinefunction(callback)

    async def process(self, packet: Packet, ctx: Context) -> None:
        self.received += 1
        result = self.callback(packet)
        if self._is_async:
            await result  # type: ignore[misc]

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if self.control:
            result = self.callback(packet)
            if inspect.isawaitable(result):
                await result
