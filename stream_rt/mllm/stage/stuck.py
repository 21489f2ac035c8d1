"""Whether the model answers: stuck in a call given up on (its thread still busy with it),
or failing call after call."""

from __future__ import annotations

from stream_rt.graph.clock import Clock
from stream_rt.graph.packets import MllmAnswer
from stream_rt.mllm.backend import Backend

FAILING_AFTER = 3
"""This many calls in a row that ended ``error`` or ``timeout`` make the stage unhealthy."""

POLL_S = 0.02


class ModelHealth:
    """``backend.busy_since`` is read against ``clock.now_s()``: both are the monotonic
    clock under the real clocks (:class:`~stream_rt.graph.clock.RealtimeClock`,
    :class:`~stream_rt.graph.clock.ReplayClock`)."""

    def __init__(self, backend: Backend, timeout_s: float, clock: Clock) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.clock = clock
        self.failures_in_a_row = 0  # calls that ended error or timeout, since the last that did not

    def stuck_s(self) -> float | None:
        """How long the model's thread has been busy with a call that was given up on (timed
        out), or ``None`` when it is not stuck."""
        since = self.backend.busy_since
        if since is None:
            return None
        busy = self.clock.now_s() - since
        return busy if busy > self.timeout_s else None

    async def busy_after(self, grace_s: float) -> float | None:
        """Wait up to ``grace_s`` for the model's thread to be free (a call given up on stops
        at its next token); ``None`` once it is, else how long it has been busy."""
        deadline = self.clock.now_s() + grace_s
        while (since := self.backend.busy_since) is not None:
            if self.clock.now_s() >= deadline:
                return self.clock.now_s() - since
            await self.clock.sleep(POLL_S)
        return None

    def called(self, answer: MllmAnswer) -> None:
        """A call ended with ``answer``."""
        self.failures_in_a_row = self.failures_in_a_row + 1 if answer.status in ("error", "timeout") else 0

    def problem(self, name: str) -> str | None:
        """``None`` while the model answers; else one line saying what is wrong with stage
        ``name``."""
        stuck = self.stuck_s()
        if stuck is not None:
            return f"{name} (the model has been stuck in one call for {stuck:.0f} s)"
        if self.failures_in_a_row >= FAILING_AFTER:
            return f"{name} (the last {self.failures_in_a_row} model calls failed)"
        return None
