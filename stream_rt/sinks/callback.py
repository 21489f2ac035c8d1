"""Hand every packet to a Python callable (plain or async): the sink for embedding
stream_rt in a program's own loop, and for tests and benchmarks."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, cast

from stream_rt.graph.node import Context, Sink
from stream_rt.graph.packets import Packet

P = TypeVar("P", bound=Packet)


class CallbackSink(Sink, Generic[P]):
    """Calls ``callback(packet)`` for every data packet that reaches its ``in`` port, in
    arrival order, on the event loop: a plain function must return quickly (hand slow work
    to a thread), an ``async`` one is awaited before the next packet. With ``control``,
    control packets (:class:`~stream_rt.graph.packets.SourceStatus`,
    :class:`~stream_rt.graph.packets.EndOfStream`...) are passed too. An exception the
    callback raises is the node's error (its :class:`~stream_rt.graph.node.Supervision`
    decides). ``received`` counts the data packets handed over.

    Typed by what the callback takes, so a type checker sees the packets it will get::

        def on_answer(answer: MllmAnswer) -> None: ...
        graph.add(CallbackSink("act", on_answer))  # a CallbackSink[MllmAnswer]

    The graph does not check that the connected edge carries only that type: connect it
    to a port that emits it (``mllm.answers`` emits :class:`MllmAnswer`)."""

    inputs = {"in": (Packet,)}

    def __init__(
        self,
        name: str,
        callback: Callable[[P], Awaitable[None] | None],
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
        result = self.callback(cast(P, packet))
        if self._is_async:
            await cast(Awaitable[None], result)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if self.control:
            result = self.callback(cast(P, packet))
            if inspect.isawaitable(result):
                await result
