"""Sources that connect to something report ``online`` / ``offline`` the same way."""

from __future__ import annotations

from typing import Literal

from stream_rt.graph.node import Context, Source
from stream_rt.graph.packets import SourceStatus

State = Literal["connecting", "online", "offline"]


class StatusSource(Source):
    """A source with a ``status`` output port and a ``state`` (``connecting`` until the
    first connection succeeds or fails). Each change of state is emitted once, as a
    :class:`SourceStatus` whose ``detail`` says why."""

    state: State = "connecting"

    async def set_state(self, ctx: Context, state: Literal["online", "offline"], detail: str) -> None:
        if self.state == state:
            return
        self.state = state
        await ctx.emit("status", SourceStatus(self.name, -1, -1, ctx.clock.wall_ns(), state, detail))
